"""CosPlace's head (Berton et al. 2022) as in serizba/salad `models/aggregators/cosplace.py`.

L2-normalise each feature over channels, GeM-pool (learnable p, key `gem.p`), a Linear `fc`
to `out_dim`, L2-normalise. Inputs are NHWC.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from salad_jax.models.gem import GeM
from salad_jax.models.salad import l2_normalize
from salad_jax.models.vit import Dense


class CosPlace(nn.Module):
  """[B, H, W, C] -> [B, out_dim] float32, unit norm (`token`, `train` ignored)."""

  out_dim: int = 512
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats, token=None, train: bool = False):
    x = l2_normalize(feats.astype(jnp.float32), axis=-1)
    x = GeM(name="gem")(x)  # [B, C]
    x = Dense(self.out_dim, dtype=self.dtype, torch_init=True, name="fc")(x)
    return l2_normalize(x.astype(jnp.float32), axis=-1)


def torch_layout() -> list[tuple[str, tuple[str, ...], str]]:
  """(torch key after `aggregator.`, flax path, kind) in the official state_dict order."""
  return [
    ("gem.p", ("gem", "p"), "raw"),
    ("fc.weight", ("fc", "kernel"), "linear"),
    ("fc.bias", ("fc", "bias"), "raw"),
  ]


def descriptor_dim(out_dim: int = 512) -> int:
  return out_dim
