"""The index file: an `.npz` read with `allow_pickle=False`, so nothing in it runs when loaded.

Arrays: `metadata` (JSON as bytes: format, version, kind, count, dims, nprobe, PCA settings),
`paths` (JSON list as bytes), then the vectors of an exact index (float32 [N, dim]) or faiss's
serialization of an IVF index (uint8, its SHA-256 in the metadata, checked before faiss parses
it), and the PCA's `pca_mean`, `pca_components`, `pca_scale` where there is one.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile

import numpy as np

from salad_jax.errors import UserError
from salad_jax.files import atomic, destinations
from salad_jax.files import paths as files_paths
from salad_jax.index.pca import PCA

FORMAT = "salad_jax.index"
VERSION = 1
KINDS = ("exact", "ivf", "ivfpq")


def write(index, path: str, overwrite: bool = False) -> None:
  """`Index.save`: writes the index to `path` (an .npz) atomically: a fresh temporary name beside it, then a
  rename. An existing file is replaced only with `overwrite`, and only if it is an index."""
  import faiss

  path = os.fspath(path)
  check_destination(path, overwrite)
  meta = {
    "format": FORMAT,
    "version": VERSION,
    "kind": index.kind,
    "count": len(index),
    "input_dim": index.input_dim,
    "dim": index.dim,
    "nprobe": index.nprobe,
    "pca": None if index.pca is None else {"dim": index.pca.dim, "whiten": index.pca.whiten},
  }
  arrays = {"paths": _json_array(index._paths)}
  if index.kind == "exact":
    n = index._index.ntotal  # a view of faiss's own buffer: no second copy of the database
    arrays["vectors"] = (
      faiss.rev_swig_ptr(index._index.get_xb(), n * index.dim).reshape(n, index.dim)
      if n
      else np.zeros((0, index.dim), np.float32)
    )
  else:
    blob = faiss.serialize_index(index._index)
    arrays["faiss_index"] = blob
    meta["faiss_sha256"] = hashlib.sha256(blob.tobytes()).hexdigest()
  if index.pca is not None:
    arrays.update(
      pca_mean=index.pca.mean, pca_components=index.pca.components, pca_scale=index.pca.scale
    )
  arrays["metadata"] = _json_array(meta)
  files_paths.makedirs(files_paths.parent(path))  # local, or gs://... (one upload)
  atomic.remove_leftovers(path)
  atomic.check_space(path, sum(a.nbytes for a in arrays.values()))
  with atomic.new_file(path) as tmp:
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)
      f.flush()
      os.fsync(f.fileno())


def read(cls, path: str):
  """`Index.load` (`cls`: the Index class): reads a file `save` wrote; anything else (or a damaged one) is a one-line error."""
  import faiss

  path = os.fspath(path)
  if files_paths.isdir(path):
    raise IsADirectoryError(f"{path} is a directory, not an index file")
  if not files_paths.exists(path):
    raise FileNotFoundError(f"no index file at {path}")
  try:
    with files_paths.open_read(path, "rb") as f, np.load(f, allow_pickle=False) as z:
      meta = _read_metadata(z, path)
      arrays = {name: z[name] for name in z.files}
  except UserError:
    raise
  except (OSError, ValueError, EOFError, KeyError, TypeError, zipfile.BadZipFile) as e:
    raise _not_an_index(
      path, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    ) from None
  index = cls.__new__(cls)
  try:
    paths = json.loads(bytes(arrays["paths"]).decode("utf-8"))
    kind, n = meta["kind"], int(meta["count"])
    d, input_dim = int(meta["dim"]), int(meta["input_dim"])
    want = {"metadata", "paths"} | ({"vectors"} if kind == "exact" else {"faiss_index"})
    if meta["pca"] is not None:
      want |= {"pca_mean", "pca_components", "pca_scale"}
    if kind not in KINDS or set(arrays) != want:
      raise ValueError(f"kind {kind!r} with arrays {sorted(arrays)}")
    if not (isinstance(paths, list) and len(paths) == n and all(isinstance(p, str) for p in paths)):
      raise ValueError(f"paths are not {n} strings")
    index.kind, index.dim, index.input_dim, index._paths = kind, d, input_dim, paths
    index.pca = None
    if meta["pca"] is not None:
      mean, comps, scale = (arrays[k] for k in ("pca_mean", "pca_components", "pca_scale"))
      if (
        (mean.dtype, comps.dtype, scale.dtype) != (np.float32,) * 3
        or mean.shape != (input_dim,)
        or comps.shape != (d, input_dim)
        or scale.shape != (d,)
      ):
        raise ValueError("PCA arrays of the wrong shape or type")
      index.pca = PCA(mean, comps, scale, bool(meta["pca"]["whiten"]))
    elif d != input_dim:
      raise ValueError(f"dim {d} != input_dim {input_dim} without a PCA")
    if kind == "exact":
      v = arrays["vectors"]
      if v.dtype != np.float32 or v.shape != (n, d):
        raise ValueError(f"vectors {v.dtype} {v.shape}, expected float32 {(n, d)}")
      index._index = faiss.IndexFlatL2(d)
      index._index.add(np.ascontiguousarray(v))
    else:
      blob = arrays["faiss_index"]
      if (
        blob.dtype != np.uint8
        or blob.ndim != 1
        or hashlib.sha256(blob.tobytes()).hexdigest() != meta.get("faiss_sha256")
      ):
        raise ValueError("the faiss index does not match the checksum recorded with it")
      index._index = faiss.deserialize_index(blob)
      want_type = faiss.IndexIVFFlat if kind == "ivf" else faiss.IndexIVFPQ
      if (
        not isinstance(index._index, want_type)
        or index._index.d != d
        or index._index.ntotal != n
        or index._index.metric_type != faiss.METRIC_L2
      ):
        raise ValueError(
          f"faiss index {type(index._index).__name__} d={index._index.d} "
          f"n={index._index.ntotal}, expected {want_type.__name__} d={d} n={n}"
        )
      index.nprobe = int(meta["nprobe"])
  except UserError:
    raise
  except (KeyError, TypeError, ValueError, RuntimeError, UnicodeDecodeError) as e:
    raise _not_an_index(path, str(e).splitlines()[0] if str(e) else type(e).__name__) from None
  return index


def _json_array(obj) -> np.ndarray:
  """JSON as a uint8 array (no object arrays: the file loads with allow_pickle=False)."""
  return np.frombuffer(json.dumps(obj).encode("utf-8"), np.uint8)


def _read_metadata(z, path: str) -> dict:
  if not hasattr(z, "files") or "metadata" not in z.files:
    raise _not_an_index(path, "no metadata")
  meta = json.loads(bytes(z["metadata"]).decode("utf-8"))
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise _not_an_index(path, "no salad_jax index metadata")
  if meta.get("version") != VERSION:
    raise UserError(
      f"{path}: index format version {meta.get('version')!r}; this salad_jax reads "
      f"version {VERSION}",
      "rebuild the index with this version",
    )
  return meta


def _not_an_index(path: str, why: str) -> UserError:
  return UserError(
    f"{path} is not a readable salad_jax index ({why[:200]})",
    "rebuild it with Index(...).save(path)",
  )


def written_by_us(path: str) -> bool:
  """True iff `path` is a file that reads as a salad_jax index's metadata."""
  try:
    with np.load(path, allow_pickle=False) as z:
      _read_metadata(z, path)
    return True
  except Exception:  # anything unreadable is not ours
    return False


def check_destination(path: str, overwrite: bool) -> None:
  destinations.check_file(
    path,
    overwrite,
    written_by_us,
    flag="index path",
    kind="index",
    single="an index (.npz)",
    overwrite_flag="overwrite=True",
  )
