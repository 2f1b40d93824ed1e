"""PyTorch state_dict <-> Flax variables for every backbone x head, with a strict two-way
key/shape check.

A state_dict here is a flat mapping from the official keys of serizba/salad's VPRModel
(`backbone.model.blocks.3.attn.qkv.weight`, `backbone.model.layer1.0.bn1.running_var`,
`aggregator.score.0.weight`, ...) to numpy arrays; a ResNet's BatchNorm buffers become the
`batch_stats` collection. `infer_config` reads the architecture off the keys and shapes, then a
Lightning file's `hyper_parameters`, then the official class defaults (with a note naming the
override); what stays undecidable is one error naming it. Files are read and written by
`salad_jax.weights` (safe unpickling, tensor checks, the writer marker).
"""

from __future__ import annotations

import collections
import functools
import math
from typing import Iterable, Mapping

import jax
import numpy as np

from salad_jax.errors import note
from salad_jax.files import paths
from salad_jax.models import convap, cosplace, gem, mixvpr, netvlad, resnet, salad, vit
from salad_jax.models.vpr import ModelConfig, VPRModel, fields_from_hyper_parameters
from salad_jax.weights import torch_files

BACKBONE = "backbone.model."
AGGREGATOR = "aggregator."
_WIDTH_TO_VARIANT = {
  spec["width"]: name for name, spec in vit.VARIANTS.items()
}  # widths are unique

# kinds of tensors and how a torch tensor becomes a Flax leaf
_LINEAR, _CONV1X1, _PATCH, _RAW = "linear", "conv1x1", "patch", "raw"
_CONV, _INT = "conv", "int"  # a ResNet conv (OIHW <-> HWIO), BatchNorm's counter
PARAMS, STATS = "params", "batch_stats"


class CheckpointMismatchError(ValueError):
  """The checkpoint's keys or shapes do not match the model."""


def _backbone_layout(config: ModelConfig) -> list[tuple[str, tuple[str, ...], str]]:
  spec = vit.decode_variant(config.variant)
  rows = [("cls_token", ("cls_token",), _RAW), ("pos_embed", ("pos_embed",), _RAW)]
  if config.registers:
    rows.append(("register_tokens", ("register_tokens",), _RAW))
  rows += [
    ("mask_token", ("mask_token",), _RAW),
    ("patch_embed.proj.weight", ("patch_embed", "proj", "kernel"), _PATCH),
    ("patch_embed.proj.bias", ("patch_embed", "proj", "bias"), _RAW),
  ]
  ffn = ("w12", "w3") if spec["ffn"] == "swiglu" else ("fc1", "fc2")

  def linear(tkey, fpath):
    return [
      (f"{tkey}.weight", fpath + ("kernel",), _LINEAR),
      (f"{tkey}.bias", fpath + ("bias",), _RAW),
    ]

  def norm(tkey, fpath):
    return [(f"{tkey}.weight", fpath + ("scale",), _RAW), (f"{tkey}.bias", fpath + ("bias",), _RAW)]

  for i in range(spec["depth"]):
    t, f = f"blocks.{i}", (f"blocks_{i}",)
    rows += norm(f"{t}.norm1", f + ("norm1",))
    rows += linear(f"{t}.attn.qkv", f + ("attn", "qkv")) + linear(
      f"{t}.attn.proj", f + ("attn", "proj")
    )
    rows.append((f"{t}.ls1.gamma", f + ("ls1", "gamma"), _RAW))
    rows += norm(f"{t}.norm2", f + ("norm2",))
    rows += linear(f"{t}.mlp.{ffn[0]}", f + ("mlp", ffn[0])) + linear(
      f"{t}.mlp.{ffn[1]}", f + ("mlp", ffn[1])
    )
    rows.append((f"{t}.ls2.gamma", f + ("ls2", "gamma"), _RAW))
  rows += norm("norm", ("norm",))
  return rows


def _head_layout(config: ModelConfig) -> list[tuple[str, tuple[str, ...], str]]:
  """The head's rows (keys after `aggregator.`), from its module's `torch_layout`."""
  a = config.aggregator
  if a == "salad":
    return salad.torch_layout(
      config.salad_dustbin, config.salad_assignment, config.salad_global_token
    )
  if a == "gem":
    return gem.torch_layout()
  if a == "convap":
    return convap.torch_layout()
  if a == "cosplace":
    return cosplace.torch_layout()
  if a == "mixvpr":
    return mixvpr.torch_layout(config.mix_depth)
  return netvlad.torch_layout(config.vladv2)


_RESNET_KINDS = {resnet.CONV: _CONV, resnet.RAW: _RAW, resnet.INT: _INT}


def variable_layout(
  config: ModelConfig, backbone_only: bool = False
) -> list[tuple[str, str, tuple[str, ...], str]]:
  """(torch key, collection, flax path, kind) rows in the official state_dict order: the
  params and, for a ResNet, its BatchNorm buffers (collection `batch_stats`)."""
  if config.is_resnet:
    rows = [
      (BACKBONE + t, coll, ("backbone",) + f, _RESNET_KINDS[k])
      for t, coll, f, k in resnet.torch_layout(config.backbone, config.layers_to_crop)
    ]
  else:
    rows = [(BACKBONE + t, PARAMS, ("backbone",) + f, k) for t, f, k in _backbone_layout(config)]
  if not backbone_only:
    rows += [(AGGREGATOR + t, PARAMS, ("aggregator",) + f, k) for t, f, k in _head_layout(config)]
  return rows


def layout(config: ModelConfig, backbone_only: bool = False):
  """(torch key, flax path, kind) rows of the params in the official state_dict order."""
  return [(t, f, k) for t, c, f, k in variable_layout(config, backbone_only) if c == PARAMS]


def _to_flax(x: np.ndarray, kind: str) -> np.ndarray:
  if kind == _LINEAR:
    return x.T
  if kind == _CONV1X1:
    return x[:, :, 0, 0].T
  if kind in (_PATCH, _CONV):
    return x.transpose(2, 3, 1, 0)
  return x


def _to_torch(x: np.ndarray, kind: str) -> np.ndarray:
  if kind == _LINEAR:
    return x.T
  if kind == _CONV1X1:
    return x.T[:, :, None, None]
  if kind in (_PATCH, _CONV):
    return x.transpose(3, 2, 0, 1)
  return x


def _leaf_to_flax(x, kind: str) -> np.ndarray:
  if kind == _INT:
    v = int(np.asarray(x))
    if not 0 <= v < 2**31:
      raise CheckpointMismatchError(f"num_batches_tracked {v} does not fit int32")
    return np.asarray(v, np.int32)
  return np.array(_to_flax(np.asarray(x, np.float32), kind), order="C")


def _leaf_to_torch(x, kind: str) -> np.ndarray:
  if kind == _INT:
    return np.asarray(x, np.int64)
  return np.array(_to_torch(np.asarray(x).astype(np.float32), kind), order="C")


def torch_shape(flax_shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
  return _to_torch(np.empty(flax_shape, np.uint8), kind).shape


def _format_keys(keys: Iterable[str], limit: int = 20) -> str:
  keys = sorted(keys)
  more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
  return ", ".join(keys[:limit]) + more


def check_state_dict(state_dict: Mapping[str, np.ndarray], rows, expected_shapes) -> None:
  """Raises CheckpointMismatchError listing missing, unexpected and mis-shaped keys.

  `rows`: (torch key, flax path, kind), shapes keyed by flax path; or (torch key, collection,
  flax path, kind), shapes keyed by (collection,) + flax path (`variable_shapes`).
  """
  want = {
    r[0]: torch_shape(expected_shapes[r[1] if len(r) == 3 else (r[1],) + r[2]], r[-1]) for r in rows
  }
  missing = set(want) - set(state_dict)
  unexpected = set(state_dict) - set(want)
  bad = [
    f"{t}: checkpoint {tuple(np.shape(state_dict[t]))}, model {want[t]}"
    for t in want
    if t in state_dict and tuple(np.shape(state_dict[t])) != want[t]
  ]
  if missing or unexpected or bad:
    parts = []  # one line: the command-line tools print it as `error: ...`
    if missing:
      parts.append(f"in model, not in checkpoint ({len(missing)}): {_format_keys(missing)}")
    if unexpected:
      parts.append(f"in checkpoint, not in model ({len(unexpected)}): {_format_keys(unexpected)}")
    if bad:
      parts.append(f"shape mismatches ({len(bad)}): " + "; ".join(sorted(bad)[:20]))
    raise CheckpointMismatchError("checkpoint does not match the model: " + " | ".join(parts))


@functools.lru_cache(maxsize=8)
def variable_shapes(config: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """(collection,) + flax path -> shape for `config` (traced once per config; do not mutate)."""
  x = jax.ShapeDtypeStruct((1, *config.example_image_size(), 3), np.float32)
  shapes = jax.eval_shape(lambda r, x: VPRModel(config).init(r, x), jax.random.key(0), x)
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(dict(shapes))[0]:
    flat[tuple(p.key for p in path)] = tuple(leaf.shape)
  return flat


def param_shapes(config: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flax param path -> shape for `config` (do not mutate)."""
  return {k[1:]: v for k, v in variable_shapes(config).items() if k[0] == PARAMS}


def _put(tree: dict, path: tuple[str, ...], value) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def torch_to_variables(
  state_dict: Mapping[str, np.ndarray], config: ModelConfig, backbone_only: bool = False
) -> dict:
  """Official-layout state_dict -> {"params": ..., "batch_stats": ...} (numpy; batch_stats only
  for ResNets), every key and shape checked both ways.

  With `backbone_only`, only `backbone.model.*` keys are expected and the result holds only the
  `backbone` subtrees (the head then starts from a fresh init). A ResNet backbone file may also
  hold the stages the config crops and torchvision's fc.*: the official wrapper drops them.
  """
  shapes = variable_shapes(config)
  rows = variable_layout(config, backbone_only)
  model_paths = {p for p in shapes if not backbone_only or p[1] == "backbone"}
  table_paths = {(c,) + f for _, c, f, _ in rows}
  assert model_paths == table_paths, (
    f"conversion table out of sync with the model: {sorted(model_paths ^ table_paths)}"
  )
  if backbone_only and config.is_resnet:
    crop = {f"{BACKBONE}layer{s}." for s in config.layers_to_crop}
    dropped = {BACKBONE + k for k in resnet.DROPPED}
    state_dict = {
      k: v for k, v in state_dict.items() if k not in dropped and not k.startswith(tuple(crop))
    }
  check_state_dict(state_dict, rows, shapes)
  out: dict = {PARAMS: {}}
  for tkey, coll, fpath, kind in rows:
    _put(out.setdefault(coll, {}), fpath, _leaf_to_flax(state_dict[tkey], kind))
  return out


def torch_to_params(
  state_dict: Mapping[str, np.ndarray], config: ModelConfig, backbone_only: bool = False
) -> dict:
  """Official-layout state_dict -> nested Flax param dict (numpy float32); the params of
  `torch_to_variables` (which also gives a ResNet's BatchNorm statistics)."""
  return torch_to_variables(state_dict, config, backbone_only)[PARAMS]


def _flatten(node: Mapping, prefix=()) -> dict[tuple[str, ...], np.ndarray]:
  flat = {}
  for k, v in node.items():
    if isinstance(v, Mapping):
      flat.update(_flatten(v, prefix + (k,)))
    else:
      flat[prefix + (k,)] = np.asarray(v)
  return flat


def variables_to_torch(
  variables: Mapping, config: ModelConfig
) -> "collections.OrderedDict[str, np.ndarray]":
  """{"params", "batch_stats"} -> state_dict in the official key order (numpy float32; BatchNorm
  counters int64), which the official VPRModel loads with strict=True."""
  flat = {(c,) + p: v for c, tree in variables.items() for p, v in _flatten(tree).items()}
  rows = variable_layout(config)
  paths = {(c,) + f for _, c, f, _ in rows}
  missing, extra = paths - set(flat), set(flat) - paths
  if missing or extra:
    raise CheckpointMismatchError(
      "params do not match the model config: "
      f"in model, not in params: {_format_keys('/'.join(p) for p in missing)} | "
      f"in params, not in model: {_format_keys('/'.join(p) for p in extra)}"
    )
  out = collections.OrderedDict()
  for tkey, coll, fpath, kind in rows:
    out[tkey] = _leaf_to_torch(flat[(coll,) + fpath], kind)
  return out


def params_to_torch(
  params: Mapping, config: ModelConfig, batch_stats: Mapping | None = None
) -> "collections.OrderedDict[str, np.ndarray]":
  """Nested Flax params (+ a ResNet's `batch_stats`) -> state_dict in the official key order."""
  variables = {PARAMS: params, **({STATS: batch_stats} if batch_stats else {})}
  return variables_to_torch(variables, config)


# ------------------------------------------------------------------------------ inference
def _vote(sd: Mapping[str, np.ndarray], what: str, where: list[tuple[str, int]]) -> int:
  """The size of dimension `what` that most tensors carrying it agree on.

  So one wrong-shaped tensor is reported by name, instead of fixing the inferred config and
  making all its neighbours look wrong. A tie between two tensors names both.
  """
  seen = [
    (k, sd[k].shape[axis]) for k, axis in where if k in sd and -sd[k].ndim <= axis < sd[k].ndim
  ]
  if not seen:
    raise CheckpointMismatchError(
      f"checkpoint has none of {_format_keys([k for k, _ in where], 4)}"
    )
  counts = collections.Counter(v for _, v in seen)
  (best, n), *rest = counts.most_common()
  if rest and rest[0][1] == n:
    named = "; ".join(f"{k} {tuple(sd[k].shape)}" for k, _ in where if k in sd)
    raise CheckpointMismatchError(
      f"checkpoint does not match the model: tensors disagree on {what} ({named}); one of "
      "them has the wrong shape"
    )
  return best


def _dinov2_fields(state_dict: Mapping[str, np.ndarray], prefix: str) -> dict:
  keys = set(state_dict)
  width_keys = [
    (prefix + k, -1) for k in ("cls_token", "pos_embed", "mask_token", "register_tokens")
  ]
  width_keys += [
    (k, 0)
    for k in sorted(keys)
    if k.startswith(prefix)
    and k.endswith(
      (
        "norm1.weight",
        "norm1.bias",
        "norm2.weight",
        "norm2.bias",
        "ls1.gamma",
        "ls2.gamma",
        "attn.proj.bias",
        "norm.weight",
        "norm.bias",
        "patch_embed.proj.bias",
      )
    )
  ]
  width = _vote(state_dict, "the embedding width", width_keys)
  if width not in _WIDTH_TO_VARIANT:
    raise CheckpointMismatchError(
      f"embedding width {width} is not a DINOv2 ViT/14 ({sorted(_WIDTH_TO_VARIANT)})"
    )
  return dict(
    backbone="dinov2",
    variant=_WIDTH_TO_VARIANT[width],
    registers=prefix + "register_tokens" in keys,
  )


def _salad_fields(sd: Mapping[str, np.ndarray]) -> dict:
  a = AGGREGATOR
  glob = any(k.startswith(a + "token_features.") for k in sd)
  hidden = [
    (a + f"{n}.0.{w}", 0) for n in ("score", "cluster_features") for w in ("weight", "bias")
  ]
  hidden += [(a + "score.3.weight", 1), (a + "cluster_features.3.weight", 1)]
  if glob:
    hidden += [(a + "token_features.0.weight", 0), (a + "token_features.0.bias", 0)]
    hidden += [(a + "token_features.2.weight", 1)]
  out = dict(
    aggregator="salad",
    num_clusters=_vote(sd, "num_clusters", [(a + "score.3.weight", 0), (a + "score.3.bias", 0)]),
    cluster_dim=_vote(
      sd, "cluster_dim", [(a + "cluster_features.3.weight", 0), (a + "cluster_features.3.bias", 0)]
    ),
    hidden_dim=_vote(sd, "hidden_dim", hidden),
    salad_global_token=glob,
    salad_dustbin=a + "dust_bin" in sd,
  )
  if glob:
    out["token_dim"] = _vote(
      sd, "token_dim", [(a + "token_features.2.weight", 0), (a + "token_features.2.bias", 0)]
    )
  if out["salad_dustbin"]:
    out["salad_assignment"] = "sinkhorn"
  return out


def _shape(sd, key: str, axis: int) -> int:
  if key not in sd or np.ndim(sd[key]) <= axis:
    raise CheckpointMismatchError(
      f"checkpoint does not match the model: no {key} (or not {axis + 1}-d) in a head that needs it"
    )
  return int(np.shape(sd[key])[axis])


def _head_fields(sd: Mapping[str, np.ndarray]) -> dict | None:
  """The head's fields that its keys and shapes fix; None without `aggregator.*` keys."""
  a = AGGREGATOR
  keys = {k[len(a) :] for k in sd if k.startswith(a)}
  if not keys:
    return None
  if keys & {"score.0.weight", "cluster_features.0.weight", "dust_bin", "score.3.weight"}:
    return _salad_fields(sd)
  if "channel_pool.weight" in keys:
    return dict(aggregator="convap", out_channels=_shape(sd, a + "channel_pool.weight", 0))
  if any(k.startswith(("mix.", "channel_proj.", "row_proj.")) for k in keys):
    hw = _shape(sd, a + "row_proj.weight", 1)
    depth = len({k.split(".")[1] for k in keys if k.startswith("mix.")})
    out = dict(
      aggregator="mixvpr",
      mix_depth=depth,
      out_channels=_shape(sd, a + "channel_proj.weight", 0),
      out_rows=_shape(sd, a + "row_proj.weight", 0),
      hw=hw,
    )
    if depth:
      hidden = _shape(sd, a + "mix.0.mix.1.weight", 0)
      ratio = hidden / hw
      out["mlp_ratio"] = ratio if int(hw * ratio) == hidden else (hidden + 0.5) / hw
    return out
  if "centroids" in keys:
    return dict(
      aggregator="netvlad",
      num_clusters=_shape(sd, a + "centroids", 0),
      vladv2="conv.bias" in keys,
    )
  if "fc.weight" in keys or "gem.p" in keys:
    return dict(aggregator="cosplace", out_dim=_shape(sd, a + "fc.weight", 0))
  if keys == {"p"}:
    return dict(aggregator="gem")
  raise CheckpointMismatchError(
    f"the aggregator.* keys are of no known head (SALAD, GeM, ConvAP, CosPlace, MixVPR, "
    f"NetVLAD): {_format_keys(keys, 8)}"
  )


def _factor(hw: int) -> tuple[int, int]:
  """The most square in_h x in_w with in_h * in_w = hw."""
  h = max(d for d in range(1, math.isqrt(hw) + 1) if hw % d == 0)
  return hw // h, h


def _defaults(fields: dict, decided: Mapping) -> list[str]:
  """The official class defaults for what neither the keys nor the hyper_parameters fix; fills
  `fields` and returns notes naming each one and its override."""
  notes = []

  def default(name, value, why):
    if name not in decided:
      fields[name] = value
      notes.append(f"{name}={value!r} ({why}; override with {name}=...)")

  head = fields.get("aggregator")
  if fields.get("backbone") == "dinov2" and head not in (None, "salad"):
    default("norm_layer", False, "the official DINOv2 wrapper's default")
    default("return_token", False, "the official DINOv2 wrapper's default")
  if head == "convap":
    default("s1", 2, "ConvAP's default pooled grid")
    default("s2", 2, "ConvAP's default pooled grid")
  if head == "netvlad":
    default("normalize_input", True, "NetVLAD's default")
  if head == "mixvpr" and "in_h" not in decided and "in_w" not in decided:
    hw = fields["hw"]
    h, w = (20, 20) if hw == 400 else _factor(hw)
    fields["in_h"], fields["in_w"] = h, w
    notes.append(
      f"in_h={h}, in_w={w} (MixVPR's weights fix only in_h * in_w = {hw}"
      + (", and 20x20 is its default" if hw == 400 else "")
      + "; override with in_h=..., in_w=...)"
    )
  return notes


def _check_agreement(from_keys: Mapping, from_hparams: Mapping) -> None:
  """hyper_parameters that contradict the weights: the file is not what it says."""
  for name, value in from_keys.items():
    if name == "hw":
      h, w = from_hparams.get("in_h"), from_hparams.get("in_w")
      ok = h is None or w is None or h * w == value
      name, shown = "in_h * in_w", f"{h} * {w}"
    elif name in from_hparams:
      shown = from_hparams[name]
      ok = shown == value or (
        name == "backbone"
        and from_keys.get("layers_to_crop") == (3, 4)
        and {value, shown} <= {"resnet50", "resnet101"}  # the same network without layer3/4
      )
      if isinstance(value, float):
        ok = abs(float(shown) - value) < 1e-6
    else:
      continue
    if not ok:
      raise CheckpointMismatchError(
        f"the file's hyper_parameters give {name}={shown!r}, but its weights are of a model "
        f"with {name}={value!r}"
      )


def infer_config(
  state_dict: Mapping[str, np.ndarray], hyper_parameters: Mapping | None = None, **overrides
) -> tuple[ModelConfig, bool]:
  """Model config of a state_dict; returns (config, backbone_only).

  Accepts an official VPRModel state_dict (`backbone.model.*` + `aggregator.*`, any backbone x
  head), a plain DINOv2 hub file or a torchvision ResNet file (backbone only). The architecture
  comes from the keys and shapes (each size the one most tensors carrying it agree on, `_vote`),
  then from `hyper_parameters` (a Lightning file's, `vpr.fields_from_hyper_parameters`), then
  `overrides`; where the official code has a class default it is used, with a note; SALAD
  without its dustbin is ambiguous (no-dustbin Sinkhorn or softmax: the same keys) and needs
  `salad_assignment`. `overrides` replace anything inferred (the strict key check follows).
  """
  keys = set(state_dict)
  if any(k.startswith(BACKBONE) for k in keys):
    prefix, backbone_only = BACKBONE, not any(k.startswith(AGGREGATOR) for k in keys)
  elif "cls_token" in keys and "pos_embed" in keys:
    prefix, backbone_only = "", True
  elif "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
    prefix, backbone_only = "", True
  else:
    raise CheckpointMismatchError(
      "not a SALAD or DINOv2 checkpoint (nor another official VPRModel or a torchvision "
      "ResNet): expected keys 'backbone.model.*' and 'aggregator.*' (VPRModel), 'cls_token', "
      "'pos_embed', 'blocks.*' (DINOv2) or 'conv1.weight', 'layer1.*' (ResNet); found "
      f"{_format_keys(keys, 8)}"
    )
  if prefix + "conv1.weight" in keys:
    shapes = {k[len(prefix) :]: np.shape(v) for k, v in state_dict.items() if k.startswith(prefix)}
    try:
      arch, crop = resnet.infer_arch(shapes)
    except ValueError as e:
      raise CheckpointMismatchError(f"checkpoint does not match a ResNet: {e}") from None
    from_keys = dict(backbone=arch, layers_to_crop=crop)
  else:
    from_keys = _dinov2_fields(state_dict, prefix)
  head = None if backbone_only else _head_fields(state_dict)
  from_keys.update(head or {})
  from_hparams, notes = {}, []
  if hyper_parameters:
    try:
      from_hparams, notes = fields_from_hyper_parameters(hyper_parameters)
    except ValueError as e:
      raise CheckpointMismatchError(f"the file's hyper_parameters: {e}") from None
    _check_agreement(from_keys, from_hparams)
  fields = {**from_hparams, **from_keys}
  if from_keys.get("layers_to_crop") == (3, 4) and "backbone" in from_hparams:
    fields["backbone"] = from_hparams["backbone"]  # resnet50 or resnet101: the same weights
  decided = {**from_hparams, **overrides}
  notes += _defaults(fields, decided)
  fields.pop("hw", None)
  if fields.get("aggregator") == "salad" and not fields["salad_dustbin"]:
    if "salad_assignment" not in decided:
      raise CheckpointMismatchError(
        "this SALAD head has no dust_bin: it is SALAD without the dustbin (Sinkhorn) or with "
        "the softmax assignment, which have the same keys; say which with "
        "salad_assignment='sinkhorn' or 'softmax' (convert_weights.py / evaluate.py: "
        "--model salad_assignment=...)"
      )
  fields.update(overrides)
  for n in notes:
    note(n)
  try:
    return ModelConfig(**fields), backbone_only
  except ValueError as e:
    raise CheckpointMismatchError(f"checkpoint gives an invalid model config: {e}") from None


# ------------------------------------------------------------------------------ files
def read_checkpoint_variables(path: str, **overrides) -> tuple[dict, ModelConfig, bool, dict]:
  """Reads a torch/safetensors checkpoint -> (variables, config, backbone_only, source)."""
  sd, hparams = torch_files.read_checkpoint_file(path)
  plain_resnet = "conv1.weight" in sd and any(k.startswith("layer1.") for k in sd)
  if not any(k.startswith(BACKBONE) for k in sd) and (
    "cls_token" in sd or plain_resnet
  ):  # a plain DINOv2 hub or torchvision ResNet file
    sd = {BACKBONE + k: v for k, v in sd.items()}
  config, backbone_only = infer_config(sd, hparams, **overrides)
  variables = torch_to_variables(sd, config, backbone_only)
  kind = config.backbone_kind if backbone_only else config.aggregator
  source = {"file": paths.absolute(path), "sha256": torch_files.sha256(path), "kind": kind}
  if hparams:
    source["hyper_parameters"] = True
  return variables, config, backbone_only, source


def read_checkpoint(path: str, **overrides) -> tuple[dict, ModelConfig, bool, dict]:
  """Reads a torch/safetensors checkpoint -> (params, config, backbone_only, source); the params
  of `read_checkpoint_variables` (which also gives a ResNet's BatchNorm statistics)."""
  variables, config, backbone_only, source = read_checkpoint_variables(path, **overrides)
  return variables[PARAMS], config, backbone_only, source


def write_torch_checkpoint(
  path: str,
  params: Mapping,
  config: ModelConfig,
  overwrite: bool = False,
  batch_stats: Mapping | None = None,
) -> None:
  """Writes params (+ a ResNet's batch_stats) as a flat official-layout state_dict (.pth/.ckpt
  via torch, or .safetensors).

  An existing `path` is replaced only with `overwrite` and only if salad_jax wrote it.
  """
  torch_files.check_file_destination(path, overwrite)
  torch_files.write_state_dict(path, params_to_torch(params, config, batch_stats))
