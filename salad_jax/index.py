"""Describe a folder, keep its descriptors in an index, query it: place recognition in deployment.

  model = salad_jax.load("weights/dino_salad")
  db, paths = describe_folder(model, "database/")             # [N, 8448], the image paths
  index = Index(db, paths)                                     # exact search (faiss, squared L2)
  index.save("db.index.npz")
  hits, dists = Index.load("db.index.npz").search(model.describe(queries), k=5)

Exact search is the default: it is what evaluation runs, and at 8448-d a flat index costs 33 KiB
per image and ~28 ms per query per 100k images (batched, 2 CPU cores; benchmarks/index_search.py).
For larger databases, `kind="ivf"` (inverted lists, exact vectors) or `"ivfpq"` (inverted lists
of product-quantised codes: tens to a few hundred bytes per image) search only `nprobe` of
`nlist` lists, learnt from the database or from `train_on`. At 1 M images, IVF-PQ with 64-byte
codes searched 16 of 256 lists in ~3 ms per query (exact: ~280 ms, extrapolated). `pca_dim` (or
a `fit_pca` fitted on another set) projects database and queries with PCA(-whitening) and
L2-normalises them again.

The file (`save`) is an `.npz` read with `allow_pickle=False`: JSON metadata and paths as bytes,
the vectors of an exact index as a float32 array, an IVF index as faiss's own serialization (its
SHA-256 checked before faiss parses it). Nothing in it is executed when loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import zipfile
from typing import Sequence

import numpy as np

from salad_jax.errors import UserError, note
from salad_jax.files import atomic, destinations
from salad_jax.files import paths as files_paths

FORMAT = "salad_jax.index"
VERSION = 1
KINDS = ("exact", "ivf", "ivfpq")
MIN_POINTS = 39  # training points per centroid below which faiss warns


# ------------------------------------------------------------------------------ describing
def describe_folder(
  model, folder: str, image_size=(322, 322), batch_size: int = 32, progress: bool = True
) -> tuple[np.ndarray, list[str]]:
  """(descriptors [N, D] float32, paths) of the images under `folder`, found as evaluation finds
  them (recursive, sorted, .jpg/.jpeg/.png; `eval_sets.read_image_paths`).

  Loaded and resized as evaluation does (PIL bilinear, in threads while the model runs), in
  batches of one shape, min(batch_size, N), the last padded: one compilation per call.
  """
  from tqdm import tqdm

  from salad_jax.data import eval_sets, images, pipeline

  size = images.as_size(image_size)
  if batch_size < 1:
    raise UserError(f"batch_size {batch_size}: must be >= 1")
  model.config.check_image_shape((1,) + size + (3,))
  paths = eval_sets.read_image_paths(os.fspath(folder))
  batch = min(batch_size, len(paths))
  images.check_batch_memory(size, batch, "image_size")
  out = np.empty((len(paths), model.descriptor_dim), np.float32)
  data = pipeline.eval_dataset(paths, image_size=size, batch_size=batch)
  with tqdm(
    total=len(paths), desc="describe", unit="img", disable=not progress, file=sys.stderr
  ) as bar:
    for b in data:
      x = images.normalize(b["images"])  # padding rows are black images: valid inputs
      d = model.describe(x)
      keep = b["index"] >= 0
      out[b["index"][keep]] = d[keep]
      bar.update(int(keep.sum()))
  return out, paths


# ------------------------------------------------------------------------------ PCA
@dataclasses.dataclass(frozen=True)
class PCA:
  """y = normalise(((x - mean) @ components.T) * scale); scale = 1/sqrt(variance) if whitened."""

  mean: np.ndarray  # [D] float32
  components: np.ndarray  # [dim, D] float32, orthonormal rows, by decreasing variance
  scale: np.ndarray  # [dim] float32
  whiten: bool

  @property
  def input_dim(self) -> int:
    return self.components.shape[1]

  @property
  def dim(self) -> int:
    return self.components.shape[0]

  def apply(self, x: np.ndarray) -> np.ndarray:
    y = ((np.asarray(x, np.float32) - self.mean) @ self.components.T) * self.scale
    return _l2_normalise(y)


def fit_pca(descriptors: np.ndarray, dim: int, whiten: bool = True) -> PCA:
  """PCA of `descriptors` [N, D] to `dim` components (float64 eigendecomposition of the N x N
  Gram matrix when N < D, else of the D x D covariance). `whiten` scales each component to unit
  variance, so that distances weigh the rare directions as much as the frequent ones."""
  x = _check_matrix(descriptors, "descriptors")
  n, d = x.shape
  rank = min(n - 1, d)
  if not _is_int(dim) or not 1 <= dim <= rank:
    raise UserError(
      f"PCA to {dim!r} dimensions from {n} descriptors of {d}: the dimension must "
      f"be an integer in [1, {rank}] (at most N - 1 and D)",
      "fit on more descriptors, or choose a smaller dimension",
    )
  mean = x.mean(axis=0, dtype=np.float64)
  xc = x.astype(np.float64) - mean
  if n < d:  # X = U S V^T: eigenvectors U of X X^T give V = X^T U / S
    evals, u = np.linalg.eigh(xc @ xc.T)
    order = np.argsort(evals)[::-1][:dim]
    evals, u = evals[order], u[:, order]
    comps = (xc.T @ u / np.sqrt(np.maximum(evals, 1e-300))).T
  else:
    evals, v = np.linalg.eigh(xc.T @ xc)
    order = np.argsort(evals)[::-1][:dim]
    evals, comps = evals[order], v[:, order].T
  var = np.maximum(evals, 0.0) / max(n - 1, 1)
  if whiten and var[-1] <= 1e-12 * var[0]:
    raise UserError(
      f"PCA-whitening to {dim} dimensions: component {dim} has no variance in these "
      f"{n} descriptors (they span fewer dimensions)",
      "choose a smaller dimension",
    )
  scale = 1.0 / np.sqrt(var) if whiten else np.ones(dim)
  return PCA(
    mean.astype(np.float32), comps.astype(np.float32), scale.astype(np.float32), bool(whiten)
  )


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _l2_normalise(x: np.ndarray) -> np.ndarray:
  norm = np.linalg.norm(x, axis=-1, keepdims=True)
  return (x / np.maximum(norm, 1e-12)).astype(np.float32)


def _check_matrix(
  x, what: str, dim: int | None = None, paths: Sequence[str] | None = None
) -> np.ndarray:
  """A finite float [N, D] array as contiguous float32; a non-finite row names its image."""
  a = np.asarray(x)
  if a.ndim != 2 or not np.issubdtype(a.dtype, np.floating):
    raise UserError(f"{what}: expected a float array [N, D], got {a.dtype} {a.shape}")
  if dim is not None and a.shape[1] != dim:
    raise UserError(
      f"{what} have {a.shape[1]} dimensions; this index holds {dim}-d descriptors",
      "describe with the model (and image size) the index was built with",
    )
  bad = np.flatnonzero(~np.isfinite(a).all(axis=1))
  if bad.size:
    where = f" (first: {paths[bad[0]]})" if paths is not None else f" (first: row {bad[0]})"
    raise UserError(f"{what}: {bad.size} of {len(a)} rows hold NaN or Inf{where}")
  return np.ascontiguousarray(a, np.float32)


# ------------------------------------------------------------------------------ the index
class Index:
  """Image paths searchable by descriptor: exact (faiss IndexFlatL2), IVF or IVF-PQ.

  What is fitted is fitted on `train_on` if given (descriptors of other images of the same kind:
  the database can then start empty and grow with `add`), else on the database itself:
  `pca_dim` fits `fit_pca(..., pca_dim, whiten)`, or `pca` takes one fitted before. IVF kinds
  learn `nlist` lists (default ~4 sqrt(N), >= 39 training points each) and search `nprobe` of
  them (default min(nlist, 16)); IVF-PQ stores `m` bytes per image (default D/16 rounded to a
  divisor of D) of `nbits`-bit codes (8, or fewer under 39 x 256 training points). Images added
  later are encoded with what was learnt, never retrained on.
  """

  def __init__(
    self,
    descriptors,
    paths: Sequence[str],
    *,
    kind: str = "exact",
    pca_dim: int | None = None,
    whiten: bool = True,
    pca: PCA | None = None,
    nlist: int | None = None,
    m: int | None = None,
    nbits: int | None = None,
    nprobe: int | None = None,
    train_on=None,
  ):
    import faiss

    if kind not in KINDS:
      raise UserError(f"index kind {kind!r}: one of {', '.join(KINDS)}")
    paths = _check_paths(paths, descriptors)
    x = _check_matrix(descriptors, "descriptors", paths=paths)
    train = x if train_on is None else _check_matrix(train_on, "train_on", x.shape[1])
    if pca is not None and pca_dim is not None:
      raise UserError("give pca_dim (fitted here) or pca (fitted before), not both")
    if pca is not None and pca.input_dim != x.shape[1]:
      raise UserError(f"the PCA takes {pca.input_dim}-d descriptors; these are {x.shape[1]}-d")
    self.kind, self.input_dim = kind, x.shape[1]
    self.pca = fit_pca(train, pca_dim, whiten) if pca_dim is not None else pca
    self.dim = self.pca.dim if self.pca else self.input_dim
    self._paths: list[str] = []
    if kind == "exact":
      self._index = faiss.IndexFlatL2(self.dim)
    else:
      self._index = _train_ivf(self.pca.apply(train) if self.pca else train, kind, nlist, m, nbits)
      ivf = faiss.extract_index_ivf(self._index)
      self.nprobe = min(ivf.nlist, 16) if nprobe is None else nprobe
    self._add(self.pca.apply(x) if self.pca else x, paths)

  # --------------------------------------------------------------------- queries
  def __len__(self) -> int:
    return len(self._paths)

  @property
  def paths(self) -> list[str]:
    return list(self._paths)

  @property
  def nprobe(self) -> int | None:
    """Inverted lists searched per query (IVF kinds): more is slower and closer to exact."""
    return None if self.kind == "exact" else int(self._ivf().nprobe)

  @nprobe.setter
  def nprobe(self, value: int) -> None:
    if self.kind == "exact":
      raise UserError("nprobe applies to IVF indexes; this one is exact")
    nlist = self._ivf().nlist
    if not _is_int(value) or not 1 <= value <= nlist:
      raise UserError(f"nprobe {value!r}: an integer in [1, {nlist}] (the index has {nlist} lists)")
    self._ivf().nprobe = int(value)

  def add(self, descriptors, paths: Sequence[str]) -> None:
    """Adds images (projected with the index's PCA; IVF kinds: not retrained)."""
    paths = _check_paths(paths, descriptors)
    x = _check_matrix(descriptors, "descriptors", self.input_dim, paths)
    self._add(self.pca.apply(x) if self.pca else x, paths)

  def search_indices(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(row indices int64 [M, k], -1 = no result; squared L2 distances float32 [M, k], inf there).
    A query [D] gives [k] arrays. IVF-PQ distances are those of the compressed vectors."""
    if not _is_int(k) or k < 1:
      raise UserError(f"k {k!r}: the number of neighbours must be a positive integer")
    q = np.asarray(queries)
    single = q.ndim == 1
    q = _check_matrix(q[None] if single else q, "queries", self.input_dim)
    if self.pca:
      q = self.pca.apply(q)
    dist, idx = self._index.search(q, int(k))
    idx = idx.astype(np.int64)
    dist = np.where(idx >= 0, dist, np.inf).astype(np.float32)
    return (idx[0], dist[0]) if single else (idx, dist)

  def search(self, queries, k: int) -> tuple[list, np.ndarray]:
    """(paths [M][k] as lists, squared L2 distances [M, k]) of the k nearest images, nearest
    first, as evaluation's faiss search. Where faiss has no k-th result (fewer than k images, or
    fewer in the lists probed) the path is None and the distance inf. A query [D] gives
    ([k], [k])."""
    idx, dist = self.search_indices(queries, k)
    paths = self._paths
    to_paths = lambda row: [paths[i] if i >= 0 else None for i in row]  # noqa: E731
    return (to_paths(idx) if idx.ndim == 1 else [to_paths(r) for r in idx]), dist

  def memory_bytes(self) -> int:
    """Bytes of the searchable structure: the float32 vectors (exact), or faiss's serialization
    of lists, ids, codes, centroids and codebooks (IVF); paths and PCA not counted."""
    import faiss

    if self.kind == "exact":
      return 4 * self.dim * len(self)
    return int(faiss.serialize_index(self._index).nbytes)

  # --------------------------------------------------------------------- files
  def save(self, path: str, overwrite: bool = False) -> None:
    """Writes the index to `path` (an .npz) atomically: a fresh temporary name beside it, then a
    rename. An existing file is replaced only with `overwrite`, and only if it is an index."""
    import faiss

    path = os.fspath(path)
    _check_destination(path, overwrite)
    meta = {
      "format": FORMAT,
      "version": VERSION,
      "kind": self.kind,
      "count": len(self),
      "input_dim": self.input_dim,
      "dim": self.dim,
      "nprobe": self.nprobe,
      "pca": None if self.pca is None else {"dim": self.pca.dim, "whiten": self.pca.whiten},
    }
    arrays = {"paths": _json_array(self._paths)}
    if self.kind == "exact":
      n = self._index.ntotal  # a view of faiss's own buffer: no second copy of the database
      arrays["vectors"] = (
        faiss.rev_swig_ptr(self._index.get_xb(), n * self.dim).reshape(n, self.dim)
        if n
        else np.zeros((0, self.dim), np.float32)
      )
    else:
      blob = faiss.serialize_index(self._index)
      arrays["faiss_index"] = blob
      meta["faiss_sha256"] = hashlib.sha256(blob.tobytes()).hexdigest()
    if self.pca is not None:
      arrays.update(
        pca_mean=self.pca.mean, pca_components=self.pca.components, pca_scale=self.pca.scale
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

  @classmethod
  def load(cls, path: str) -> "Index":
    """Reads a file `save` wrote; anything else (or a damaged one) is a one-line error."""
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
    self = cls.__new__(cls)
    try:
      paths = json.loads(bytes(arrays["paths"]).decode("utf-8"))
      kind, n = meta["kind"], int(meta["count"])
      d, input_dim = int(meta["dim"]), int(meta["input_dim"])
      want = {"metadata", "paths"} | ({"vectors"} if kind == "exact" else {"faiss_index"})
      if meta["pca"] is not None:
        want |= {"pca_mean", "pca_components", "pca_scale"}
      if kind not in KINDS or set(arrays) != want:
        raise ValueError(f"kind {kind!r} with arrays {sorted(arrays)}")
      if not (
        isinstance(paths, list) and len(paths) == n and all(isinstance(p, str) for p in paths)
      ):
        raise ValueError(f"paths are not {n} strings")
      self.kind, self.dim, self.input_dim, self._paths = kind, d, input_dim, paths
      self.pca = None
      if meta["pca"] is not None:
        mean, comps, scale = (arrays[k] for k in ("pca_mean", "pca_components", "pca_scale"))
        if (
          (mean.dtype, comps.dtype, scale.dtype) != (np.float32,) * 3
          or mean.shape != (input_dim,)
          or comps.shape != (d, input_dim)
          or scale.shape != (d,)
        ):
          raise ValueError("PCA arrays of the wrong shape or type")
        self.pca = PCA(mean, comps, scale, bool(meta["pca"]["whiten"]))
      elif d != input_dim:
        raise ValueError(f"dim {d} != input_dim {input_dim} without a PCA")
      if kind == "exact":
        v = arrays["vectors"]
        if v.dtype != np.float32 or v.shape != (n, d):
          raise ValueError(f"vectors {v.dtype} {v.shape}, expected float32 {(n, d)}")
        self._index = faiss.IndexFlatL2(d)
        self._index.add(np.ascontiguousarray(v))
      else:
        blob = arrays["faiss_index"]
        if (
          blob.dtype != np.uint8
          or blob.ndim != 1
          or hashlib.sha256(blob.tobytes()).hexdigest() != meta.get("faiss_sha256")
        ):
          raise ValueError("the faiss index does not match the checksum recorded with it")
        self._index = faiss.deserialize_index(blob)
        want_type = faiss.IndexIVFFlat if kind == "ivf" else faiss.IndexIVFPQ
        if (
          not isinstance(self._index, want_type)
          or self._index.d != d
          or self._index.ntotal != n
          or self._index.metric_type != faiss.METRIC_L2
        ):
          raise ValueError(
            f"faiss index {type(self._index).__name__} d={self._index.d} "
            f"n={self._index.ntotal}, expected {want_type.__name__} d={d} n={n}"
          )
        self.nprobe = int(meta["nprobe"])
    except UserError:
      raise
    except (KeyError, TypeError, ValueError, RuntimeError, UnicodeDecodeError) as e:
      raise _not_an_index(path, str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    return self

  # --------------------------------------------------------------------- internals
  def _ivf(self):
    import faiss

    return faiss.extract_index_ivf(self._index)

  def _add(self, y: np.ndarray, paths: list[str]) -> None:
    if len(y):
      self._index.add(np.ascontiguousarray(y, np.float32))
    self._paths.extend(paths)

  def __repr__(self) -> str:
    extra = f", nprobe={self.nprobe}" if self.kind != "exact" else ""
    pca = ""
    if self.pca:
      pca = f", pca {self.input_dim}->{self.dim}{' whitened' if self.pca.whiten else ''}"
    return f"Index({len(self)} images, {self.kind}, {self.dim}-d{pca}{extra})"


def _train_ivf(y: np.ndarray, kind: str, nlist: int | None, m: int | None, nbits: int | None):
  """A trained, empty faiss IVF / IVF-PQ index for `y` (squared L2)."""
  import faiss

  n, d = y.shape
  if nlist is None:
    nlist = max(1, min(round(4 * math.sqrt(n)), n // MIN_POINTS))
  if not _is_int(nlist) or not 1 <= nlist <= n:
    raise UserError(
      f"nlist {nlist!r}: IVF needs 1 <= nlist <= the {n} training descriptors",
      "give more descriptors to the constructor, a smaller nlist, or kind='exact'",
    )
  if kind == "ivf":
    index = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_L2)
    need = nlist
  else:
    m = m or min((k for k in range(1, d + 1) if d % k == 0), key=lambda k: abs(k - d / 16))
    if not _is_int(m) or m < 1 or d % m:
      raise UserError(f"m {m!r}: the number of PQ sub-vectors must divide the dimension {d}")
    if nbits is None:
      nbits = 8
      while nbits > 4 and n < MIN_POINTS * 2**nbits:
        nbits -= 1
      if nbits < 8:
        note(
          f"IVF-PQ trained on {n} descriptors: {nbits}-bit codes (8 bits want >= "
          f"{MIN_POINTS * 256} training descriptors)"
        )
    if not _is_int(nbits) or not 1 <= nbits <= 16:
      raise UserError(f"nbits {nbits!r}: bits per PQ code, an integer in [1, 16]")
    index = faiss.index_factory(d, f"IVF{nlist},PQ{m}x{nbits}", faiss.METRIC_L2)
    index.pq.cp.min_points_per_centroid = 1  # warned above once, not once per sub-vector
    index.do_polysemous_training = False  # the factory's default: slow, only for Hamming filters
    need = max(nlist, 2**nbits)
  if n < need:
    raise UserError(
      f"{kind} index: {n} training descriptors are fewer than the {need} centroids to fit",
      "give more descriptors to the constructor, or kind='exact'",
    )
  faiss.extract_index_ivf(index).cp.min_points_per_centroid = 1
  index.train(y)
  return index


def _check_paths(paths, descriptors) -> list[str]:
  """`paths` as a list of strings, one per row of `descriptors`."""
  if isinstance(paths, (str, bytes)) or not all(isinstance(p, str) for p in paths):
    raise UserError("paths: expected a list of strings, one per descriptor")
  n = np.shape(descriptors)[0] if np.ndim(descriptors) else 0
  if len(paths) != n:
    raise UserError(f"{n} descriptors and {len(paths)} paths: one path per descriptor")
  return list(paths)


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


def _check_destination(path: str, overwrite: bool) -> None:
  destinations.check_file(
    path,
    overwrite,
    written_by_us,
    flag="index path",
    kind="index",
    single="an index (.npz)",
    overwrite_flag="overwrite=True",
  )
