"""PCA(-whitening) of descriptors: fitted on a set, applied to database and queries alike."""

from __future__ import annotations

import dataclasses

import numpy as np

from salad_jax.errors import UserError
from salad_jax.index.checks import check_matrix, is_int, l2_normalise


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
    return l2_normalise(y)


def fit_pca(descriptors: np.ndarray, dim: int, whiten: bool = True) -> PCA:
  """PCA of `descriptors` [N, D] to `dim` components (float64 eigendecomposition of the N x N
  Gram matrix when N < D, else of the D x D covariance). `whiten` scales each component to unit
  variance, so that distances weigh the rare directions as much as the frequent ones."""
  x = check_matrix(descriptors, "descriptors")
  n, d = x.shape
  rank = min(n - 1, d)
  if not is_int(dim) or not 1 <= dim <= rank:
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
