"""Multi-similarity loss with the multi-similarity miner, as pytorch-metric-learning computes them.

Static-shape, masked code over the N x N cosine-similarity matrix (no index lists), so it jits
once. Semantics (pytorch-metric-learning 2.x, MultiSimilarityMiner(epsilon) + MultiSimilarityLoss(
alpha, beta, base), both on cosine similarity of L2-normalised embeddings):

* candidate positives of anchor i: same label, j != i; candidate negatives: different label;
* keep positive (i, j) iff S_ij - epsilon < max over negatives k of S_ik;
  keep negative (i, k) iff S_ik + epsilon > min over positives j of S_ij;
  (the miner mines nothing when the batch has no candidate positive or no negative pair;)
* if at most one positive and at most one negative pair are mined, the loss is 0;
* L_i = 1/alpha log(1 + sum_P exp(-alpha (S_ij - base))) + 1/beta log(1 + sum_N exp(beta (S_ik - base)))
  (an empty set contributes 0) and the loss is the mean over all N anchors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from salad_jax.models.salad import l2_normalize


def cosine_similarity(embeddings: jax.Array) -> jax.Array:
  e = l2_normalize(embeddings.astype(jnp.float32), axis=-1)
  return jnp.dot(e, e.T, precision=jax.lax.Precision.HIGHEST)


def multi_similarity_miner(
  sim: jax.Array, labels: jax.Array, epsilon: float = 0.1, valid: jax.Array | None = None
):
  """Mined (pos_mask, neg_mask), [N, N] bool, from a similarity matrix (no gradient).

  `valid` [N] bool drops padding entries from every pair (a padded batch then mines exactly what
  the unpadded, smaller batch would).
  """
  sim = jax.lax.stop_gradient(sim)
  n = sim.shape[0]
  same = labels[:, None] == labels[None, :]
  both = jnp.ones((n, n), bool) if valid is None else valid[:, None] & valid[None, :]
  cand_pos = same & ~jnp.eye(n, dtype=bool) & both
  cand_neg = ~same & both
  big = jnp.finfo(sim.dtype).max
  hardest_neg = jnp.max(jnp.where(cand_neg, sim, -big), axis=1, keepdims=True)
  hardest_pos = jnp.min(jnp.where(cand_pos, sim, big), axis=1, keepdims=True)
  pos = cand_pos & (sim - epsilon < hardest_neg)
  neg = cand_neg & (sim + epsilon > hardest_pos)
  anything = cand_pos.any() & cand_neg.any()
  return pos & anything, neg & anything


def _masked_log1p_sum_exp(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Row-wise log(1 + sum_{mask} exp(x)); 0 for rows with an empty mask."""
  x = jnp.where(mask, x, -jnp.inf)
  x = jnp.concatenate([x, jnp.zeros((x.shape[0], 1), x.dtype)], axis=1)
  out = jax.nn.logsumexp(x, axis=1)
  return jnp.where(mask.any(axis=1), out, 0.0)


def multi_similarity_loss(
  descriptors: jax.Array,
  labels: jax.Array,
  *,
  alpha: float = 1.0,
  beta: float = 50.0,
  base: float = 0.0,
  epsilon: float = 0.1,
  valid: jax.Array | None = None,
):
  """Returns (loss, aux) for descriptors [N, D] and integer labels [N].

  `valid` [N] bool (optional): padding entries take no part, and the mean runs over valid anchors.

  aux: "pos_mask", "neg_mask" ([N, N] bool, the mined pairs), "b_acc" (fraction of anchors with
  no mined positive pair), "num_pos_pairs", "num_neg_pairs".
  """
  sim = cosine_similarity(descriptors)
  pos_mask, neg_mask = multi_similarity_miner(sim, labels, epsilon, valid)
  pos_loss = _masked_log1p_sum_exp(-alpha * (sim - base), pos_mask) / alpha
  neg_loss = _masked_log1p_sum_exp(beta * (sim - base), neg_mask) / beta
  num_pos, num_neg = pos_mask.sum(), neg_mask.sum()
  trivial = (num_pos <= 1) & (num_neg <= 1)
  w = jnp.ones(sim.shape[0], jnp.float32) if valid is None else valid.astype(jnp.float32)
  count = jnp.maximum(w.sum(), 1.0)
  loss = jnp.where(trivial, 0.0, jnp.sum((pos_loss + neg_loss) * w) / count)
  b_acc = 1.0 - jnp.sum(pos_mask.any(axis=1) * w) / count
  aux = {
    "pos_mask": pos_mask,
    "neg_mask": neg_mask,
    "b_acc": b_acc,
    "num_pos_pairs": num_pos,
    "num_neg_pairs": num_neg,
  }
  return loss, aux
