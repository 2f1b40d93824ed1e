"""pml's FastAPLoss (histogram-binned average precision) with serizba/salad's num_bins=30.

Equal to `FastAPLoss(num_bins=30)` of pytorch-metric-learning 2.9.0: squared Euclidean
distances of the unit embeddings (LpDistance(power=2)) are soft-binned into num_bins + 1
triangular bins over [0, 4]; per anchor with a positive, AP = sum_b h+_b H+_b / H_b / N+ from
the positive and all-pair histograms (h) and their cumulative sums (H), over bins where
h+_b H+_b > 0 and H_b > 0. The loss is the mean of (1 - AP) * w over those anchors.

A miner does not select pairs here (FastAP always bins every pair of the batch): as in pml it
only weights each anchor by how often it appears in the mined lists, over the largest such
count (`tuples.occurrence_weights`; all ones when nothing was mined).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from salad_jax.losses import distances as D
from salad_jax.losses.tuples import Mined, all_pairs, occurrence_weights


def fast_ap_loss(descriptors, labels, mined: Mined = None, *, valid=None, num_bins: int = 30):
  n = descriptors.shape[0]
  weights = occurrence_weights(mined, n)
  pos_mask, neg_mask = all_pairs(labels, valid)
  n_pos = pos_mask.sum(axis=1)
  safe_n = n_pos > 0

  d2 = D.lp_distance(descriptors, power=2)
  top = 2.0**2  # histogram_max = 2 ** distance.power
  delta = top / num_bins
  mids = jnp.asarray(np.linspace(0.0, top, num_bins + 1), jnp.float32)[:, None, None]
  pulse = jax.nn.relu(1.0 - jnp.abs(d2[None] - mids) / delta)  # [bins + 1, N, N]
  pos_hist = jnp.sum(jnp.where(pos_mask[None], pulse, 0.0), axis=2).T  # [N, bins + 1]
  neg_hist = jnp.sum(jnp.where(neg_mask[None], pulse, 0.0), axis=2).T
  total_pos = jnp.cumsum(pos_hist, axis=1)
  total = jnp.cumsum(pos_hist + neg_hist, axis=1)
  h_pos = pos_hist * total_pos
  safe_h = (h_pos > 0) & (total > 0)
  ap = jnp.sum(jnp.where(safe_h, h_pos / jnp.where(safe_h, total, 1.0), 0.0), axis=1)
  ap = ap / jnp.maximum(n_pos, 1).astype(jnp.float32)
  loss = D.mean_reduce((1.0 - ap) * weights, safe_n)
  return jnp.where(safe_n.any() & safe_h.any(), loss, 0.0)
