"""Argument checks shared by the index modules: descriptor matrices, paths, integers."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from salad_jax.errors import UserError


def is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def l2_normalise(x: np.ndarray) -> np.ndarray:
  norm = np.linalg.norm(x, axis=-1, keepdims=True)
  return (x / np.maximum(norm, 1e-12)).astype(np.float32)


def check_matrix(
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


def check_paths(paths, descriptors) -> list[str]:
  """`paths` as a list of strings, one per row of `descriptors`."""
  if isinstance(paths, (str, bytes)) or not all(isinstance(p, str) for p in paths):
    raise UserError("paths: expected a list of strings, one per descriptor")
  n = np.shape(descriptors)[0] if np.ndim(descriptors) else 0
  if len(paths) != n:
    raise UserError(f"{n} descriptors and {len(paths)} paths: one path per descriptor")
  return list(paths)
