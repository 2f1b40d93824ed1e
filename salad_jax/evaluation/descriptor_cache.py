"""Descriptor cache: an eval set's database (and query) descriptors on disk, reused when nothing
that decides them has changed.

The key: the params checksum (`salad_jax.integrity.params_checksum`), the model config fields
that change the forward pass (shapes and compute dtype), the image size, and the image files with
their sizes and modification times. One `.npz` per (role, file list, image size, dtype, params):
a change of the files' sizes or times rewrites the same entry, a change of checkpoint, size or
dtype makes another. The entry holds the full key and the sha256 of the descriptors; it is
written to a temporary file and renamed into place (atomic), so a reader sees a whole entry or
none. On read, a key that differs, a truncated or unreadable file, or a checksum that does not
match is reported and the descriptors are recomputed: a doubtful entry is never used.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Sequence

import jax
import numpy as np

from salad_jax.errors import UserError
from salad_jax.files import atomic
from salad_jax.files.destinations import check_dir

FORMAT_VERSION = 1
PREFIX = "salad_desc_"


def _sha(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def file_fingerprint(paths: Sequence[str]) -> list[list]:
  """[[absolute path, size in bytes, mtime in ns], ...] in the order of `paths`."""
  out = []
  for p in paths:
    st = os.stat(p)
    out.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
  return out


def cache_key(params_checksum: str, model_config, image_size, paths: Sequence[str]) -> dict:
  model = model_config.fields(model_config.descriptor_fields())  # the checksum: the weights
  return {
    "format": FORMAT_VERSION,
    "params": params_checksum,
    "model": model,
    "image_size": [int(image_size[0]), int(image_size[1])],
    "num_files": len(paths),
    "files": _sha(file_fingerprint(paths)),
  }


def entry_path(cache_dir: str, role: str, key: dict, paths: Sequence[str]) -> str:
  h, w = key["image_size"]
  names = _sha([os.path.abspath(p) for p in paths])[:12]
  params = key["params"].split(":")[-1][:12]
  return os.path.join(
    cache_dir, f"{PREFIX}{role}_{h}x{w}_{key['model']['dtype']}_{params}_{names}.npz"
  )


def read_entry(path: str, key: dict) -> tuple[np.ndarray | None, str]:
  """(descriptors, "") for a sound entry made with `key`; else (None, why it is not used)."""
  if not os.path.exists(path):
    return None, ""
  try:
    with np.load(path, allow_pickle=False) as z:
      meta = json.loads(bytes(z["meta"]).decode())
      desc = np.asarray(z["descriptors"])
  except Exception as e:  # truncated, not a zip, bad CRC, missing member: never trusted
    return None, f"unreadable ({type(e).__name__}: {str(e)[:80]})"
  if not isinstance(meta, dict) or "key" not in meta:
    return None, "no metadata"
  if meta["key"] != key:
    diff = sorted(k for k in set(key) | set(meta["key"]) if key.get(k) != meta["key"].get(k))
    what = {"files": "image files changed (size or modification time)", "params": "other weights"}
    return None, "made for other inputs: " + ", ".join(what.get(k, k) for k in diff)
  if desc.dtype != np.float32 or desc.ndim != 2 or desc.shape[0] != key["num_files"]:
    return None, f"descriptors of shape {desc.shape} / {desc.dtype} for {key['num_files']} files"
  if hashlib.sha256(np.ascontiguousarray(desc).tobytes()).hexdigest() != meta.get("sha256"):
    return None, "checksum mismatch (corrupt)"
  return desc, ""


def write_entry(path: str, key: dict, desc: np.ndarray) -> None:
  """Writes atomically: a temporary file in the same folder, fsync, then rename."""
  desc = np.ascontiguousarray(desc, np.float32)
  meta = {
    "key": key,
    "sha256": hashlib.sha256(desc.tobytes()).hexdigest(),
    "shape": list(desc.shape),
  }
  if os.path.lexists(path) and not os.path.isfile(path):
    raise UserError(
      f"cache entry {path} is not a regular file", "remove it or use another --cache_dir"
    )
  with atomic.new_file(path) as tmp, open(tmp, "wb") as f:  # a fresh name beside it, then rename
    np.savez(f, descriptors=desc, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
    f.flush()
    os.fsync(f.fileno())


def _all_agree(hit: bool) -> bool:
  """With several processes, use the cache only if every process found a sound entry."""
  if jax.process_count() == 1:
    return hit
  from jax.experimental import multihost_utils

  return bool(np.all(multihost_utils.process_allgather(np.int32(hit))))


class DescriptorCache:
  """`get(role, paths, compute)`: descriptors from the cache, or `compute()` and store them."""

  def __init__(
    self,
    cache_dir: str,
    params_checksum: str,
    model_config,
    image_size,
    log: Callable[[str], None] = print,
  ):
    self.dir = check_dir(cache_dir, "--cache_dir")
    self.params_checksum, self.model_config = params_checksum, model_config
    self.image_size = tuple(image_size)
    self.log = log
    self.hits = self.misses = 0

  def get(
    self, role: str, paths: Sequence[str], compute: Callable[[], np.ndarray], label: str = ""
  ) -> np.ndarray:
    key = cache_key(self.params_checksum, self.model_config, self.image_size, paths)
    path = entry_path(self.dir, role, key, paths)
    desc, why = read_entry(path, key)
    main = jax.process_index() == 0
    name = f"{label} {role}".strip()
    if _all_agree(desc is not None):
      self.hits += 1
      if main:
        self.log(f"{name}: {len(desc)} descriptors from the cache, extraction skipped ({path})")
      return desc
    self.misses += 1
    if main and why:
      self.log(f"{name}: cache entry not used, {why}; recomputing ({path})")
    desc = compute()
    if main:
      write_entry(path, key, desc)
      self.log(f"{name}: {len(desc)} descriptors extracted and cached ({path})")
    return desc
