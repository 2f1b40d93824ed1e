"""Training faiss IVF and IVF-PQ indexes with defaults fitted to the number of descriptors."""

from __future__ import annotations

import math

import numpy as np

from salad_jax.errors import UserError, note
from salad_jax.index.checks import is_int

MIN_POINTS = 39  # training points per centroid below which faiss warns


def train_ivf(y: np.ndarray, kind: str, nlist: int | None, m: int | None, nbits: int | None):
  """A trained, empty faiss IVF / IVF-PQ index for `y` (squared L2)."""
  import faiss

  n, d = y.shape
  if nlist is None:
    nlist = max(1, min(round(4 * math.sqrt(n)), n // MIN_POINTS))
  if not is_int(nlist) or not 1 <= nlist <= n:
    raise UserError(
      f"nlist {nlist!r}: IVF needs 1 <= nlist <= the {n} training descriptors",
      "give more descriptors to the constructor, a smaller nlist, or kind='exact'",
    )
  if kind == "ivf":
    index = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_L2)
    need = nlist
  else:
    m = m or min((k for k in range(1, d + 1) if d % k == 0), key=lambda k: abs(k - d / 16))
    if not is_int(m) or m < 1 or d % m:
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
    if not is_int(nbits) or not 1 <= nbits <= 16:
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
