"""PyTorch state_dict <-> Flax params for DINOv2 SALAD, with a strict two-way key/shape check.

A state_dict here is a flat mapping from the official keys (`backbone.model.blocks.3.attn.qkv.
weight`, `aggregator.score.0.weight`, ...) to numpy arrays. Reading `.ckpt/.pth` files needs torch
(the `torch` extra) and only ever uses `torch.load(weights_only=True)`: a pickle that carries code
is refused, never run. `.safetensors` files are read without torch.
"""

from __future__ import annotations

import collections
import hashlib
import os
from typing import Iterable, Mapping

import numpy as np

from salad_jax.models import vit
from salad_jax.models.vpr import ModelConfig

BACKBONE = "backbone.model."
AGGREGATOR = "aggregator."
_WIDTH_TO_VARIANT = {spec["width"]: name for name, spec in vit.VARIANTS.items()}  # widths are unique

# kinds of tensors and how a torch tensor becomes a Flax leaf
_LINEAR, _CONV1X1, _PATCH, _RAW = "linear", "conv1x1", "patch", "raw"


class CheckpointMismatchError(ValueError):
  """The checkpoint's keys or shapes do not match the model."""


def _backbone_layout(config: ModelConfig) -> list[tuple[str, tuple[str, ...], str]]:
  spec = vit.decode_variant(config.variant)
  rows = [("cls_token", ("cls_token",), _RAW), ("pos_embed", ("pos_embed",), _RAW)]
  if config.registers:
    rows.append(("register_tokens", ("register_tokens",), _RAW))
  rows += [("mask_token", ("mask_token",), _RAW),
           ("patch_embed.proj.weight", ("patch_embed", "proj", "kernel"), _PATCH),
           ("patch_embed.proj.bias", ("patch_embed", "proj", "bias"), _RAW)]
  ffn = ("w12", "w3") if spec["ffn"] == "swiglu" else ("fc1", "fc2")

  def linear(tkey, fpath):
    return [(f"{tkey}.weight", fpath + ("kernel",), _LINEAR), (f"{tkey}.bias", fpath + ("bias",), _RAW)]

  def norm(tkey, fpath):
    return [(f"{tkey}.weight", fpath + ("scale",), _RAW), (f"{tkey}.bias", fpath + ("bias",), _RAW)]

  for i in range(spec["depth"]):
    t, f = f"blocks.{i}", (f"blocks_{i}",)
    rows += norm(f"{t}.norm1", f + ("norm1",))
    rows += linear(f"{t}.attn.qkv", f + ("attn", "qkv")) + linear(f"{t}.attn.proj", f + ("attn", "proj"))
    rows.append((f"{t}.ls1.gamma", f + ("ls1", "gamma"), _RAW))
    rows += norm(f"{t}.norm2", f + ("norm2",))
    rows += linear(f"{t}.mlp.{ffn[0]}", f + ("mlp", ffn[0])) + linear(f"{t}.mlp.{ffn[1]}", f + ("mlp", ffn[1]))
    rows.append((f"{t}.ls2.gamma", f + ("ls2", "gamma"), _RAW))
  rows += norm("norm", ("norm",))
  return rows


def _aggregator_layout() -> list[tuple[str, tuple[str, ...], str]]:
  rows = [("dust_bin", ("dust_bin",), _RAW)]
  for name, idx, kind in [("token_features", (0, 2), _LINEAR), ("cluster_features", (0, 3), _CONV1X1),
                          ("score", (0, 3), _CONV1X1)]:
    for i in idx:
      rows += [(f"{name}.{i}.weight", (f"{name}_{i}", "kernel"), kind),
               (f"{name}.{i}.bias", (f"{name}_{i}", "bias"), _RAW)]
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
  bad = [f"{t}: checkpoint {tuple(np.shape(state_dict[t]))}, model {want[t]}"
         for t in want if t in state_dict and tuple(np.shape(state_dict[t])) != want[t]]
  if missing or unexpected or bad:
    lines = ["checkpoint does not match the model:"]
    if missing:
      lines.append(f"  in model, not in checkpoint ({len(missing)}): {_format_keys(missing)}")
    if unexpected:
      lines.append(f"  in checkpoint, not in model ({len(unexpected)}): {_format_keys(unexpected)}")
    if bad:
      lines.append(f"  shape mismatches ({len(bad)}): " + "; ".join(sorted(bad)[:20]))
    raise CheckpointMismatchError("\n".join(lines))


def _param_shapes(config: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  import jax  # local: keeps `convert` importable without initialising a backend
  from salad_jax.models.vpr import VPRModel
  x = jax.ShapeDtypeStruct((1, 224, 224, 3), np.float32)
  shapes = jax.eval_shape(lambda r, x: VPRModel(config).init(r, x), jax.random.key(0), x)["params"]
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    flat[tuple(p.key for p in path)] = tuple(leaf.shape)
  return flat


def torch_to_params(state_dict: Mapping[str, np.ndarray], config: ModelConfig,
                    backbone_only: bool = False) -> dict:
  """Official-layout state_dict -> nested Flax param dict (numpy float32).

  With `backbone_only`, only `backbone.model.*` keys are expected and the result holds only the
  `backbone` subtree (the head then starts from a fresh init).
  """
  shapes = _param_shapes(config)
  rows = layout(config, backbone_only)
  model_paths = {p for p in shapes if not backbone_only or p[0] == "backbone"}
  table_paths = {f for _, f, _ in rows}
  assert model_paths == table_paths, (
      f"conversion table out of sync with the model: {sorted(model_paths ^ table_paths)}")
  check_state_dict(state_dict, rows, shapes)
  params: dict = {}
  for tkey, fpath, kind in rows:
    node = params
    for p in fpath[:-1]:
      node = node.setdefault(p, {})
    node[fpath[-1]] = np.array(_to_flax(np.asarray(state_dict[tkey], np.float32), kind), order="C")
  return params


def params_to_torch(params: Mapping, config: ModelConfig) -> "collections.OrderedDict[str, np.ndarray]":
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
        "params do not match the model config:\n"
        f"  in model, not in params: {_format_keys('/'.join(p) for p in missing)}\n"
        f"  in params, not in model: {_format_keys('/'.join(p) for p in extra)}")
  out = collections.OrderedDict()
  for tkey, fpath, kind in rows:
    out[tkey] = np.array(_to_torch(flat[fpath].astype(np.float32), kind), order="C")
  return out


# ------------------------------------------------------------------------------------ files
TORCH_SUFFIXES = (".ckpt", ".pth", ".pt", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"


def sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _import_torch():
  try:
    import torch
  except ImportError as e:
    raise ImportError("reading a PyTorch .ckpt/.pth needs torch: pip install 'salad-jax[torch]' "
                      "(or convert the file to .safetensors elsewhere)") from e
  return torch


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a flat state_dict (numpy float32) from .ckpt/.pth/.pt/.bin or .safetensors.

  A Lightning-style dict is unwrapped through its `state_dict` key.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint file not found: {path}")
  if path.endswith(SAFETENSORS_SUFFIX):
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
      raw = load_file(path)
    except (SafetensorError, ValueError, OSError) as e:
      raise ValueError(f"{path} is not a readable .safetensors file: {e}") from e
  else:
    torch = _import_torch()
    try:
      obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
      msg = str(e)
      detail = next((ln.strip() for ln in msg.splitlines() if "Unsupported" in ln), "")
      detail = detail.split(". Please")[0].replace("WeightsUnpickler error: ", "")
      if "Unsupported global" in msg:
        raise ValueError(
            f"refusing to load {path}: the pickle references Python code or objects beyond "
            f"tensors and plain containers ({detail}); it was not executed. If you trust the "
            "file, re-save its state_dict: torch.save(obj['state_dict'], 'clean.pth')") from e
      reason = detail or (msg.splitlines()[0] if msg else type(e).__name__)
      raise ValueError(f"{path} is not a PyTorch checkpoint torch can read safely ({reason}); "
                       "nothing in it was executed") from e
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
      obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
      raise ValueError(f"{path} holds a {type(obj).__name__}, not a state_dict (a mapping of "
                       "parameter names to tensors)")
    raw = {}
    for k, v in obj.items():
      if not isinstance(v, torch.Tensor):
        raise ValueError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor; "
                         "expected a flat state_dict")
      raw[k] = v.detach().to(torch.float32).numpy()
  return {k: np.asarray(v, np.float32) for k, v in raw.items()}


def infer_config(state_dict: Mapping[str, np.ndarray], **overrides) -> tuple[ModelConfig, bool]:
  """Model config implied by a state_dict's shapes; returns (config, backbone_only).

  Accepts a SALAD checkpoint (`backbone.model.*` + `aggregator.*`) or a plain DINOv2 hub file.
  """
  keys = set(state_dict)
  if any(k.startswith(BACKBONE) for k in keys):
    prefix, backbone_only = BACKBONE, not any(k.startswith(AGGREGATOR) for k in keys)
  elif "cls_token" in keys and "pos_embed" in keys:
    prefix, backbone_only = "", True
  else:
    raise CheckpointMismatchError(
        "not a SALAD or DINOv2 checkpoint: expected keys 'backbone.model.*' and 'aggregator.*' "
        f"(SALAD) or 'cls_token', 'pos_embed', 'blocks.*' (DINOv2); found {_format_keys(keys, 8)}")
  try:
    width = state_dict[prefix + "cls_token"].shape[-1]
  except KeyError:
    raise CheckpointMismatchError(f"checkpoint has no {prefix}cls_token") from None
  if width not in _WIDTH_TO_VARIANT:
    raise CheckpointMismatchError(f"embedding width {width} is not a DINOv2 ViT/14 "
                                  f"({sorted(_WIDTH_TO_VARIANT)})")
  cfg = dict(variant=_WIDTH_TO_VARIANT[width], registers=prefix + "register_tokens" in keys)
  if not backbone_only:
    a = AGGREGATOR
    try:
      cfg.update(num_clusters=state_dict[a + "score.3.weight"].shape[0],
                 cluster_dim=state_dict[a + "cluster_features.3.weight"].shape[0],
                 token_dim=state_dict[a + "token_features.2.weight"].shape[0],
                 hidden_dim=state_dict[a + "score.0.weight"].shape[0])
    except KeyError as e:
      raise CheckpointMismatchError(f"SALAD checkpoint lacks {e.args[0]}") from None
  cfg.update(overrides)
  return ModelConfig(**cfg), backbone_only


def read_checkpoint(path: str, **overrides) -> tuple[dict, ModelConfig, bool, dict]:
  """Reads a torch/safetensors checkpoint -> (params, config, backbone_only, source info)."""
  sd = read_state_dict(path)
  if "cls_token" in sd and not any(k.startswith(BACKBONE) for k in sd):  # plain DINOv2 hub file
    sd = {BACKBONE + k: v for k, v in sd.items()}
  config, backbone_only = infer_config(sd, **overrides)
  params = torch_to_params(sd, config, backbone_only)
  source = {"file": os.path.abspath(path), "sha256": sha256(path),
            "kind": "dinov2" if backbone_only else "salad"}
  return params, config, backbone_only, source


def write_torch_checkpoint(path: str, params: Mapping, config: ModelConfig) -> None:
  """Writes params as a flat state_dict (.pth/.ckpt via torch, or .safetensors)."""
  sd = params_to_torch(params, config)
  tmp = path + ".tmp"
  if path.endswith(SAFETENSORS_SUFFIX):
    from safetensors.numpy import save_file
    save_file(dict(sd), tmp)
  else:
    torch = _import_torch()
    torch.save(collections.OrderedDict((k, torch.from_numpy(v)) for k, v in sd.items()), tmp)
  os.replace(tmp, path)
