"""`Index`: image paths searchable by descriptor (exact, IVF or IVF-PQ, optionally PCA-d)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from salad_jax.errors import UserError
from salad_jax.index import store
from salad_jax.index.checks import check_matrix, check_paths, is_int
from salad_jax.index.ivf import train_ivf
from salad_jax.index.pca import PCA, fit_pca
from salad_jax.index.store import KINDS


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
    paths = check_paths(paths, descriptors)
    x = check_matrix(descriptors, "descriptors", paths=paths)
    train = x if train_on is None else check_matrix(train_on, "train_on", x.shape[1])
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
      self._index = train_ivf(self.pca.apply(train) if self.pca else train, kind, nlist, m, nbits)
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
    if not is_int(value) or not 1 <= value <= nlist:
      raise UserError(f"nprobe {value!r}: an integer in [1, {nlist}] (the index has {nlist} lists)")
    self._ivf().nprobe = int(value)

  def add(self, descriptors, paths: Sequence[str]) -> None:
    """Adds images (projected with the index's PCA; IVF kinds: not retrained)."""
    paths = check_paths(paths, descriptors)
    x = check_matrix(descriptors, "descriptors", self.input_dim, paths)
    self._add(self.pca.apply(x) if self.pca else x, paths)

  def search_indices(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(row indices int64 [M, k], -1 = no result; squared L2 distances float32 [M, k], inf there).
    A query [D] gives [k] arrays. IVF-PQ distances are those of the compressed vectors."""
    if not is_int(k) or k < 1:
      raise UserError(f"k {k!r}: the number of neighbours must be a positive integer")
    q = np.asarray(queries)
    single = q.ndim == 1
    q = check_matrix(q[None] if single else q, "queries", self.input_dim)
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
    store.write(self, path, overwrite)

  @classmethod
  def load(cls, path: str) -> "Index":
    """Reads a file `save` wrote; anything else (or a damaged one) is a one-line error."""
    return store.read(cls, path)

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
