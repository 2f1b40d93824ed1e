"""The torchvision state_dict layout of the ResNet backbones (`salad_jax.models.resnet`).

`torch_layout` is the conversion table (torch key, collection, flax path, kind) in torchvision's
state_dict order, keys relative to the torchvision model (`layer1.0.downsample.1.weight` ->
`layer1_0/downsample_1/scale`; BatchNorm buffers in `batch_stats`); `infer_arch` reads the arch
and the cropped stages off a state_dict's key shapes; `state_dict_to_variables` and
`variables_to_state_dict` convert with every key and shape checked.
"""

from __future__ import annotations

import collections
import re
from typing import Iterable, Mapping

import numpy as np

from salad_jax.errors import UserError
from salad_jax.models.resnet import (
  EXPANSION,
  PLANES,
  STEM,
  VARIANTS,
  check_crop,
  decode_variant,
  num_stages,
)

CONV, RAW, INT = "conv", "raw", "int"  # conversion kinds: OIHW <-> HWIO, as is, the counter
DROPPED = ("fc.weight", "fc.bias")  # a torchvision ImageNet file's classifier: the wrapper drops it


def _flax_path(torch_name: str) -> tuple[str, ...]:
  """'layer1.0.downsample.1' -> ('layer1_0', 'downsample_1'): list indices joined with '_'."""
  return tuple(re.sub(r"\.(\d+)", r"_\1", torch_name).split("."))


def _rows(arch: str, layers_to_crop: Iterable[int] = ()):
  """(torch key, collection, flax path, kind, torch shape) in torchvision's state_dict order."""
  spec = decode_variant(arch)
  exp, groups = EXPANSION[spec["block"]], spec["groups"]

  def conv(t, o, i, k):
    return [(f"{t}.weight", "params", _flax_path(t) + ("kernel",), CONV, (o, i, k, k))]

  def bn(t, c):
    f = _flax_path(t)
    return [
      (f"{t}.weight", "params", f + ("scale",), RAW, (c,)),
      (f"{t}.bias", "params", f + ("bias",), RAW, (c,)),
      (f"{t}.running_mean", "batch_stats", f + ("running_mean",), RAW, (c,)),
      (f"{t}.running_var", "batch_stats", f + ("running_var",), RAW, (c,)),
      (f"{t}.num_batches_tracked", "batch_stats", f + ("num_batches_tracked",), INT, ()),
    ]

  rows = conv("conv1", STEM, 3, 7) + bn("bn1", STEM)
  in_ch = STEM
  for s in range(num_stages(layers_to_crop)):
    planes, out = PLANES[s], PLANES[s] * exp
    for i in range(spec["layers"][s]):
      t = f"layer{s + 1}.{i}"
      if spec["block"] == "bottleneck":
        width = int(planes * (spec["width_per_group"] / 64.0)) * groups
        rows += conv(f"{t}.conv1", width, in_ch, 1) + bn(f"{t}.bn1", width)
        rows += conv(f"{t}.conv2", width, width // groups, 3) + bn(f"{t}.bn2", width)
        rows += conv(f"{t}.conv3", out, width, 1) + bn(f"{t}.bn3", out)
      else:
        rows += conv(f"{t}.conv1", out, in_ch, 3) + bn(f"{t}.bn1", out)
        rows += conv(f"{t}.conv2", out, out, 3) + bn(f"{t}.bn2", out)
      if i == 0 and (s > 0 or in_ch != out):
        rows += conv(f"{t}.downsample.0", out, in_ch, 1) + bn(f"{t}.downsample.1", out)
      in_ch = out
  return rows


def torch_layout(
  arch: str, layers_to_crop: Iterable[int] = ()
) -> list[tuple[str, str, tuple[str, ...], str]]:
  """(torch key, collection, flax path, kind) rows in torchvision's state_dict order; keys are
  relative to the torchvision model (the official checkpoint prefixes `backbone.model.`)."""
  return [r[:4] for r in _rows(arch, layers_to_crop)]


def _names(keys: Iterable[str], limit: int = 8) -> str:
  keys = sorted(keys)
  more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
  return ", ".join(keys[:limit]) + more


def _check_keys(
  shapes: Mapping[str, tuple], arch: str, crop: tuple[int, ...], allow_extra: bool
) -> list:
  rows = _rows(arch, crop)
  want = {r[0]: r[4] for r in rows}
  dropped = set(DROPPED) | {k for k in shapes if k.split(".")[0] in {f"layer{s}" for s in crop}}
  missing = set(want) - set(shapes)
  extra = set(shapes) - set(want) - (dropped if allow_extra else set(DROPPED))
  bad = [
    f"{k} {tuple(shapes[k])} (expected {want[k]})"
    for k in want
    if k in shapes and tuple(shapes[k]) != want[k]
  ]
  if missing or extra or bad:
    parts = [f"missing: {_names(missing)}"] if missing else []
    parts += [f"unexpected: {_names(extra)}"] if extra else []
    parts += [f"wrong shapes: {'; '.join(sorted(bad)[:8])}"] if bad else []
    raise UserError(
      f"state_dict does not match {arch} (layers_to_crop={list(crop)}): " + " | ".join(parts),
      "keys are relative to the torchvision model",
    )
  return rows


def infer_arch(shapes: Mapping[str, tuple]) -> tuple[str, tuple[int, ...]]:
  """(arch, layers_to_crop) of a torchvision-layout state_dict from its key shapes.

  Blocks per stage from the `layerS.I.` keys, Bottleneck if `layer1.0.conv3.weight` exists,
  groups and width from `layer1.0.conv2.weight` [width, width / groups, 3, 3], cropped stages
  from absent layer3/layer4 keys; then every key and shape is checked against that arch. The
  classifier of a torchvision file (fc.*) is ignored. With layer3 and layer4 cropped, resnet50
  and resnet101 are the same network: the first table match (resnet50) is named.
  """
  shapes = {k: tuple(v) for k, v in shapes.items()}
  found = _names(shapes)
  if "conv1.weight" not in shapes or "layer1.0.conv2.weight" not in shapes:
    raise UserError(
      f"not a torchvision ResNet state_dict: no conv1.weight or "
      f"layer1.0.conv2.weight (found {found})",
      "keys must be relative to the torchvision model",
    )
  blocks = []
  for s in (1, 2, 3, 4):
    idx = {int(m.group(1)) for k in shapes for m in [re.match(rf"layer{s}\.(\d+)\.", k)] if m}
    if idx and idx != set(range(len(idx))):
      raise UserError(f"layer{s} has blocks {sorted(idx)}: not numbered 0..n-1")
    blocks.append(len(idx))
  crop = {(True, True): (), (True, False): (4,), (False, False): (3, 4)}.get(
    (blocks[2] > 0, blocks[3] > 0)
  )
  if crop is None or not blocks[0] or not blocks[1]:
    raise UserError(
      f"ResNet stages with blocks {blocks} (layer1..layer4): a stage is missing "
      "that the official wrapper keeps",
      "only layer4, or layer3 and layer4, crop",
    )
  block = "bottleneck" if "layer1.0.conv3.weight" in shapes else "basic"
  conv2 = shapes["layer1.0.conv2.weight"]
  if len(conv2) != 4 or conv2[1] == 0 or conv2[0] % conv2[1]:
    raise UserError(f"layer1.0.conv2.weight has shape {conv2}: not a ResNet 3x3 conv")
  groups = conv2[0] // conv2[1]
  width_per_group = conv2[0] // groups if block == "bottleneck" else 64
  kept = tuple(b for b in blocks if b)
  for arch, spec in VARIANTS.items():
    if (spec["block"], spec["layers"][: len(kept)], spec["groups"], spec["width_per_group"]) == (
      block,
      kept,
      groups,
      width_per_group,
    ):
      _check_keys(shapes, arch, crop, allow_extra=False)
      return arch, crop
  raise UserError(
    f"no known ResNet has {block} blocks {list(kept)}, groups {groups}, width per "
    f"group {width_per_group} (from layer1.0.conv2.weight {conv2})",
    f"known: {', '.join(VARIANTS)}",
  )


def _to_flax(x: np.ndarray, kind: str) -> np.ndarray:
  if kind == CONV:
    return np.ascontiguousarray(np.asarray(x, np.float32).transpose(2, 3, 1, 0))
  if kind == INT:
    v = int(np.asarray(x))
    if not 0 <= v < 2**31:
      raise UserError(f"num_batches_tracked {v} does not fit int32")
    return np.asarray(v, np.int32)
  return np.array(x, np.float32)


def _to_torch(x: np.ndarray, kind: str) -> np.ndarray:
  if kind == CONV:
    return np.ascontiguousarray(np.asarray(x, np.float32).transpose(3, 2, 0, 1))
  if kind == INT:
    return np.asarray(x, np.int64)
  return np.array(x, np.float32)


def state_dict_to_variables(
  state_dict: Mapping[str, np.ndarray], arch: str, layers_to_crop: Iterable[int] = ()
) -> dict:
  """torchvision-layout state_dict -> {"params": ..., "batch_stats": ...} (numpy).

  Keys of cropped stages and fc.* may be present (a full torchvision file): the wrapper
  discards them after loading; any other difference is an error naming the keys.
  """
  crop = check_crop(layers_to_crop)
  rows = _check_keys({k: np.shape(v) for k, v in state_dict.items()}, arch, crop, allow_extra=True)
  out: dict = {"params": {}, "batch_stats": {}}
  for tkey, coll, path, kind, _ in rows:
    node = out[coll]
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = _to_flax(state_dict[tkey], kind)
  return out


def variables_to_state_dict(
  variables: Mapping, arch: str, layers_to_crop: Iterable[int] = ()
) -> "collections.OrderedDict[str, np.ndarray]":
  """{"params", "batch_stats"} -> torchvision-layout state_dict (numpy, torchvision's order)."""
  out = collections.OrderedDict()
  for tkey, coll, path, kind, _ in _rows(arch, check_crop(layers_to_crop)):
    node = variables[coll]
    for p in path:
      node = node[p]
    out[tkey] = _to_torch(np.asarray(node), kind)
  return out
