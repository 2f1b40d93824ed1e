"""Descriptor cache: an eval set's database (and query) descriptors on disk, reused when nothing
that decides them has changed.

The key: the params checksum (`salad_jax.weights.checksum.params_checksum`), the model config
fields that change the forward pass (shapes and compute dtype), the image size, and each image
file's identity: its path, size, modification time, change time (ctime), inode and device. Size
and mtime alone are no identity: a file rewritten with other bytes of the same size and its
mtime set back (`os.utime`, `cp -p`, `rsync -t`, an archive extraction) looked unchanged. The
kernel sets ctime to the present on every write, rename into place, chmod or utime, and no call
sets it back; a file replaced by a rename has another inode. The cost is the same one `stat` per
file as before; a content hash would be certain but reads every image (docs/evaluate.md has the
figures). A false miss (a copied or hard-linked image folder, a chmod) recomputes; nothing
stale is served.

One `.npz` per (role, file list, image size, dtype, params): a change of the files rewrites the
same entry, a change of checkpoint, size or dtype makes another. The entry holds the full key
and the sha256 of the descriptors; it is written to a temporary file and renamed into place
(atomic; one upload on gs://), so a reader sees a whole entry or none. On read, a key that
differs, a truncated or unreadable file, or a checksum that does not match is reported and the
descriptors are recomputed: a doubtful entry is never used.

What can be checked before the extraction is (`DescriptorCache.get`): an entry path that is a
folder or another non-file, a cache folder that cannot be written, a disk without room for the
entry. Each is a warning and the descriptors are computed without being cached; a write that
fails after the extraction is a warning too: the cache never costs a result.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Sequence

import jax
import numpy as np

from salad_jax import errors
from salad_jax.errors import UserError
from salad_jax.files import atomic, paths
from salad_jax.files.destinations import check_dir

FORMAT_VERSION = 2  # 2: files identified by size, mtime, ctime, inode and device
PREFIX = "salad_desc_"


def _sha(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def file_fingerprint(files: Sequence[str]) -> list[list]:
  """[[absolute path, size, mtime ns, ctime ns, inode, device], ...] in the order of `files`."""
  out = []
  for p in files:
    st = os.stat(p)
    out.append(
      [os.path.abspath(p), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
    )
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


def entry_path(cache_dir: str, role: str, key: dict, files: Sequence[str]) -> str:
  h, w = key["image_size"]
  names = _sha([os.path.abspath(p) for p in files])[:12]
  params = key["params"].split(":")[-1][:12]
  return paths.join(
    cache_dir, f"{PREFIX}{role}_{h}x{w}_{key['model']['dtype']}_{params}_{names}.npz"
  )


def read_entry(path: str, key: dict) -> tuple[np.ndarray | None, str]:
  """(descriptors, "") for a sound entry made with `key`; else (None, why it is not used)."""
  if not paths.isfile(path):
    return None, ""
  try:
    with paths.open_read(path, "rb") as f, np.load(f, allow_pickle=False) as z:
      meta = json.loads(bytes(z["meta"]).decode())
      desc = np.asarray(z["descriptors"])
  except Exception as e:  # truncated, not a zip, bad CRC, missing member: never trusted
    return None, f"unreadable ({type(e).__name__}: {str(e)[:80]})"
  if not isinstance(meta, dict) or "key" not in meta:
    return None, "no metadata"
  if meta["key"] != key:
    diff = sorted(k for k in set(key) | set(meta["key"]) if key.get(k) != meta["key"].get(k))
    what = {
      "files": "image files changed (rewritten, replaced or touched)",
      "params": "other weights",
    }
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
  not_file = _not_a_file(path)
  if not_file:
    raise UserError(not_file, "remove it or use another --cache_dir")
  with atomic.new_file(path) as tmp, open(tmp, "wb") as f:  # a fresh name beside it, then rename
    np.savez(f, descriptors=desc, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
    f.flush()
    os.fsync(f.fileno())


def _not_a_file(path: str) -> str:
  """Why a cache entry cannot be written at `path` ('' if it can: absent or a regular file)."""
  if paths.islink(path):
    return f"cache entry {path} is a symbolic link"
  if paths.lexists(path) and not paths.isfile(path):
    return f"cache entry {path} is a folder or another non-file"
  return ""


def entry_bytes(num: int, dim: int) -> int:
  """The size of an entry of `num` descriptors of `dim` floats (data, key, zip headers)."""
  return num * dim * 4 + (64 << 10)


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

  def writable(self, path: str, num: int) -> str:
    """'' if an entry of `num` descriptors can be written at `path`, else why not: checked
    before the extraction (hours at MSLS scale), so that nothing is learnt only after it."""
    why = _not_a_file(path)
    if why:
      return why
    try:
      atomic.check_space(path, entry_bytes(num, self.model_config.descriptor_dim))
      atomic.probe(path)
    except UserError as e:
      return e.message
    return ""

  def get(
    self, role: str, files: Sequence[str], compute: Callable[[], np.ndarray], label: str = ""
  ) -> np.ndarray:
    key = cache_key(self.params_checksum, self.model_config, self.image_size, files)
    path = entry_path(self.dir, role, key, files)
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
    unwritable = self.writable(path, len(files)) if main else ""
    if unwritable:
      errors.warning(f"{name}: {unwritable}; the descriptors are computed but will not be cached")
    desc = compute()
    if main and not unwritable:
      try:
        write_entry(path, key, desc)
      except (OSError, UserError) as e:  # a full disk at this moment, ...: the result stands
        errors.warning(
          f"{name}: caching the descriptors failed ({e.message if isinstance(e, UserError) else e})"
          "; the result is not affected"
        )
      else:
        self.log(f"{name}: {len(desc)} descriptors extracted and cached ({path})")
    return desc
