"""torch.nn.BatchNorm2d in Flax linen, with statistics over the valid examples of a padded batch.

Not Flax's BatchNorm (which keeps the biased batch variance in its running average): running_var
takes the unbiased one, and `num_batches_tracked` counts the updates, as torch's does. The
running statistics live in the `batch_stats` collection; params `scale`, `bias` mirror torch's
`weight`, `bias`. Statistics are computed in float32 whatever the compute dtype.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from salad_jax.errors import UserError
from salad_jax.models.attention import low_precision

BN_EPS, BN_MOMENTUM = 1e-5, 0.1


def _bn_eval(x, mean, var, scale, bias, epsilon, dtype):
  y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + epsilon) * scale + bias
  return y.astype(dtype)


def _bn_train(x, scale, bias, epsilon, dtype):
  xf = x.astype(jnp.float32)
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(xf, axis=axes)  # over the global batch, also when it is sharded (GSPMD)
  centered = xf - mean
  var = jnp.mean(centered * centered, axis=axes)  # biased: what torch normalises with
  y = centered * jax.lax.rsqrt(var + epsilon) * scale + bias
  return y.astype(dtype), mean, var


def _bn_train_masked(x, weight, scale, bias, epsilon, dtype):
  """`_bn_train` with the statistics over the examples whose `weight` [B] is 1 (0: padding)."""
  xf = x.astype(jnp.float32)
  axes = tuple(range(x.ndim - 1))
  w = weight.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
  cells = x.size // (x.shape[0] * x.shape[-1])  # H * W
  count = jnp.maximum(jnp.sum(weight.astype(jnp.float32)) * cells, 1.0)
  mean = jnp.sum(xf * w, axis=axes) / count
  centered = xf - mean
  var = jnp.sum(centered * centered * w, axis=axes) / count
  y = centered * jax.lax.rsqrt(var + epsilon) * scale + bias
  return y.astype(dtype), mean, var, count


class BatchNorm(nn.Module):
  """torch.nn.BatchNorm2d over the channels-last axis; statistics in float32.

  Eval: running stats. Train: batch mean and biased variance over (B, H, W); then running_mean/
  running_var <- (1 - momentum) * running + momentum * batch stat, with the unbiased variance
  for running_var, and num_batches_tracked += 1 (not while initialising, as torch's fresh
  module). The update needs `mutable=["batch_stats"]`. `valid` [B] bool (optional): the batch
  statistics, and so the normalisation and the update, come from the valid examples only.
  """

  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, valid=None):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    ra_mean = self.variable("batch_stats", "running_mean", jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable("batch_stats", "running_var", jnp.ones, (c,), jnp.float32)
    count = self.variable("batch_stats", "num_batches_tracked", jnp.zeros, (), jnp.int32)
    if not train:
      return low_precision(_bn_eval, self.dtype, static_argnums=(5, 6))(
        x, ra_mean.value, ra_var.value, scale, bias, self.epsilon, self.dtype
      )
    n = x.size // c
    if n < 2:
      raise UserError(
        f"BatchNorm in train mode needs more than 1 value per channel, got input "
        f"shape {tuple(x.shape)}",
        "use a larger batch or image (torch refuses too)",
      )
    if valid is None:
      y, mean, var = low_precision(_bn_train, self.dtype, static_argnums=(3, 4))(
        x, scale, bias, self.epsilon, self.dtype
      )
    else:  # statistics of the valid examples only: a padded batch acts as the smaller one
      y, mean, var, n = low_precision(_bn_train_masked, self.dtype, static_argnums=(4, 5))(
        x, valid, scale, bias, self.epsilon, self.dtype
      )
    if not self.is_initializing():
      mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
      m = self.momentum
      ra_mean.value = m * mean + (1 - m) * ra_mean.value
      unbiased = n / (n - 1) if isinstance(n, int) else n / jnp.maximum(n - 1.0, 1.0)
      ra_var.value = m * (var * unbiased) + (1 - m) * ra_var.value
      count.value = count.value + 1
    return y
