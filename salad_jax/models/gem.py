"""GeM pooling (generalised mean): `GeMPool` of serizba/salad `models/aggregators/gem.py`.

The descriptor is the per-channel p-norm mean of the feature map, p learnable (init 3):
`(mean_hw clamp(x, eps)^p)^(1/p)`, flattened and L2-normalised. Inputs are NHWC.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from salad_jax.models.salad import l2_normalize


def gem_pool(x: jax.Array, p: jax.Array, eps: float = 1e-6) -> jax.Array:
  """[B, H, W, C] -> [B, C] float32, torch's `avg_pool2d(x.clamp(min=eps).pow(p)).pow(1/p)`.

  The clamp passes gradient where x >= eps, as torch's clamp_min does (jnp.maximum would halve
  it at ties). In float32 whatever the input dtype: a cube of bf16 features loses the mean.
  """
  x = x.astype(jnp.float32)
  p = jnp.asarray(p, jnp.float32)
  x = jnp.where(x >= eps, x, jnp.float32(eps)) ** p
  return jnp.mean(x, axis=(1, 2)) ** (jnp.float32(1.0) / p)


class GeM(nn.Module):
  """GeM without the normalisation: CosPlace's `gem` layer (param `p`, shape (1,))."""

  p_init: float = 3.0
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    return gem_pool(x, self.param("p", nn.initializers.constant(self.p_init), (1,)), self.eps)


class GeMPool(nn.Module):
  """The GeM aggregator: [B, H, W, C] -> [B, C] float32, unit norm.

  `token` and `train` are accepted (and ignored) so every head is called the same way.
  """

  p_init: float = 3.0
  eps: float = 1e-6

  @nn.compact
  def __call__(self, feats, token=None, train: bool = False):
    p = self.param("p", nn.initializers.constant(self.p_init), (1,))
    return l2_normalize(gem_pool(feats, p, self.eps), axis=-1)


def torch_layout() -> list[tuple[str, tuple[str, ...], str]]:
  """(torch key after `aggregator.`, flax path, kind) in the official state_dict order."""
  return [("p", ("p",), "raw")]


def descriptor_dim(in_channels: int) -> int:
  return in_channels
