"""serizba/salad's model arguments -> `ModelConfig` fields.

`official_fields` translates `VPRModel(backbone_arch, backbone_config, agg_arch, agg_config)`
(its defaults where an argument is absent), reproducing the official code's quirks with a note
and refusing what it refuses or crashes on; `from_official` builds the ModelConfig;
`fields_from_hyper_parameters` reads a Lightning file's `hyper_parameters` (serizba/salad's or
amaralibey/MixVPR's VPRModel).
"""

from __future__ import annotations

from typing import Any, Mapping

from salad_jax.errors import UserError, note
from salad_jax.models import resnet, vit
from salad_jax.models.config import BACKBONES, DINOV2, ModelConfig

DINOV2_ARCHS = {"vits14": "S/14", "vitb14": "B/14", "vitl14": "L/14", "vitg14": "g/14"}


def _dinov2_variant(name: str) -> tuple[str, bool]:
  """'dinov2_vitb14' -> ('B/14', False); '*_reg' (not in the official table) -> registers."""
  low = name.lower()
  for key, variant in DINOV2_ARCHS.items():
    if key in low:
      return variant, low.endswith("_reg")
  raise UserError(
    f"backbone_arch {name!r} is not a DINOv2 model the official wrapper knows",
    "use dinov2_vits14, dinov2_vitb14, dinov2_vitl14 or dinov2_vitg14",
  )


def _take(config: Mapping, known: tuple[str, ...], what: str) -> dict:
  unknown = sorted(set(config) - set(known))
  if unknown:
    raise UserError(
      f"{what} has {', '.join(map(repr, unknown))}, which the official module does not take",
      f"its arguments: {', '.join(known)}",
    )
  return dict(config)


def _same(what: str, given, want: int | None, arg: str) -> None:
  """An official argument that our model derives (e.g. in_channels): it must agree."""
  if given is not None and want is not None and int(given) != want:
    raise UserError(
      f"{what}: {arg}={given} but the backbone gives {want} channels (the official model "
      "would fail on its first batch)",
      f"use {arg}={want}",
    )


def official_fields(
  backbone_arch: str | None = "resnet50",
  backbone_config: Mapping | None = None,
  agg_arch: str | None = "ConvAP",
  agg_config: Mapping | None = None,
) -> tuple[dict[str, Any], list[str]]:
  """The ModelConfig fields of serizba/salad's `VPRModel(backbone_arch, backbone_config,
  agg_arch, agg_config)` (its defaults where an argument is absent; None: that part unknown),
  and notes on official behaviours that are reproduced rather than obvious. Raises UserError
  for arguments the official code refuses or crashes on."""
  bc, ac = dict(backbone_config or {}), dict(agg_config or {})
  out: dict[str, Any] = {}
  notes: list[str] = []
  if backbone_arch is None:
    pass
  elif "dinov2" in backbone_arch.lower():
    bc = _take(bc, ("num_trainable_blocks", "norm_layer", "return_token"), "backbone_config")
    variant, registers = _dinov2_variant(backbone_arch)
    depth = vit.VARIANTS[variant]["depth"]
    k = int(bc.get("num_trainable_blocks", 2))
    if k <= 0 or k > depth:  # blocks[:-0] is empty and blocks[-0:] all of them
      notes.append(f"num_trainable_blocks={k} trains all {depth} blocks in the official wrapper")
      k = depth
    out.update(
      backbone=DINOV2,
      variant=variant,
      registers=registers,
      num_trainable_blocks=k,
      norm_layer=bool(bc.get("norm_layer", False)),
      return_token=bool(bc.get("return_token", False)),
    )
  elif "resnet" in backbone_arch.lower() or "resnext" in backbone_arch.lower():
    bc = _take(bc, ("pretrained", "layers_to_freeze", "layers_to_crop"), "backbone_config")
    arch = resnet.official_arch(backbone_arch)
    if arch != backbone_arch:
      notes.append(f"backbone_arch {backbone_arch!r} builds torchvision's {arch} officially")
    pretrained = bool(bc.get("pretrained", True))
    freeze = int(bc.get("layers_to_freeze", 2)) if pretrained else -1
    out.update(
      backbone=arch,
      layers_to_freeze=freeze,
      layers_to_crop=tuple(resnet.check_crop(bc.get("layers_to_crop", ()))),
    )
  else:
    raise UserError(
      f"backbone_arch {backbone_arch!r}: the official get_backbone builds only 'resnet*' and "
      "'dinov2*' (it returns None otherwise)",
      f"use one of {', '.join(BACKBONES[1:])} or dinov2_vitb14",
    )
  channels = None
  if backbone_arch is not None:
    channels = ModelConfig(
      **{k: v for k, v in out.items() if k in ("backbone", "variant", "layers_to_crop")},
      aggregator="gem",
    ).width
  name = "" if agg_arch is None else agg_arch.lower()
  if agg_arch is None:
    pass
  elif "cosplace" in name:  # the official get_aggregator's order of substring tests
    ac = _take(ac, ("in_dim", "out_dim"), "agg_config (CosPlace)")
    _same("CosPlace", ac.get("in_dim"), channels, "in_dim")
    if "out_dim" not in ac:
      raise UserError("agg_config (CosPlace) has no out_dim; the official helper requires it")
    out.update(aggregator="cosplace", out_dim=int(ac["out_dim"]))
  elif "gem" in name:
    ac = _take(ac, ("p", "eps"), "agg_config (GeM)")
    if float(ac.get("eps", 1e-6)) != 1e-6:
      raise UserError(f"agg_config (GeM) eps={ac['eps']}: only the default 1e-6 is supported")
    out.update(aggregator="gem", p=float(ac.get("p", 3)))
  elif "convap" in name:
    ac = _take(ac, ("in_channels", "out_channels", "s1", "s2"), "agg_config (ConvAP)")
    _same("ConvAP", ac.get("in_channels"), channels, "in_channels")
    out.update(
      aggregator="convap",
      out_channels=int(ac.get("out_channels", 512)),
      s1=int(ac.get("s1", 2)),
      s2=int(ac.get("s2", 2)),
    )
  elif "mixvpr" in name:
    keys = ("in_channels", "in_h", "in_w", "out_channels", "mix_depth", "mlp_ratio", "out_rows")
    ac = _take(ac, keys, "agg_config (MixVPR)")
    _same("MixVPR", ac.get("in_channels"), channels, "in_channels")
    defaults = dict(in_h=20, in_w=20, out_channels=512, mix_depth=1, mlp_ratio=1, out_rows=4)
    out.update(aggregator="mixvpr", **{k: ac.get(k, v) for k, v in defaults.items()})
    out["mlp_ratio"] = float(out["mlp_ratio"])
  elif "salad" in name:
    keys = ("num_channels", "num_clusters", "cluster_dim", "token_dim", "dropout")
    ac = _take(ac, keys, "agg_config (SALAD)")
    _same("SALAD", ac.get("num_channels"), channels, "num_channels")
    out.update(
      aggregator="salad",
      num_clusters=int(ac.get("num_clusters", 64)),
      cluster_dim=int(ac.get("cluster_dim", 128)),
      token_dim=int(ac.get("token_dim", 256)),
      dropout=float(ac.get("dropout", 0.3)),
      hidden_dim=512,
    )
  elif "netvlad" in name:  # not in serizba/salad: Nanne/pytorch-NetVlad's arguments
    ac = _take(ac, ("num_clusters", "dim", "normalize_input", "vladv2"), "agg_config (NetVLAD)")
    _same("NetVLAD", ac.get("dim"), channels, "dim")
    out.update(
      aggregator="netvlad",
      num_clusters=int(ac.get("num_clusters", 64)),
      normalize_input=bool(ac.get("normalize_input", True)),
      vladv2=bool(ac.get("vladv2", False)),
    )
  else:
    raise UserError(
      f"agg_arch {agg_arch!r} is not an aggregator the official get_aggregator builds",
      "use SALAD, GeM, ConvAP, CosPlace or MixVPR (or NetVLAD)",
    )
  return out, notes


def from_official(
  backbone_arch: str = "resnet50",
  backbone_config: Mapping | None = None,
  agg_arch: str = "ConvAP",
  agg_config: Mapping | None = None,
  **fields: Any,
) -> ModelConfig:
  """The ModelConfig of serizba/salad's `VPRModel(backbone_arch=..., backbone_config=...,
  agg_arch=..., agg_config=...)`; `fields` set the rest (dtype, attention, ...). Notes on
  official quirks it reproduces are printed (`errors.note`)."""
  out, notes = official_fields(backbone_arch, backbone_config, agg_arch, agg_config)
  for n in notes:
    note(n)
  return ModelConfig(**{**out, **fields})


def fields_from_hyper_parameters(hparams: Mapping) -> tuple[dict[str, Any], list[str]]:
  """ModelConfig fields from a Lightning file's `hyper_parameters`: serizba/salad's VPRModel
  (backbone_arch, backbone_config, agg_arch, agg_config) or amaralibey/MixVPR's (backbone_arch,
  pretrained, layers_to_freeze, layers_to_crop, agg_arch, agg_config). A part it lacks (no
  backbone_arch, no agg_arch) is left to the weights' keys."""
  backbone_config = dict(hparams.get("backbone_config") or {})
  for key in ("pretrained", "layers_to_freeze", "layers_to_crop"):  # MixVPR's VPRModel
    if key in hparams and "resnet" in str(hparams.get("backbone_arch", "")).lower():
      backbone_config.setdefault(key, hparams[key])
  backbone, agg = hparams.get("backbone_arch"), hparams.get("agg_arch")
  return official_fields(
    None if backbone is None else str(backbone),
    backbone_config,
    None if agg is None else str(agg),
    dict(hparams.get("agg_config") or {}),
  )
