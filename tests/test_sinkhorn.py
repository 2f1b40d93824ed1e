"""The log-space Sinkhorn with dustbin: against float64 numpy, marginals, edge cases."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from salad_jax.models.sinkhorn import log_assignment


def numpy_f64(scores, dust_bin, iters=3):
  b, m, n = scores.shape
  cost = np.concatenate([scores, np.full((b, 1, n), dust_bin)], axis=1).astype(np.float64)
  norm = -math.log(n + m)
  log_a = np.full(m + 1, norm)
  log_a[-1] += math.log(n - m)
  log_b = np.full(n, norm)
  u, v = np.zeros((b, m + 1)), np.zeros((b, n))
  for _ in range(iters):
    u = log_a - logsumexp(cost + v[:, None, :], axis=2)
    v = log_b - logsumexp(cost + u[:, :, None], axis=1)
  return cost + u[:, :, None] + v[:, None, :] - norm


@pytest.mark.parametrize("b,m,n", [(1, 64, 81), (3, 64, 529), (2, 16, 256)])
def test_matches_float64_numpy_and_columns_sum_to_one(b, m, n):
  scores = np.random.default_rng(0).normal(0, 3, (b, m, n)).astype(np.float32)
  got = np.asarray(jax.jit(log_assignment)(scores, jnp.float32(1.0)))
  want = numpy_f64(scores.astype(np.float64), 1.0)
  assert got.shape == (b, m + 1, n)
  np.testing.assert_allclose(got, want, atol=2e-5)
  # the last update is v: every column of P (dustbin row included) sums to exactly 1
  np.testing.assert_allclose(np.exp(got).sum(axis=1), 1.0, atol=1e-5)
  # the dustbin row takes about n - m of the mass, each cluster row about 1
  np.testing.assert_allclose(np.exp(got)[:, m].sum(-1), n - m, rtol=0.05)


def test_more_iterations_converge_rows_to_marginals():
  scores = np.random.default_rng(1).normal(0, 1, (2, 8, 40)).astype(np.float32)
  p = np.exp(np.asarray(log_assignment(scores, jnp.float32(0.5), num_iters=200)))
  np.testing.assert_allclose(p[:, :8].sum(-1), 1.0, atol=1e-4)
  np.testing.assert_allclose(p[:, 8].sum(-1), 32.0, atol=1e-3)


@pytest.mark.parametrize("n,m", [(64, 64), (49, 64)])
def test_too_few_features_is_a_clear_error(n, m):
  with pytest.raises(ValueError, match="more features than clusters"):
    log_assignment(np.zeros((1, m, n), np.float32), 1.0)


def test_differentiable_and_finite():
  scores = jnp.asarray(np.random.default_rng(2).normal(0, 2, (2, 4, 20)), jnp.float32)
  g = jax.grad(lambda s: jnp.sum(jnp.exp(log_assignment(s, 1.0))[:, :4] * jnp.arange(20.0)))(scores)
  assert g.shape == scores.shape and bool(jnp.isfinite(g).all()) and float(jnp.abs(g).max()) > 0
