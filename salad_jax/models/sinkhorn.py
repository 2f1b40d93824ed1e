"""Log-space Sinkhorn with a dustbin row: SALAD's optimal-transport assignment (pure function)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def log_marginals(m: int, n: int) -> tuple[np.ndarray, np.ndarray, np.float32]:
  """log a [m+1], log b [n] and norm = -log(n+m), as float32 (the reference's marginals).

  Each of the n features carries mass 1/(n+m); each cluster row receives 1/(n+m) and the
  dustbin row the remaining (n-m)/(n+m), so both sides sum to n/(n+m).
  """
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
  scores: jax.Array, dust_bin: jax.Array, num_iters: int = 3, reg: float = 1.0
) -> jax.Array:
  """Returns log P + log(n+m), [B, m+1, n] float32, for scores [B, m, n].

  Row m is the dustbin (every entry `dust_bin`). Iterations update u (rows) then v (columns),
  so after the last one every column of P sums to 1 over the m+1 rows.
  """
  b, m, n = scores.shape
  log_a, log_b, norm = log_marginals(m, n)
  dust = jnp.broadcast_to(jnp.asarray(dust_bin, jnp.float32), (b, 1, n))
  cost = jnp.concatenate([scores.astype(jnp.float32), dust], axis=1) / reg

  def step(_, uv):
    u, v = uv
    u = log_a - jax.nn.logsumexp(cost + v[:, None, :], axis=2)
    v = log_b - jax.nn.logsumexp(cost + u[:, :, None], axis=1)
    return u, v

  init = (jnp.zeros((b, m + 1), jnp.float32), jnp.zeros((b, n), jnp.float32))
  u, v = jax.lax.fori_loop(0, num_iters, step, init)
  return cost + u[:, :, None] + v[:, None, :] - norm
