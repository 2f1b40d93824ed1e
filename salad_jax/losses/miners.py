"""The three miners serizba/salad offers (utils/losses.py get_miner), as masks.

Each takes the matrix its pml counterpart computes (SALAD's settings: MultiSimilarityMiner on
CosineSimilarity, PairMarginMiner on DotProductSimilarity, TripletMarginMiner on the default
LpDistance) and returns what pml's index lists hold, as `Pairs` or `Triplets` masks. Mining
runs without gradient (pml mines under torch.no_grad). `valid` [N] bool keeps padding out of
every candidate, so a padded batch mines exactly what the unpadded, smaller batch would.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from salad_jax.losses.tuples import Pairs, Triplets, all_pairs


def multi_similarity_miner(
  sim: jax.Array, labels: jax.Array, epsilon: float = 0.1, valid: jax.Array | None = None
) -> Pairs:
  """MultiSimilarityMiner(epsilon) on a similarity matrix: (pos_mask, neg_mask), [N, N] bool.

  Keeps positive (i, j) iff S_ij - epsilon < max over negatives k of S_ik, and negative (i, k)
  iff S_ik + epsilon > min over positives j of S_ij; mines nothing when the batch has no
  candidate positive or no candidate negative pair.
  """
  sim = jax.lax.stop_gradient(sim)
  cand_pos, cand_neg = all_pairs(labels, valid)
  big = jnp.finfo(sim.dtype).max  # pml fills ignored entries with +-finfo.max too
  hardest_neg = jnp.max(jnp.where(cand_neg, sim, -big), axis=1, keepdims=True)
  hardest_pos = jnp.min(jnp.where(cand_pos, sim, big), axis=1, keepdims=True)
  pos = cand_pos & (sim - epsilon < hardest_neg)
  neg = cand_neg & (sim + epsilon > hardest_pos)
  anything = cand_pos.any() & cand_neg.any()
  return Pairs(pos & anything, neg & anything)


def pair_margin_miner(
  sim: jax.Array,
  labels: jax.Array,
  pos_margin: float = 0.7,
  neg_margin: float = 0.3,
  valid: jax.Array | None = None,
) -> Pairs:
  """PairMarginMiner on a similarity (an inverted distance): positives with S < pos_margin,
  negatives with S > neg_margin."""
  sim = jax.lax.stop_gradient(sim)
  cand_pos, cand_neg = all_pairs(labels, valid)
  return Pairs(cand_pos & (sim < pos_margin), cand_neg & (sim > neg_margin))


TRIPLET_TYPES = ("all", "hard", "semihard", "easy")


def triplet_margin_miner(
  dist: jax.Array,
  labels: jax.Array,
  margin: float = 0.1,
  type_of_triplets: str = "semihard",
  valid: jax.Array | None = None,
) -> Triplets:
  """TripletMarginMiner on a distance matrix: m = d_an - d_ap over all triplets; "all" keeps
  m <= margin, "hard" also m <= 0, "semihard" also m > 0, "easy" keeps m > margin."""
  if type_of_triplets not in TRIPLET_TYPES:
    raise ValueError(f"type_of_triplets {type_of_triplets!r}: expected one of {TRIPLET_TYPES}")
  dist = jax.lax.stop_gradient(dist)
  cand_pos, cand_neg = all_pairs(labels, valid)
  m = dist[:, None, :] - dist[:, :, None]  # [a, p, n] = d_an - d_ap
  if type_of_triplets == "easy":
    keep = m > margin
  else:
    keep = m <= margin
    if type_of_triplets == "hard":
      keep &= m <= 0
    elif type_of_triplets == "semihard":
      keep &= m > 0
  return Triplets(keep & cand_pos[:, :, None] & cand_neg[:, None, :])
