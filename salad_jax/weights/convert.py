"""PyTorch state_dict <-> Flax variables for every backbone x head, with a strict two-way
key/shape check.

A state_dict here is a flat mapping from the official keys of serizba/salad's VPRModel
(`backbone.model.blocks.3.attn.qkv.weight`, `backbone.model.layer1.0.bn1.running_var`,
`aggregator.score.0.weight`, ...) to numpy arrays; a ResNet's BatchNorm buffers become the
`batch_stats` collection. The conversion table (`variable_layout`) is the ViT's rows here, the
ResNet's and each head's from their modules' `torch_layout`. Which model a state_dict holds is
`salad_jax.weights.infer`'s to say; files are read and written by `salad_jax.weights`
(`torch_files`: safe unpickling, tensor checks, the writer marker).
"""

from __future__ import annotations

import collections
import functools
from typing import Iterable, Mapping

import jax
import numpy as np

from salad_jax.models import convap, cosplace, gem, mixvpr, netvlad, resnet_layout, salad, vit
from salad_jax.models.config import ModelConfig
from salad_jax.models.vpr import VPRModel
from salad_jax.weights import torch_files

BACKBONE = "backbone.model."
AGGREGATOR = "aggregator."

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


_RESNET_KINDS = {resnet_layout.CONV: _CONV, resnet_layout.RAW: _RAW, resnet_layout.INT: _INT}


def variable_layout(
  config: ModelConfig, backbone_only: bool = False
) -> list[tuple[str, str, tuple[str, ...], str]]:
  """(torch key, collection, flax path, kind) rows in the official state_dict order: the
  params and, for a ResNet, its BatchNorm buffers (collection `batch_stats`)."""
  if config.is_resnet:
    rows = [
      (BACKBONE + t, coll, ("backbone",) + f, _RESNET_KINDS[k])
      for t, coll, f, k in resnet_layout.torch_layout(config.backbone, config.layers_to_crop)
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


def format_keys(keys: Iterable[str], limit: int = 20) -> str:
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
      parts.append(f"in model, not in checkpoint ({len(missing)}): {format_keys(missing)}")
    if unexpected:
      parts.append(f"in checkpoint, not in model ({len(unexpected)}): {format_keys(unexpected)}")
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
    dropped = {BACKBONE + k for k in resnet_layout.DROPPED}
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
      f"in model, not in params: {format_keys('/'.join(p) for p in missing)} | "
      f"in params, not in model: {format_keys('/'.join(p) for p in extra)}"
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


# ------------------------------------------------------------------------------ files
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
