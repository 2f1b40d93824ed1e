"""MixVPR (Ali-bey et al. 2023) as in serizba/salad `models/aggregators/mixvpr.py` (the same file
as amaralibey/MixVPR).

The feature map is read as C rows of H*W values (torch's `flatten(2)` of NCHW: row-major h, w).
`mix_depth` Feature-Mixer layers act on each row (LayerNorm(hw) -> Linear(hw, hw*ratio) -> ReLU ->
Linear -> + residual); then `channel_proj` maps C -> out_channels, `row_proj` maps hw -> out_rows,
and the [B, out_channels, out_rows] result is flattened channel-major and L2-normalised.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from salad_jax.errors import UserError
from salad_jax.models.salad import l2_normalize
from salad_jax.models.vit import Dense, LayerNorm


def torch_trunc_normal(std: float = 0.02, lo: float = -2.0, hi: float = 2.0):
  """torch.nn.init.trunc_normal_(std=std) with its default bounds, which are absolute values
  (+-2, i.e. +-100 std here), not multiples of std: in effect N(0, std^2). Flax's
  truncated_normal(std) cuts at +-2 std instead (a 12 % smaller spread)."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.truncated_normal(key, lo / std, hi / std, shape, dtype) * std

  return init


class MixerDense(nn.Module):
  """nn.Linear initialised as FeatureMixerLayer does: trunc_normal(std 0.02) weight, zero bias."""

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", torch_trunc_normal(0.02), (x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    return jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)


class FeatureMixerLayer(nn.Module):
  """x + Linear(ReLU(Linear(LayerNorm(x)))) over the last axis (hw); names `mix_0/1/3` mirror the
  torch nn.Sequential indices. LayerNorm eps is torch's default, 1e-5."""

  mlp_ratio: float = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    hw = x.shape[-1]
    h = LayerNorm(epsilon=1e-5, dtype=self.dtype, name="mix_0")(x)
    h = MixerDense(int(hw * self.mlp_ratio), self.dtype, name="mix_1")(h)
    h = MixerDense(hw, self.dtype, name="mix_3")(jax.nn.relu(h))
    return x + h


class MixVPR(nn.Module):
  """[B, H, W, C] with H*W == in_h*in_w -> [B, out_channels*out_rows] float32, unit norm.

  Like torch, any map with in_h*in_w cells is accepted (only the count is fixed by the weights).
  `feature_stride` (image pixels per map cell: 14 for DINOv2, 16 for ResNet-50 cut after layer3)
  only names the image size that fits in the error for a wrong size. `token`, `train` ignored.
  """

  in_h: int = 20
  in_w: int = 20
  out_channels: int = 512
  mix_depth: int = 1
  mlp_ratio: float = 1
  out_rows: int = 4
  feature_stride: int = 14
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats, token=None, train: bool = False):
    b, h, w, c = feats.shape
    hw = self.in_h * self.in_w
    if h * w != hw:
      s = self.feature_stride
      raise UserError(
        f"MixVPR was built for a {self.in_h}x{self.in_w} feature map ({hw} cells) but got "
        f"{h}x{w} ({h * w} cells)",
        f"use {self.in_h * s}x{self.in_w * s} images (feature stride {s}), or build MixVPR "
        f"with in_h={h}, in_w={w}",
      )
    x = jnp.swapaxes(feats.reshape(b, hw, c), 1, 2)  # [B, C, hw]
    for i in range(self.mix_depth):
      x = FeatureMixerLayer(self.mlp_ratio, self.dtype, name=f"mix_{i}")(x)
    x = Dense(self.out_channels, dtype=self.dtype, torch_init=True, name="channel_proj")(
      jnp.swapaxes(x, 1, 2)
    )  # [B, hw, out_channels]
    x = Dense(self.out_rows, dtype=self.dtype, torch_init=True, name="row_proj")(
      jnp.swapaxes(x, 1, 2)
    )  # [B, out_channels, out_rows]
    return l2_normalize(x.reshape(b, -1).astype(jnp.float32), axis=-1)


def torch_layout(mix_depth: int = 1) -> list[tuple[str, tuple[str, ...], str]]:
  """(torch key after `aggregator.`, flax path, kind) in the official state_dict order."""
  rows = []
  for i in range(mix_depth):
    t, f = f"mix.{i}.mix", (f"mix_{i}",)
    rows += [
      (f"{t}.0.weight", f + ("mix_0", "scale"), "raw"),
      (f"{t}.0.bias", f + ("mix_0", "bias"), "raw"),
    ]
    for j in (1, 3):
      rows += [
        (f"{t}.{j}.weight", f + (f"mix_{j}", "kernel"), "linear"),
        (f"{t}.{j}.bias", f + (f"mix_{j}", "bias"), "raw"),
      ]
  for name in ("channel_proj", "row_proj"):
    rows += [
      (f"{name}.weight", (name, "kernel"), "linear"),
      (f"{name}.bias", (name, "bias"), "raw"),
    ]
  return rows


def descriptor_dim(out_channels: int = 512, out_rows: int = 4) -> int:
  return out_channels * out_rows
