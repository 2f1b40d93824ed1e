"""PyTorch state_dict <-> Flax params for DINOv2 SALAD, with a strict two-way key/shape check.

A state_dict here is a flat mapping from the official keys (`backbone.model.blocks.3.attn.qkv.
weight`, `aggregator.score.0.weight`, ...) to numpy arrays. Files are read and written by
`salad_jax.weights` (safe unpickling, tensor checks, the writer marker).
"""

from __future__ import annotations

import collections
import functools
from typing import Iterable, Mapping

import jax
import numpy as np

from salad_jax.files import paths
from salad_jax.models import vit
from salad_jax.models.vpr import ModelConfig, VPRModel
from salad_jax.weights import torch_files

BACKBONE = "backbone.model."
AGGREGATOR = "aggregator."
_WIDTH_TO_VARIANT = {
  spec["width"]: name for name, spec in vit.VARIANTS.items()
}  # widths are unique

# kinds of tensors and how a torch tensor becomes a Flax leaf
_LINEAR, _CONV1X1, _PATCH, _RAW = "linear", "conv1x1", "patch", "raw"


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


def _aggregator_layout() -> list[tuple[str, tuple[str, ...], str]]:
  rows = [("dust_bin", ("dust_bin",), _RAW)]
  for name, idx, kind in [
    ("token_features", (0, 2), _LINEAR),
    ("cluster_features", (0, 3), _CONV1X1),
    ("score", (0, 3), _CONV1X1),
  ]:
    for i in idx:
      rows += [
        (f"{name}.{i}.weight", (f"{name}_{i}", "kernel"), kind),
        (f"{name}.{i}.bias", (f"{name}_{i}", "bias"), _RAW),
      ]
  return rows


def layout(config: ModelConfig, backbone_only: bool = False):
  """(torch key, flax path, kind) rows in the official state_dict order."""
  rows = [(BACKBONE + t, ("backbone",) + f, k) for t, f, k in _backbone_layout(config)]
  if not backbone_only:
    rows += [(AGGREGATOR + t, ("aggregator",) + f, k) for t, f, k in _aggregator_layout()]
  return rows


def _to_flax(x: np.ndarray, kind: str) -> np.ndarray:
  if kind == _LINEAR:
    return x.T
  if kind == _CONV1X1:
    return x[:, :, 0, 0].T
  if kind == _PATCH:
    return x.transpose(2, 3, 1, 0)
  return x


def _to_torch(x: np.ndarray, kind: str) -> np.ndarray:
  if kind == _LINEAR:
    return x.T
  if kind == _CONV1X1:
    return x.T[:, :, None, None]
  if kind == _PATCH:
    return x.transpose(3, 2, 0, 1)
  return x


def torch_shape(flax_shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
  return _to_torch(np.empty(flax_shape, np.uint8), kind).shape


def _format_keys(keys: Iterable[str], limit: int = 20) -> str:
  keys = sorted(keys)
  more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
  return ", ".join(keys[:limit]) + more


def check_state_dict(state_dict: Mapping[str, np.ndarray], rows, expected_shapes) -> None:
  """Raises CheckpointMismatchError listing missing, unexpected and mis-shaped keys."""
  want = {t: torch_shape(expected_shapes[f], k) for t, f, k in rows}
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
def param_shapes(config: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flax param path -> shape for `config` (traced once per config; do not mutate)."""
  x = jax.ShapeDtypeStruct((1, 224, 224, 3), np.float32)
  shapes = jax.eval_shape(lambda r, x: VPRModel(config).init(r, x), jax.random.key(0), x)["params"]
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    flat[tuple(p.key for p in path)] = tuple(leaf.shape)
  return flat


def torch_to_params(
  state_dict: Mapping[str, np.ndarray], config: ModelConfig, backbone_only: bool = False
) -> dict:
  """Official-layout state_dict -> nested Flax param dict (numpy float32).

  With `backbone_only`, only `backbone.model.*` keys are expected and the result holds only the
  `backbone` subtree (the head then starts from a fresh init).
  """
  shapes = param_shapes(config)
  rows = layout(config, backbone_only)
  model_paths = {p for p in shapes if not backbone_only or p[0] == "backbone"}
  table_paths = {f for _, f, _ in rows}
  assert model_paths == table_paths, (
    f"conversion table out of sync with the model: {sorted(model_paths ^ table_paths)}"
  )
  check_state_dict(state_dict, rows, shapes)
  params: dict = {}
  for tkey, fpath, kind in rows:
    node = params
    for p in fpath[:-1]:
      node = node.setdefault(p, {})
    node[fpath[-1]] = np.array(_to_flax(np.asarray(state_dict[tkey], np.float32), kind), order="C")
  return params


def params_to_torch(
  params: Mapping, config: ModelConfig
) -> "collections.OrderedDict[str, np.ndarray]":
  """Nested Flax params -> state_dict in the official key order (numpy float32)."""
  flat = {}

  def walk(node, prefix):
    for k, v in node.items():
      if isinstance(v, Mapping):
        walk(v, prefix + (k,))
      else:
        flat[prefix + (k,)] = np.asarray(v)

  walk(params, ())
  rows = layout(config)
  paths = {f for _, f, _ in rows}
  missing, extra = paths - set(flat), set(flat) - paths
  if missing or extra:
    raise CheckpointMismatchError(
      "params do not match the model config: "
      f"in model, not in params: {_format_keys('/'.join(p) for p in missing)} | "
      f"in params, not in model: {_format_keys('/'.join(p) for p in extra)}"
    )
  out = collections.OrderedDict()
  for tkey, fpath, kind in rows:
    out[tkey] = np.array(_to_torch(flat[fpath].astype(np.float32), kind), order="C")
  return out


# ------------------------------------------------------------------------------------ files
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


def infer_config(state_dict: Mapping[str, np.ndarray], **overrides) -> tuple[ModelConfig, bool]:
  """Model config implied by a state_dict's shapes; returns (config, backbone_only).

  Accepts a SALAD checkpoint (`backbone.model.*` + `aggregator.*`) or a plain DINOv2 hub file.
  Each size is the one most tensors carrying it agree on (`_vote`).
  """
  keys = set(state_dict)
  if any(k.startswith(BACKBONE) for k in keys):
    prefix, backbone_only = BACKBONE, not any(k.startswith(AGGREGATOR) for k in keys)
  elif "cls_token" in keys and "pos_embed" in keys:
    prefix, backbone_only = "", True
  else:
    raise CheckpointMismatchError(
      "not a SALAD or DINOv2 checkpoint: expected keys 'backbone.model.*' and 'aggregator.*' "
      f"(SALAD) or 'cls_token', 'pos_embed', 'blocks.*' (DINOv2); found {_format_keys(keys, 8)}"
    )
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
  cfg = dict(variant=_WIDTH_TO_VARIANT[width], registers=prefix + "register_tokens" in keys)
  if not backbone_only:
    a = AGGREGATOR
    hidden = [
      (a + k, 0)
      for k in (
        "score.0.weight",
        "score.0.bias",
        "cluster_features.0.weight",
        "cluster_features.0.bias",
        "token_features.0.weight",
        "token_features.0.bias",
      )
    ]
    hidden += [
      (a + k, 1) for k in ("score.3.weight", "cluster_features.3.weight", "token_features.2.weight")
    ]
    cfg.update(
      num_clusters=_vote(
        state_dict, "num_clusters", [(a + "score.3.weight", 0), (a + "score.3.bias", 0)]
      ),
      cluster_dim=_vote(
        state_dict,
        "cluster_dim",
        [(a + "cluster_features.3.weight", 0), (a + "cluster_features.3.bias", 0)],
      ),
      token_dim=_vote(
        state_dict,
        "token_dim",
        [(a + "token_features.2.weight", 0), (a + "token_features.2.bias", 0)],
      ),
      hidden_dim=_vote(state_dict, "hidden_dim", hidden),
    )
  cfg.update(overrides)
  return ModelConfig(**cfg), backbone_only


def read_checkpoint(path: str, **overrides) -> tuple[dict, ModelConfig, bool, dict]:
  """Reads a torch/safetensors checkpoint -> (params, config, backbone_only, source info)."""
  sd = torch_files.read_state_dict(path)
  if "cls_token" in sd and not any(k.startswith(BACKBONE) for k in sd):  # plain DINOv2 hub file
    sd = {BACKBONE + k: v for k, v in sd.items()}
  config, backbone_only = infer_config(sd, **overrides)
  params = torch_to_params(sd, config, backbone_only)
  source = {
    "file": paths.absolute(path),
    "sha256": torch_files.sha256(path),
    "kind": "dinov2" if backbone_only else "salad",
  }
  return params, config, backbone_only, source


def write_torch_checkpoint(
  path: str, params: Mapping, config: ModelConfig, overwrite: bool = False
) -> None:
  """Writes params as a flat state_dict (.pth/.ckpt via torch, or .safetensors).

  An existing `path` is replaced only with `overwrite` and only if salad_jax wrote it.
  """
  torch_files.check_file_destination(path, overwrite)
  torch_files.write_state_dict(path, params_to_torch(params, config))
