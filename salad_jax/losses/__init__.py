"""Metric-learning losses and miners of serizba/salad, equal to pytorch-metric-learning 2.9.0.

`vpr_loss(descriptors, labels, loss=..., miner=..., miner_margin=..., valid=...)` runs any of
the official options by name (vpr.py); `multi_similarity_loss` is SALAD's default objective
with free parameters (multi_similarity.py). Modules, one job each: distances.py (pml's distance
matrices and reducers), tuples.py (mined pairs / triplets as masks and pml's conversions),
miners.py, pair_losses.py, triplet_losses.py, fast_ap.py.
"""

from salad_jax.losses.fast_ap import fast_ap_loss
from salad_jax.losses.miners import multi_similarity_miner, pair_margin_miner, triplet_margin_miner
from salad_jax.losses.multi_similarity import cosine_similarity, multi_similarity_loss
from salad_jax.losses.pair_losses import (
  circle_loss,
  contrastive_loss,
  generalized_lifted_structure_loss,
  multi_similarity_pair_loss,
  ntxent_loss,
  supcon_loss,
)
from salad_jax.losses.triplet_losses import triplet_margin_loss
from salad_jax.losses.tuples import Pairs, Triplets
from salad_jax.losses.vpr import LOSSES, MINERS, check_names, vpr_loss

__all__ = [
  "LOSSES",
  "MINERS",
  "Pairs",
  "Triplets",
  "check_names",
  "circle_loss",
  "contrastive_loss",
  "cosine_similarity",
  "fast_ap_loss",
  "generalized_lifted_structure_loss",
  "multi_similarity_loss",
  "multi_similarity_miner",
  "multi_similarity_pair_loss",
  "ntxent_loss",
  "pair_margin_miner",
  "supcon_loss",
  "triplet_margin_loss",
  "triplet_margin_miner",
  "vpr_loss",
]
