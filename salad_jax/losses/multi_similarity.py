"""SALAD's default objective in one call: the multi-similarity miner + loss, with free parameters.

`multi_similarity_loss(descriptors, labels, alpha, beta, base, epsilon, valid)` equals
`vpr_loss(..., loss="MultiSimilarityLoss", miner="MultiSimilarityMiner", miner_margin=epsilon)`
at the default parameters, and lets alpha, beta and base differ from serizba/salad's. Semantics
(pytorch-metric-learning 2.x, both on cosine similarity of L2-normalised embeddings):

* candidate positives of anchor i: same label, j != i; candidate negatives: different label;
* keep positive (i, j) iff S_ij - epsilon < max over negatives k of S_ik;
  keep negative (i, k) iff S_ik + epsilon > min over positives j of S_ij;
  (the miner mines nothing when the batch has no candidate positive or no negative pair;)
* if at most one positive and at most one negative pair are mined, the loss is 0;
* L_i = 1/alpha log(1 + sum_P exp(-alpha (S_ij - base)))
        + 1/beta log(1 + sum_N exp(beta (S_ik - base)))
  (an empty set contributes 0) and the loss is the mean over all N anchors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from salad_jax.losses import distances as D
from salad_jax.losses.miners import multi_similarity_miner
from salad_jax.losses.pair_losses import multi_similarity_terms


def cosine_similarity(embeddings: jax.Array) -> jax.Array:
  return D.similarity(embeddings)


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
  per_anchor = multi_similarity_terms(sim, pos_mask, neg_mask, alpha, beta, base)
  num_pos, num_neg = pos_mask.sum(), neg_mask.sum()
  trivial = (num_pos <= 1) & (num_neg <= 1)
  w = jnp.ones(sim.shape[0], jnp.float32) if valid is None else valid.astype(jnp.float32)
  count = jnp.maximum(w.sum(), 1.0)
  loss = jnp.where(trivial, 0.0, D.mean_reduce(per_anchor, w))
  b_acc = 1.0 - jnp.sum(pos_mask.any(axis=1) * w) / count
  aux = {
    "pos_mask": pos_mask,
    "neg_mask": neg_mask,
    "b_acc": b_acc,
    "num_pos_pairs": num_pos,
    "num_neg_pairs": num_neg,
  }
  return loss, aux
