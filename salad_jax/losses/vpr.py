"""serizba/salad's loss and miner options by name: `vpr_loss`, as VPRModel.loss_function runs them.

`vpr_loss(descriptors, labels, loss=..., miner=..., miner_margin=...)` equals
`get_loss(loss)(descriptors, labels, get_miner(miner, miner_margin)(descriptors, labels))` of
the official utils/losses.py with pytorch-metric-learning 2.9.0 (without a miner:
`get_loss(loss)(descriptors, labels)`), with exactly the settings listed in LOSSES and MINERS.
Names are static: inside jit they pick the code that is traced, once per shape.

Two deliberate differences from the official code, both on names it cannot run:
* an unknown miner name is a UserError; the official get_miner returns None for it, so a typo
  there silently trains without a miner;
* "CentroidTripletLoss" is a UserError (see `centroid_triplet_error`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from salad_jax.errors import UserError
from salad_jax.losses import distances as D
from salad_jax.losses import pair_losses as P
from salad_jax.losses import tuples
from salad_jax.losses.fast_ap import fast_ap_loss
from salad_jax.losses.miners import multi_similarity_miner, pair_margin_miner, triplet_margin_miner
from salad_jax.losses.triplet_losses import triplet_margin_loss

# get_loss(name): pml class and the official settings (distance: pml's default unless named).
LOSSES = {
  "SupConLoss": functools.partial(P.supcon_loss, temperature=0.07),
  "CircleLoss": functools.partial(P.circle_loss, m=0.4, gamma=80.0),
  "MultiSimilarityLoss": functools.partial(
    P.multi_similarity_pair_loss, alpha=1.0, beta=50.0, base=0.0
  ),  # DotProductSimilarity
  "ContrastiveLoss": functools.partial(P.contrastive_loss, pos_margin=0.0, neg_margin=1.0),
  "Lifted": functools.partial(
    P.generalized_lifted_structure_loss, neg_margin=0.0, pos_margin=1.0
  ),  # GeneralizedLiftedStructureLoss, DotProduct
  "FastAPLoss": functools.partial(fast_ap_loss, num_bins=30),
  "NTXentLoss": functools.partial(P.ntxent_loss, temperature=0.07),
  "TripletMarginLoss": functools.partial(triplet_margin_loss, margin=0.1),
}


def _triplet_margin(descriptors, labels, margin, valid):
  return triplet_margin_miner(D.lp_distance(descriptors), labels, margin, "semihard", valid)


def _multi_similarity(descriptors, labels, margin, valid):
  return multi_similarity_miner(D.similarity(descriptors), labels, margin, valid)


def _pair_margin(descriptors, labels, margin, valid):
  del margin  # the official PairMarginMiner ignores miner_margin
  return pair_margin_miner(D.similarity(descriptors), labels, 0.7, 0.3, valid)


# get_miner(name, margin): TripletMarginMiner(margin, "semihard") on LpDistance,
# MultiSimilarityMiner(epsilon=margin, CosineSimilarity), PairMarginMiner(0.7, 0.3, DotProduct).
MINERS = {
  "TripletMarginMiner": _triplet_margin,
  "MultiSimilarityMiner": _multi_similarity,
  "PairMarginMiner": _pair_margin,
}


def centroid_triplet_error() -> UserError:
  """The official "CentroidTripletLoss" cannot run with the pml it needs.

  pytorch-metric-learning removed CentroidTripletLoss in 2.0.0 (commit bdf4747, Jan 2023; the
  serizba/salad environment pins 2.3.0), so the official get_loss raises AttributeError. Its
  last version (1.7.3) also rejected any miner output (indices_tuple_not_supported), which the
  official default passes, and had an open bug report (pml issue #451). There is no behaviour
  to match, so it is an error naming the closest working option.
  """
  return UserError(
    "loss 'CentroidTripletLoss' is not in pytorch-metric-learning 2.x (removed "
    "in 2.0.0), so the official code cannot run it either",
    "use loss='TripletMarginLoss' (the same triplet margin loss on the "
    "embeddings instead of class centroids)",
  )


def check_names(loss: str, miner: str | None) -> None:
  """UserError for a loss or miner name the official code does not offer (or cannot run)."""
  if loss == "CentroidTripletLoss":
    raise centroid_triplet_error()
  if loss not in LOSSES:
    raise UserError(f"unknown loss {loss!r}", f"choose one of {', '.join(LOSSES)}")
  if miner is not None and miner not in MINERS:
    raise UserError(
      f"unknown miner {miner!r}", f"choose one of {', '.join(MINERS)}, or None for no miner"
    )


def _counts(used: tuples.Pairs | tuples.Triplets) -> dict[str, jax.Array]:
  """Distinct positive / negative pairs in the tuples, and the triplets they make."""
  if isinstance(used, tuples.Triplets):
    t = used.mask
    pos, neg = t.any(axis=2), t.any(axis=1)
    num_triplets = jnp.sum(t, dtype=jnp.int32)
  else:
    pos, neg = (m.astype(bool) for m in used)
    num_triplets = jnp.sum(
      jnp.sum(pos, axis=1, dtype=jnp.int32) * jnp.sum(neg, axis=1, dtype=jnp.int32)
    )
  return {
    "num_pos_pairs": jnp.sum(pos, dtype=jnp.int32),
    "num_neg_pairs": jnp.sum(neg, dtype=jnp.int32),
    "num_triplets": num_triplets,
  }


def vpr_loss(
  descriptors: jax.Array,
  labels: jax.Array,
  *,
  loss: str = "MultiSimilarityLoss",
  miner: str | None = "MultiSimilarityMiner",
  miner_margin: float = 0.1,
  valid: jax.Array | None = None,
  loss_kwargs: dict | None = None,
):
  """Returns (loss, aux) for descriptors [N, D] and integer labels [N].

  `loss_kwargs` (optional) replace settings of the loss (e.g. alpha, beta, base of
  MultiSimilarityLoss); without them the loss is the official one.

  `valid` [N] bool (optional): padding entries take no part in mining or loss, so a padded
  batch gives the loss (and gradient) of the smaller batch.

  aux: "b_acc" (VPRModel's batch accuracy: 1 - |anchors of the miner's first index list| / N,
  with N the valid count; 0.0 without a miner), "num_pos_pairs", "num_neg_pairs" (distinct
  pairs in the mined tuples, or in all tuples without a miner), "num_triplets" (the triplets
  they make: mined triplets, or each anchor's mined positives x mined negatives), and the
  miner's masks: "pos_mask", "neg_mask" ([N, N] bool) or "triplet_mask" ([N, N, N] bool).
  """
  check_names(loss, miner)
  n = descriptors.shape[0]
  w = jnp.ones(n, jnp.float32) if valid is None else valid.astype(jnp.float32)
  if miner is None:
    mined = None
    everything = tuples.all_pairs(labels, valid)
    if loss == "TripletMarginLoss":
      everything = tuples.all_triplets(labels, valid)
    aux = {"b_acc": jnp.float32(0.0), **_counts(everything)}
  else:
    mined = MINERS[miner](descriptors, labels, miner_margin, valid)
    anchors = tuples.first_anchors(mined)
    b_acc = 1.0 - jnp.sum(anchors * w) / jnp.maximum(w.sum(), 1.0)
    aux = {"b_acc": b_acc, **_counts(mined)}
    if isinstance(mined, tuples.Triplets):
      aux["triplet_mask"] = mined.mask
    else:
      aux["pos_mask"], aux["neg_mask"] = mined
  value = LOSSES[loss](descriptors, labels, mined, valid=valid, **(loss_kwargs or {}))
  return value.astype(jnp.float32), aux
