"""Log-space Sinkhorn with a dustbin row: SALAD's optimal-transport assignment (pure function).

Also without the dustbin (SALAD's ablation, `dust_bin=None`): then the transport is balanced
between the m clusters and the n features alone (see `log_marginals`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def log_marginals(
  m: int, n: int, dustbin: bool = True
) -> tuple[np.ndarray, np.ndarray, np.float32]:
  """log a [m+1], log b [n] and norm = -log(n+m), as float32 (the reference's marginals).

  Each of the n features carries mass 1/(n+m); each cluster row receives 1/(n+m) and the
  dustbin row the remaining (n-m)/(n+m), so both sides sum to n/(n+m).

  Without the dustbin: log a [m] = -log m, log b [n] = -log n and norm = -log n: every cluster
  receives 1/m and every feature gives 1/n, both sides sum to 1, and the returned plan (scaled
  by n) still gives each feature a column summing to 1 while each cluster row tends to n/m.
  No feature can hand mass to "nothing", so n > m is not needed.
  """
  if not dustbin:
    return (
      np.full((m,), -math.log(m), np.float32),
      np.full((n,), -math.log(n), np.float32),
      np.float32(-math.log(n)),
    )
  if n <= m:
    raise ValueError(
      f"Sinkhorn needs more features than clusters (n={n} <= m={m}): the dustbin "
      "marginal log(n - m) is undefined; use a larger image"
    )
  norm = np.float32(-math.log(n + m))
  log_a = np.full((m + 1,), norm, np.float32)
  log_a[m] = norm + np.float32(math.log(n - m))
  return log_a, np.full((n,), norm, np.float32), norm


def log_assignment(
  scores: jax.Array, dust_bin: jax.Array | None, num_iters: int = 3, reg: float = 1.0
) -> jax.Array:
  """Returns log P + log(n+m), [B, m+1, n] float32, for scores [B, m, n].

  Row m is the dustbin (every entry `dust_bin`). Iterations update u (rows) then v (columns),
  so after the last one every column of P sums to 1 over the m+1 rows.
  With `dust_bin=None`: no dustbin row, the balanced marginals of `log_marginals(dustbin=False)`,
  and log P + log n, [B, m, n] (columns again sum to 1).
  """
  b, m, n = scores.shape
  log_a, log_b, norm = log_marginals(m, n, dust_bin is not None)
  cost = scores.astype(jnp.float32)
  if dust_bin is not None:
    dust = jnp.broadcast_to(jnp.asarray(dust_bin, jnp.float32), (b, 1, n))
    cost = jnp.concatenate([cost, dust], axis=1)
  cost = cost / reg
  rows = cost.shape[1]

  def step(_, uv):
    u, v = uv
    u = log_a - jax.nn.logsumexp(cost + v[:, None, :], axis=2)
    v = log_b - jax.nn.logsumexp(cost + u[:, :, None], axis=1)
    return u, v

  init = (jnp.zeros((b, rows), jnp.float32), jnp.zeros((b, n), jnp.float32))
  u, v = jax.lax.fori_loop(0, num_iters, step, init)
  return cost + u[:, :, None] + v[:, None, :] - norm
