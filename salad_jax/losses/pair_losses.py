"""pml's GenericPairLoss family with serizba/salad's settings (utils/losses.py get_loss).

Each loss is `f(descriptors, labels, mined=None, *, valid=None, **settings) -> scalar`, equal to
`pml_loss(descriptors, labels, indices_tuple)` in pytorch-metric-learning 2.9.0:

* the tuples go through lmu.convert_to_pairs (`tuples.to_pairs`, with multiplicities); no miner
  means all pairs of the batch;
* the loss is 0 when at most one positive and at most one negative pair are left (pml returns
  `sum(embeddings * 0)` then);
* mask-based losses (MultiSimilarity, Circle, GeneralizedLiftedStructure, SupCon) see each pair
  once however often it is listed; list-based ones (Contrastive, NTXent) see every copy;
* each loss reduces as its pml default reducer does; `valid` [N] bool leaves padding out of the
  pairs and out of the anchors that are averaged over.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from salad_jax.losses import distances as D
from salad_jax.losses.tuples import Mined, Pairs, to_pairs

_TINY = float(jnp.finfo(jnp.float32).tiny)  # pml's c_f.small_val


def _pairs_or_zero(mined: Mined, labels, valid) -> tuple[Pairs, jax.Array]:
  """Converted pairs and GenericPairLoss's 'every index list has length <= 1' test."""
  pairs = to_pairs(mined, labels, valid)
  trivial = (jnp.sum(pairs.pos) <= 1) & (jnp.sum(pairs.neg) <= 1)
  return pairs, trivial


def _anchor_weights(n: int, valid) -> jax.Array:
  return jnp.ones(n, jnp.float32) if valid is None else valid.astype(jnp.float32)


def multi_similarity_terms(sim, pos_mask, neg_mask, alpha: float, beta: float, base: float):
  """Per-anchor MultiSimilarityLoss on a similarity matrix (mask-based)."""
  pos_loss = D.masked_logsumexp(-alpha * (sim - base), pos_mask, add_one=True) / alpha
  neg_loss = D.masked_logsumexp(beta * (sim - base), neg_mask, add_one=True) / beta
  return pos_loss + neg_loss


def multi_similarity_pair_loss(
  descriptors,
  labels,
  mined: Mined = None,
  *,
  valid=None,
  alpha: float = 1.0,
  beta: float = 50.0,
  base: float = 0.0,
):
  """MultiSimilarityLoss(alpha=1, beta=50, base=0, DotProductSimilarity()); MeanReducer over
  all (valid) anchors, anchors without pairs counting as 0. (`multi_similarity_loss` of the
  package is the same objective with its miner and aux in one call.)"""
  pairs, trivial = _pairs_or_zero(mined, labels, valid)
  sim = D.similarity(descriptors)
  per_anchor = multi_similarity_terms(sim, pairs.pos > 0, pairs.neg > 0, alpha, beta, base)
  loss = D.mean_reduce(per_anchor, _anchor_weights(sim.shape[0], valid))
  return jnp.where(trivial, 0.0, loss)


def contrastive_loss(
  descriptors,
  labels,
  mined: Mined = None,
  *,
  valid=None,
  pos_margin: float = 0.0,
  neg_margin: float = 1.0,
):
  """ContrastiveLoss(pos_margin=0, neg_margin=1) on LpDistance: relu(d_ap - pos_margin) and
  relu(neg_margin - d_an) per listed pair, each averaged over its non-zero entries, summed."""
  pairs, trivial = _pairs_or_zero(mined, labels, valid)
  dist = D.lp_distance(descriptors)
  pos = D.avg_nonzero_reduce(jax.nn.relu(dist - pos_margin), pairs.pos)
  neg = D.avg_nonzero_reduce(jax.nn.relu(neg_margin - dist), pairs.neg)
  return jnp.where(trivial, 0.0, pos + neg)


def _softplus(x):
  """torch.nn.Softplus(beta=1) with its threshold=20: linear above 20."""
  return jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))))


def circle_loss(
  descriptors, labels, mined: Mined = None, *, valid=None, m: float = 0.4, gamma: float = 80.0
):
  """CircleLoss(m=0.4, gamma=80) on CosineSimilarity; AvgNonZeroReducer over anchors. The
  self-paced weights relu(1 + m - s_p) and relu(s_n + m) carry no gradient, as in pml."""
  pairs, trivial = _pairs_or_zero(mined, labels, valid)
  sim = D.similarity(descriptors)
  pos_mask, neg_mask = pairs.pos > 0, pairs.neg > 0
  fixed = jax.lax.stop_gradient(sim)
  logit_p = -gamma * jax.nn.relu(1.0 + m - fixed) * (sim - (1.0 - m))
  logit_n = gamma * jax.nn.relu(fixed + m) * (sim - m)
  per_anchor = _softplus(
    D.masked_logsumexp(logit_p, pos_mask, add_one=False)
    + D.masked_logsumexp(logit_n, neg_mask, add_one=False)
  )
  per_anchor = jnp.where(pos_mask.any(axis=1) & neg_mask.any(axis=1), per_anchor, 0.0)
  return jnp.where(trivial, 0.0, D.avg_nonzero_reduce(per_anchor, jnp.ones_like(per_anchor)))


def generalized_lifted_structure_loss(
  descriptors,
  labels,
  mined: Mined = None,
  *,
  valid=None,
  neg_margin: float = 0.0,
  pos_margin: float = 1.0,
):
  """GeneralizedLiftedStructureLoss(neg_margin=0, pos_margin=1, DotProductSimilarity()):
  relu(logsumexp_P(pos_margin - s) + logsumexp_N(s - neg_margin)) per anchor; MeanReducer."""
  pairs, trivial = _pairs_or_zero(mined, labels, valid)
  sim = D.similarity(descriptors)
  per_anchor = jax.nn.relu(
    D.masked_logsumexp(pos_margin - sim, pairs.pos > 0, add_one=False)
    + D.masked_logsumexp(sim - neg_margin, pairs.neg > 0, add_one=False)
  )
  loss = D.mean_reduce(per_anchor, _anchor_weights(sim.shape[0], valid))
  return jnp.where(trivial, 0.0, loss)


def supcon_loss(descriptors, labels, mined: Mined = None, *, valid=None, temperature: float = 0.07):
  """SupConLoss(temperature=0.07) on CosineSimilarity: per anchor, minus the mean over its
  positives of log softmax over its positives and negatives; AvgNonZeroReducer. 0 unless some
  positive and some negative pair are left."""
  pairs, trivial = _pairs_or_zero(mined, labels, valid)
  sim = D.similarity(descriptors)
  pos_mask, neg_mask = pairs.pos > 0, pairs.neg > 0
  logits = sim / temperature
  cols = jnp.ones(sim.shape[0], bool) if valid is None else valid
  row_max = jnp.max(jnp.where(cols[None, :], logits, -jnp.inf), axis=1, keepdims=True)
  logits = logits - jax.lax.stop_gradient(row_max)  # value-neutral, for stability (as pml)
  log_prob = logits - D.masked_logsumexp(logits, pos_mask | neg_mask, add_one=False)[:, None]
  pos_f = pos_mask.astype(jnp.float32)
  per_anchor = -jnp.sum(jnp.where(pos_mask, log_prob, 0.0), axis=1) / (pos_f.sum(1) + _TINY)
  loss = D.avg_nonzero_reduce(per_anchor, jnp.ones_like(per_anchor))
  return jnp.where(trivial | ~pos_mask.any() | ~neg_mask.any(), 0.0, loss)


def ntxent_loss(descriptors, labels, mined: Mined = None, *, valid=None, temperature: float = 0.07):
  """NTXentLoss(temperature=0.07) on CosineSimilarity, list-based: for each listed positive pair
  (a, p), -log(e^{s_ap/t} / (e^{s_ap/t} + sum over listed negatives (a, n), with repeats, of
  e^{s_an/t}) + tiny); MeanReducer over the listed positive pairs."""
  pairs, trivial = _pairs_or_zero(mined, labels, valid)
  sim = D.similarity(descriptors)
  logits = sim / temperature
  neg_w = pairs.neg.astype(jnp.float32)
  has_neg = pairs.neg.any(axis=1, keepdims=True)
  neg_max = jnp.max(jnp.where(pairs.neg > 0, logits, -jnp.inf), axis=1, keepdims=True)
  neg_max = jax.lax.stop_gradient(jnp.where(has_neg, neg_max, 0.0))
  # sum_n w e^{l_an - m_ap} = e^{neg_max - m_ap} sum_n w e^{l_an - neg_max}, m_ap >= neg_max
  neg_sum = jnp.sum(
    neg_w * jnp.exp(jnp.where(pairs.neg > 0, logits - neg_max, 0.0)), axis=1, keepdims=True
  )
  max_val = jax.lax.stop_gradient(jnp.where(has_neg, jnp.maximum(logits, neg_max), logits))
  numerator = jnp.exp(logits - max_val)
  denominator = jnp.where(has_neg, jnp.exp(neg_max - max_val) * neg_sum, 0.0) + numerator
  per_pair = -jnp.log(numerator / denominator + _TINY)
  loss = D.mean_reduce(per_pair, pairs.pos)
  return jnp.where(trivial | ~pairs.pos.any() | ~pairs.neg.any(), 0.0, loss)
