"""ConvAP (Ali-bey et al. 2022), the aggregator of serizba/salad `models/aggregators/convap.py`.

A 1x1 convolution to `out_channels`, torch's AdaptiveAvgPool2d to an s1 x s2 grid, flattened
channel-major ([B, C_out, s1, s2] as torch lays it out) and L2-normalised. Inputs are NHWC.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from salad_jax.models.salad import l2_normalize
from salad_jax.models.vit import Dense


def adaptive_bins(size: int, out: int) -> tuple[np.ndarray, np.ndarray]:
  """0/1 masks [out, size] of torch's adaptive-pool bins and their cell counts [out].

  Bin i covers [floor(i*size/out), ceil((i+1)*size/out)): bins overlap when size is not a
  multiple of out, and repeat cells when out > size, as in torch.
  """
  i = np.arange(out)
  start, end = (i * size) // out, -((-(i + 1) * size) // out)
  cells = np.arange(size)
  mask = (cells[None, :] >= start[:, None]) & (cells[None, :] < end[:, None])
  return mask.astype(np.float32), (end - start).astype(np.float32)


def adaptive_avg_pool(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """[B, H, W, C] -> [B, C, s1, s2] float32 (torch's layout): window sums / window cell counts."""
  mh, ch = adaptive_bins(x.shape[1], out_hw[0])
  mw, cw = adaptive_bins(x.shape[2], out_hw[1])
  sums = jnp.einsum(
    "ih,jw,bhwc->bcij", mh, mw, x.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
  )
  return sums / (ch[:, None] * cw[None, :])


class ConvAP(nn.Module):
  """[B, H, W, C] -> [B, out_channels * s1 * s2] float32, unit norm; element (o, i, j) at
  (o * s1 + i) * s2 + j. `token` and `train` are ignored (one call signature for all heads)."""

  out_channels: int = 512
  s1: int = 2
  s2: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats, token=None, train: bool = False):
    y = Dense(self.out_channels, dtype=self.dtype, torch_init=True, name="channel_pool")(feats)
    y = adaptive_avg_pool(y, (self.s1, self.s2))
    return l2_normalize(y.reshape(y.shape[0], -1), axis=-1)


def torch_layout() -> list[tuple[str, tuple[str, ...], str]]:
  """(torch key after `aggregator.`, flax path, kind) in the official state_dict order."""
  return [
    ("channel_pool.weight", ("channel_pool", "kernel"), "conv1x1"),
    ("channel_pool.bias", ("channel_pool", "bias"), "raw"),
  ]


def descriptor_dim(out_channels: int = 512, s1: int = 2, s2: int = 2) -> int:
  return out_channels * s1 * s2
