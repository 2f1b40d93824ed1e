"""pml's TripletMarginLoss with serizba/salad's settings, over an [N, N, N] triplet mask.

`triplet_margin_loss(descriptors, labels, mined=None, *, valid=None, margin=0.1)` equals
`TripletMarginLoss(margin=0.1, swap=False, smooth_loss=False, triplets_per_anchor="all")` of
pytorch-metric-learning 2.9.0 on LpDistance: relu(d_ap - d_an + margin) for every triplet in
lmu.convert_to_triplets (all triplets without a miner; every mined positive of an anchor with
every mined negative of that anchor for pair miners), AvgNonZeroReducer. For N = 240 the
[N, N, N] fp32 terms are 55 MB; nothing bigger is built.
"""

from __future__ import annotations

import jax

from salad_jax.losses import distances as D
from salad_jax.losses.tuples import Mined, to_triplets


def triplet_margin_loss(
  descriptors, labels, mined: Mined = None, *, valid=None, margin: float = 0.1
):
  weights = to_triplets(mined, labels, valid)
  dist = D.lp_distance(descriptors)
  violation = (dist[:, :, None] - dist[:, None, :]) + margin  # [a, p, n]
  return D.avg_nonzero_reduce(jax.nn.relu(violation), weights)
