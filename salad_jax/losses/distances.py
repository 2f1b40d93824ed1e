"""Distance matrices as pytorch-metric-learning builds them, plus the masked reductions they feed.

Every pml distance used by SALAD normalises the embeddings first (`normalize_embeddings=True`,
torch.nn.functional.normalize: x / max(||x||, 1e-12)), so DotProductSimilarity and
CosineSimilarity give the same matrix, and LpDistance is the Euclidean distance of unit vectors.
All matrices are fp32 at HIGHEST matmul precision: accelerators would otherwise round the
similarities to bf16/tf32 and move pairs across the miners' thresholds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from salad_jax.models.salad import l2_normalize

_HIGHEST = jax.lax.Precision.HIGHEST


def normalize(descriptors: jax.Array) -> jax.Array:
  return l2_normalize(descriptors.astype(jnp.float32), axis=-1)


def similarity(descriptors: jax.Array) -> jax.Array:
  """DotProductSimilarity == CosineSimilarity (both normalise first): [N, N] fp32."""
  e = normalize(descriptors)
  return jnp.dot(e, e.T, precision=_HIGHEST)


def lp_distance(descriptors: jax.Array, power: int = 1) -> jax.Array:
  """LpDistance(p=2, power): torch.cdist's matmul form sqrt(max(|x|^2 + |y|^2 - 2 x.y, 0)).

  torch.cdist takes this form for more than 25 rows; its gradient is 0 where the distance is
  0 (the diagonal), so the square root here is guarded the same way (no inf * 0 = NaN).
  `power=2` (FastAP's default) returns the clamped square without the root.
  """
  e = normalize(descriptors)
  sq = jnp.sum(e * e, axis=1)
  d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * jnp.dot(e, e.T, precision=_HIGHEST), 0.0)
  if power == 2:
    return d2
  positive = d2 > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, d2, 1.0)), 0.0)


def masked_logsumexp(x: jax.Array, mask: jax.Array, add_one: bool) -> jax.Array:
  """pml's lmu.logsumexp over rows: entries outside `mask` ignored, `add_one` appends a 0 logit,
  rows with an empty mask give 0. NaN-free in value and gradient for empty rows."""
  any_row = mask.any(axis=1)
  x = jnp.where(mask, x, -jnp.inf)
  if add_one:
    x = jnp.concatenate([x, jnp.zeros((x.shape[0], 1), x.dtype)], axis=1)
  else:
    x = jnp.where(any_row[:, None], x, 0.0)  # an all -inf row would give a NaN gradient
  return jnp.where(any_row, jax.nn.logsumexp(x, axis=1), 0.0)


def mean_reduce(losses: jax.Array, weights: jax.Array) -> jax.Array:
  """MeanReducer over a list where entry k appears `weights[k]` times (0 for an empty list)."""
  weights = weights.astype(jnp.float32)
  return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def avg_nonzero_reduce(losses: jax.Array, weights: jax.Array) -> jax.Array:
  """AvgNonZeroReducer: the mean of the entries > 0 (with multiplicity), 0 when there are none."""
  weights = jnp.where(losses > 0, weights.astype(jnp.float32), 0.0)
  return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)
