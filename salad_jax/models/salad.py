"""The SALAD head: token / cluster / score MLPs, Sinkhorn assignment, and the 8448-d descriptor."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from salad_jax.models.sinkhorn import log_assignment
from salad_jax.models.vit import Dense


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """torch.nn.functional.normalize: x / max(||x||, 1e-12)."""
  norm = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
  return x / jnp.maximum(norm, 1e-12)


class SALAD(nn.Module):
  """SALAD aggregator. Layer names mirror `aggregator.*` of the PyTorch checkpoint.

  Inputs: patch features [B, H', W', C] (or [B, n, C]) and the cls token [B, C].
  Output: [B, m*l + g] float32, unit norm; the token part first, then the per-cluster
  intra-normalised aggregates flattened channel-major (element (c, k) at c*m + k).
  """

  num_clusters: int = 64
  cluster_dim: int = 128
  token_dim: int = 256
  hidden_dim: int = 512
  dropout: float = 0.3
  sinkhorn_iters: int = 3
  dtype: Any = jnp.float32

  def _dense(self, features, name):
    return Dense(features, dtype=self.dtype, torch_init=True, name=name)

  def _conv_mlp(self, x, out, prefix, train):
    # Conv1x1 -> Dropout -> ReLU -> Conv1x1 (indices 0 and 3 of the torch nn.Sequential)
    h = self._dense(self.hidden_dim, f"{prefix}_0")(x)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    return self._dense(out, f"{prefix}_3")(jax.nn.relu(h))

  @nn.compact
  def __call__(self, feats, token, train: bool = False):
    b, c = feats.shape[0], feats.shape[-1]
    x = feats.reshape(b, -1, c)
    f = self._conv_mlp(x, self.cluster_dim, "cluster_features", train)  # [B, n, l]
    s = self._conv_mlp(x, self.num_clusters, "score", train)  # [B, n, m]
    t = self._dense(self.token_dim, "token_features_2")(
      jax.nn.relu(self._dense(self.hidden_dim, "token_features_0")(token))
    )
    dust_bin = self.param("dust_bin", nn.initializers.constant(1.0), ())

    log_p = log_assignment(jnp.swapaxes(s, 1, 2), dust_bin, self.sinkhorn_iters)
    p = jnp.exp(log_p)[:, : self.num_clusters, :]  # drop the dustbin row: [B, m, n]
    self.sow("intermediates", "assignment", p)
    v = jnp.einsum("bnc,bkn->bck", f.astype(jnp.float32), p)  # [B, l, m]
    v = l2_normalize(v, axis=1).reshape(b, self.cluster_dim * self.num_clusters)
    t = l2_normalize(t.astype(jnp.float32), axis=-1)
    return l2_normalize(jnp.concatenate([t, v], axis=-1), axis=-1)
