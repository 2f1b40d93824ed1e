"""What model a PyTorch checkpoint holds, and reading one into Flax variables with it.

`infer_config` reads the architecture off a state_dict's keys and shapes (each size the one
most tensors carrying it agree on), then a Lightning file's `hyper_parameters`, then the official
class defaults (with a note naming the override); what stays undecidable is one error naming
it. `read_checkpoint_variables` reads a torch/safetensors file (`salad_jax.weights.torch_files`),
infers its config and converts it (`salad_jax.weights.convert`).
"""

from __future__ import annotations

import collections
import math
from typing import Mapping

import numpy as np

from salad_jax.errors import note
from salad_jax.files import paths
from salad_jax.models import resnet_layout, vit
from salad_jax.models.config import ModelConfig
from salad_jax.models.official import fields_from_hyper_parameters
from salad_jax.weights import torch_files
from salad_jax.weights.convert import (
  AGGREGATOR,
  BACKBONE,
  PARAMS,
  CheckpointMismatchError,
  format_keys,
  torch_to_variables,
)

_WIDTH_TO_VARIANT = {
  spec["width"]: name for name, spec in vit.VARIANTS.items()
}  # widths are unique


def _vote(sd: Mapping[str, np.ndarray], what: str, where: list[tuple[str, int]]) -> int:
  """The size of dimension `what` that most tensors carrying it agree on.

  So one wrong-shaped tensor is reported by name, instead of fixing the inferred config and
  making all its neighbours look wrong. A tie between two tensors names both.
  """
  seen = [
    (k, sd[k].shape[axis]) for k, axis in where if k in sd and -sd[k].ndim <= axis < sd[k].ndim
  ]
  if not seen:
    raise CheckpointMismatchError(f"checkpoint has none of {format_keys([k for k, _ in where], 4)}")
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
    f"NetVLAD): {format_keys(keys, 8)}"
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
  then from `hyper_parameters` (a Lightning file's, `official.fields_from_hyper_parameters`), then
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
      f"{format_keys(keys, 8)}"
    )
  if prefix + "conv1.weight" in keys:
    shapes = {k[len(prefix) :]: np.shape(v) for k, v in state_dict.items() if k.startswith(prefix)}
    try:
      arch, crop = resnet_layout.infer_arch(shapes)
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
