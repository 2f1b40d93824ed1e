"""The SALAD head: token / cluster / score MLPs, Sinkhorn assignment, and the 8448-d descriptor."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from salad_jax.errors import UserError
from salad_jax.models.sinkhorn import log_assignment
from salad_jax.models.vit import Dense


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """torch.nn.functional.normalize: x / max(||x||, 1e-12)."""
  norm = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
  return x / jnp.maximum(norm, 1e-12)


def example_dropout(x: jax.Array, rate: float, key: jax.Array, ids: jax.Array) -> jax.Array:
  """Inverted dropout (as nn.Dropout: keep with 1 - rate, scale by 1 / (1 - rate)) whose mask
  for example b is drawn from fold_in(key, ids[b]) alone. nn.Dropout draws one mask for the
  whole batch, so an example's mask would depend on its position in the global batch, which
  changes with the padding of other device and process counts; with the example's identity as
  the key, any layout trains the same numbers."""
  keep = 1.0 - rate

  def one(i, xb):
    mask = jax.random.bernoulli(jax.random.fold_in(key, i), keep, xb.shape)
    return jnp.where(mask, xb / jnp.asarray(keep, xb.dtype), jnp.zeros_like(xb))

  return jax.vmap(one)(ids.astype(jnp.int32), x)


class SALAD(nn.Module):
  """SALAD aggregator. Layer names mirror `aggregator.*` of the PyTorch checkpoint.

  Inputs: patch features [B, H', W', C] (or [B, n, C]) and the cls token [B, C].
  Output: [B, m*l + g] float32, unit norm; the token part first, then the per-cluster
  intra-normalised aggregates flattened channel-major (element (c, k) at c*m + k).

  Ablation switches (the defaults are the paper's model):
  - `dustbin=False`: Sinkhorn without the dustbin row and without the `dust_bin` param; the
    marginals are balanced, every cluster receiving 1/m and every feature giving 1/n
    (`sinkhorn.log_marginals`), so no feature can be discarded, cluster usage is pushed towards
    n/m features each, and n > m is no longer required. The plan is scaled by n: every
    feature's column still sums to 1.
  - `assignment="softmax"`: NetVLAD-style p_kn = softmax over the m clusters of the scores of
    feature n (no optimal transport, no dustbin, no `dust_bin` param; `dustbin` is ignored).
  - `global_token=False`: no `token_features` MLP, the token is not used (may be None) and the
    descriptor is the [B, m*l] cluster part alone, L2-normalised as a whole.
  Under Sinkhorn, the value of `dust_bin` and the bias of `score_3` do not change the descriptor
  (nor get gradient, but for rounding): each adds a constant to a whole row of the scores, which
  the first row update u absorbs. The dustbin acts through its marginal, (n-m)/(n+m), alone.
  """

  num_clusters: int = 64
  cluster_dim: int = 128
  token_dim: int = 256
  hidden_dim: int = 512
  dropout: float = 0.3
  sinkhorn_iters: int = 3
  dtype: Any = jnp.float32
  dustbin: bool = True
  assignment: str = "sinkhorn"  # sinkhorn | softmax
  global_token: bool = True

  def _dense(self, features, name):
    return Dense(features, dtype=self.dtype, torch_init=True, name=name)

  def _conv_mlp(self, x, out, prefix, train, example_ids):
    # Conv1x1 -> Dropout -> ReLU -> Conv1x1 (indices 0 and 3 of the torch nn.Sequential)
    h = self._dense(self.hidden_dim, f"{prefix}_0")(x)
    if train and self.dropout > 0:
      ids = jnp.arange(h.shape[0], dtype=jnp.int32) if example_ids is None else example_ids
      h = example_dropout(h, self.dropout, self.make_rng("dropout"), ids)
    return self._dense(out, f"{prefix}_3")(jax.nn.relu(h))

  @nn.compact
  def __call__(self, feats, token=None, train: bool = False, example_ids=None):
    """`example_ids` [B] int (training): each example's identity, which alone keys its dropout
    mask (default: its position in the batch)."""
    check_assignment(self.assignment)
    b, c = feats.shape[0], feats.shape[-1]
    x = feats.reshape(b, -1, c)
    f = self._conv_mlp(x, self.cluster_dim, "cluster_features", train, example_ids)  # [B, n, l]
    s = self._conv_mlp(x, self.num_clusters, "score", train, example_ids)  # [B, n, m]
    if self.global_token:
      t = self._dense(self.token_dim, "token_features_2")(
        jax.nn.relu(self._dense(self.hidden_dim, "token_features_0")(token))
      )

    if self.assignment == "softmax":
      p = jnp.swapaxes(jax.nn.softmax(s.astype(jnp.float32), axis=-1), 1, 2)  # [B, m, n]
    elif self.dustbin:
      dust_bin = self.param("dust_bin", nn.initializers.constant(1.0), ())
      log_p = log_assignment(jnp.swapaxes(s, 1, 2), dust_bin, self.sinkhorn_iters)
      p = jnp.exp(log_p)[:, : self.num_clusters, :]  # drop the dustbin row: [B, m, n]
    else:
      p = jnp.exp(log_assignment(jnp.swapaxes(s, 1, 2), None, self.sinkhorn_iters))
    self.sow("intermediates", "assignment", p)
    v = jnp.einsum("bnc,bkn->bck", f.astype(jnp.float32), p)  # [B, l, m]
    v = l2_normalize(v, axis=1).reshape(b, self.cluster_dim * self.num_clusters)
    if not self.global_token:
      return l2_normalize(v, axis=-1)
    t = l2_normalize(t.astype(jnp.float32), axis=-1)
    return l2_normalize(jnp.concatenate([t, v], axis=-1), axis=-1)


ASSIGNMENTS = ("sinkhorn", "softmax")


def check_assignment(assignment: str) -> None:
  if assignment not in ASSIGNMENTS:
    raise UserError(f"unknown SALAD assignment {assignment!r}", f"choose one of {ASSIGNMENTS}")


def torch_layout(
  dustbin: bool = True, assignment: str = "sinkhorn", global_token: bool = True
) -> list[tuple[str, tuple[str, ...], str]]:
  """(torch key after `aggregator.`, flax path, kind) in the official state_dict order; the
  ablations drop `dust_bin` (no dustbin, or softmax) and `token_features.*` (no global token)."""
  check_assignment(assignment)
  rows = [("dust_bin", ("dust_bin",), "raw")] if dustbin and assignment == "sinkhorn" else []
  parts = [("cluster_features", (0, 3), "conv1x1"), ("score", (0, 3), "conv1x1")]
  if global_token:
    parts.insert(0, ("token_features", (0, 2), "linear"))
  for name, idx, kind in parts:
    for i in idx:
      rows += [
        (f"{name}.{i}.weight", (f"{name}_{i}", "kernel"), kind),
        (f"{name}.{i}.bias", (f"{name}_{i}", "bias"), "raw"),
      ]
  return rows


def descriptor_dim(
  num_clusters: int = 64, cluster_dim: int = 128, token_dim: int = 256, global_token: bool = True
) -> int:
  return num_clusters * cluster_dim + (token_dim if global_token else 0)
