"""Mined tuples as static-shape masks, and pml's conversions between them.

pytorch-metric-learning passes index lists: pairs (a1, p, a2, n) or triplets (a, p, n). Here:

* `Pairs(pos, neg)`: [N, N] masks; `pos[a, p]` is how many times the pair (a, p) is in the list
  (bool for a miner's output, whose pairs are unique; int32 counts after a conversion);
* `Triplets(mask)`: [N, N, N] bool, `mask[a, p, n]` (miners and conversions give unique ones).

The conversions keep pml's multiplicities (lmu.convert_to_pairs / convert_to_triplets):
triplets -> pairs lists (a, p) once per n and (a, n) once per p, so list-based losses
(ContrastiveLoss, NTXentLoss) count the duplicates while mask-based ones (`pos_mask[a1, p] = 1`)
do not; pairs -> triplets joins every mined positive of an anchor with every mined negative of
the same anchor. `valid` [N] bool takes padding out of every candidate pair and triplet.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Pairs(NamedTuple):
  pos: jax.Array  # [N, N] bool or int32 count
  neg: jax.Array  # [N, N] bool or int32 count


class Triplets(NamedTuple):
  mask: jax.Array  # [N, N, N] bool


Mined = Pairs | Triplets | None


def valid_pairs(n: int, valid: jax.Array | None) -> jax.Array:
  if valid is None:
    return jnp.ones((n, n), bool)
  return valid[:, None] & valid[None, :]


def all_pairs(labels: jax.Array, valid: jax.Array | None = None) -> Pairs:
  """lmu.get_all_pairs_indices: positives share the label (not the element itself), negatives
  do not."""
  n = labels.shape[0]
  same = labels[:, None] == labels[None, :]
  both = valid_pairs(n, valid)
  return Pairs(same & ~jnp.eye(n, dtype=bool) & both, ~same & both)


def all_triplets(labels: jax.Array, valid: jax.Array | None = None) -> Triplets:
  """lmu.get_all_triplets_indices: every (anchor, positive, negative) of the batch."""
  pos, neg = all_pairs(labels, valid)
  return Triplets(pos[:, :, None] & neg[:, None, :])


def to_pairs(mined: Mined, labels: jax.Array, valid: jax.Array | None = None) -> Pairs:
  """lmu.convert_to_pairs, as int32 multiplicities."""
  if mined is None:
    mined = all_pairs(labels, valid)
  if isinstance(mined, Triplets):
    t = mined.mask.astype(jnp.int32)
    return Pairs(t.sum(axis=2), t.sum(axis=1))
  return Pairs(mined.pos.astype(jnp.int32), mined.neg.astype(jnp.int32))


def to_triplets(mined: Mined, labels: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """lmu.convert_to_triplets (t_per_anchor='all'): [N, N, N] multiplicities (bool when unique)."""
  if mined is None:
    return all_triplets(labels, valid).mask
  if isinstance(mined, Triplets):
    return mined.mask
  pos, neg = mined
  if pos.dtype == bool and neg.dtype == bool:
    return pos[:, :, None] & neg[:, None, :]
  return pos.astype(jnp.int32)[:, :, None] * neg.astype(jnp.int32)[:, None, :]


def first_anchors(mined: Pairs | Triplets) -> jax.Array:
  """[N] bool: the elements of the miner's first index list (a1 of pairs, a of triplets)."""
  if isinstance(mined, Triplets):
    return mined.mask.any(axis=(1, 2))
  return mined.pos.astype(bool).any(axis=1)


def occurrence_weights(mined: Mined, n: int) -> jax.Array:
  """lmu.convert_to_weights: how often each element appears anywhere in the tuple lists, over the
  largest such count; all ones when nothing was mined (or no miner ran)."""
  if mined is None:
    return jnp.ones(n, jnp.float32)
  if isinstance(mined, Triplets):
    t = mined.mask.astype(jnp.int32)
    counts = t.sum(axis=(1, 2)) + t.sum(axis=(0, 2)) + t.sum(axis=(0, 1))
  else:
    pos, neg = (m.astype(jnp.int32) for m in mined)
    counts = pos.sum(1) + pos.sum(0) + neg.sum(1) + neg.sum(0)
  top = jnp.max(counts)
  return jnp.where(
    top > 0, counts.astype(jnp.float32) / jnp.maximum(top, 1).astype(jnp.float32), 1.0
  )
