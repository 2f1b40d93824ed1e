"""DINOv2 Vision Transformer (S/14, B/14, L/14, g/14; plain or with registers) in Flax linen.

Parameter paths mirror the torch hub state_dict (`blocks.3.attn.qkv.weight` -> `blocks_3/attn/qkv/
kernel`), so conversion is a rename + transpose table (`salad_jax.convert`).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from salad_jax.models import grads, posembed
from salad_jax.models.attention import (
  attention_impl,
  chunked_attention,
  low_precision,
  xla_attention,
)

PATCH = 14
PRETRAIN_SIZE = 518  # the 37 x 37 pos-embed grid of the hub checkpoints

# One table of the hub factories (dinov2/hub/backbones.py); head dim 64 everywhere.
VARIANTS: dict[str, dict[str, Any]] = {
  "S/14": dict(width=384, depth=12, heads=6, ffn="mlp"),
  "B/14": dict(width=768, depth=12, heads=12, ffn="mlp"),
  "L/14": dict(width=1024, depth=24, heads=16, ffn="mlp"),
  "g/14": dict(width=1536, depth=40, heads=24, ffn="swiglu"),
  # not a DINOv2 release: a small ViT for the embedded demo and quick experiments
  "Nano/14": dict(width=128, depth=4, heads=2, ffn="mlp"),
}
NUM_REGISTERS = 4  # the `*_reg` hub models


def decode_variant(variant: str) -> dict[str, Any]:
  if variant not in VARIANTS:
    raise ValueError(f"unknown ViT variant {variant!r}; choose one of {sorted(VARIANTS)}")
  return dict(VARIANTS[variant])


def ffn_hidden(width: int, ffn: str) -> int:
  if ffn == "swiglu":  # SwiGLUFFNFused: 2/3 of 4D, rounded up to a multiple of 8
    return (int(4 * width * 2 / 3) + 7) // 8 * 8
  return 4 * width


def check_image_shape(shape: tuple[int, ...], min_patches: int = 0) -> tuple[int, int]:
  """Validates an NHWC image batch shape; returns the patch grid (H/14, W/14)."""
  if len(shape) != 4:
    raise ValueError(
      f"images must be a batch [B, H, W, 3] (NHWC), got shape {tuple(shape)}; "
      "add a batch axis with x[None] for a single image"
    )
  _, h, w, c = shape
  if c != 3:
    raise ValueError(
      f"images must have 3 channels last (NHWC RGB), got {c} channels in shape "
      f"{tuple(shape)}; convert NCHW with x.transpose(0, 2, 3, 1)"
    )
  side = PATCH * (int(min_patches**0.5) + 1)  # the smallest square with enough patches
  if h % PATCH or w % PATCH or h <= 0 or w <= 0:

    def near(v):
      return max(PATCH, round(v / PATCH) * PATCH)

    th, tw = near(h), near(w)
    if (th // PATCH) * (tw // PATCH) <= min_patches:
      th = tw = max(side, th, tw)
    raise ValueError(
      f"image {h}x{w}: height and width must be multiples of {PATCH} (try {th}x{tw})"
    )
  grid = (h // PATCH, w // PATCH)
  if grid[0] * grid[1] <= min_patches:
    raise ValueError(
      f"image {h}x{w} gives {grid[0] * grid[1]} patches, but SALAD needs more "
      f"patches than its {min_patches} clusters (the dustbin marginal is "
      f"log(n - m)); use a larger image, e.g. {side}x{side}"
    )
  return grid


def _uniform(bound: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class Dense(nn.Module):
  """Linear layer: fp32 params, compute in `dtype`.

  Init: DINOv2's (truncated normal std 0.02, zero bias) by default; with `torch_init`, torch's
  nn.Linear / nn.Conv2d default (weight and bias uniform in +-1/sqrt(fan_in)), used by the head.
  """

  features: int
  dtype: Any = jnp.float32
  torch_init: bool = False

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1]
    if self.torch_init:
      k_init = b_init = _uniform(fan_in**-0.5)
    else:
      k_init, b_init = nn.initializers.truncated_normal(0.02), nn.initializers.zeros
    kernel = self.param("kernel", k_init, (fan_in, self.features))
    bias = self.param("bias", b_init, (self.features,))
    return grads.affine(x.astype(self.dtype), kernel, bias, self.dtype)  # fp32 weight grads


def constrain_batch(x):
  """Under a mesh with an `fsdp` axis (the train step sets it), keep an activation split on its
  batch dim over every mesh axis. Without this, XLA propagates the fsdp-sharded weights' layout
  into the activations (heads split over fsdp) and then replicates whole activations to switch
  back ("involuntary full rematerialization"): FSDP must gather weights, never activations."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or "fsdp" not in mesh.axis_names or mesh.shape["fsdp"] == 1:
    return x
  return jax.lax.with_sharding_constraint(
    x, jax.sharding.PartitionSpec(tuple(mesh.axis_names), *([None] * (x.ndim - 1)))
  )


def _layer_norm(x, scale, bias, epsilon: float, dtype):
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  centered = xf - mean
  var = jnp.mean(centered * centered, axis=-1, keepdims=True)
  y = centered * jax.lax.rsqrt(var + epsilon) * scale + bias
  return y.astype(dtype)


class LayerNorm(nn.Module):
  """LayerNorm with torch's two-pass variance, statistics in float32.

  Under a reduced compute dtype the backward pass recomputes the float32 internals from the
  saved input (kept in the compute dtype), as torch saves only the input and the per-token
  mean/rstd: autodiff would keep two float32 copies of every normed activation (`low_precision`).
  """

  epsilon: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
    return low_precision(_layer_norm, self.dtype, static_argnums=(3, 4))(
      x, scale, bias, self.epsilon, self.dtype
    )


class LayerScale(nn.Module):
  @nn.compact
  def __call__(self, x):
    gamma = self.param("gamma", nn.initializers.ones, (x.shape[-1],))
    return grads.scale(x, gamma)


REMAT = ("none", "blocks", "dots")


def check_remat(name: str) -> None:
  if name not in REMAT:
    raise ValueError(
      f"remat must be one of {REMAT} (none: keep activations; blocks: recompute "
      f"each trainable block in the backward pass; dots: keep only matmul "
      f"outputs), got {name!r}"
    )


def check_micro_batch(setting: int | str) -> None:
  if setting != "auto" and (
    not isinstance(setting, int) or isinstance(setting, bool) or setting < 0
  ):
    raise ValueError(f"micro_batch must be 'auto' or an int >= 0 (0: whole batch), got {setting!r}")


def micro_batch_size(setting: int | str, batch: int, cpu_auto: int = 1) -> int:
  """Images per block call. 'auto': `cpu_auto` on CPU, the whole batch on accelerators.

  On CPU, small micro-batches keep a block's activations in cache: one image is fastest for the
  forward pass (~20 % per block), 4 for blocks that are trained (their weight gradients want
  larger matmuls; README, Performance). Resolved at trace time (never at config time: that
  would start the backend before `jax.distributed.initialize`)."""
  check_micro_batch(setting)
  if setting == "auto":
    setting = cpu_auto if jax.default_backend() == "cpu" else 0
  if setting == 0 or setting >= batch or batch % setting:
    return batch
  return setting


class Attention(nn.Module):
  heads: int
  dtype: Any = jnp.float32
  attention: str = "auto"
  chunk: int = 2  # heads per attention step on CPU (measured best of 1, 2, 3, 4, 6, 12)

  @nn.compact
  def __call__(self, x):
    b, t, d = x.shape
    # torch qkv output channels are laid out [3][heads][head_dim].
    qkv = Dense(3 * d, dtype=self.dtype, name="qkv")(x).reshape(
      b, t, 3, self.heads, d // self.heads
    )
    q, k, v = (constrain_batch(qkv[:, :, i]) for i in range(3))
    kernel = attention_impl(self.attention, q.dtype, d // self.heads)
    if kernel == "chunked":
      out = chunked_attention(q, k, v, self.chunk)
    elif kernel == "cudnn":
      out = jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    else:
      out = xla_attention(q, k, v)
    return Dense(d, dtype=self.dtype, name="proj")(constrain_batch(out).reshape(b, t, d))


class Mlp(nn.Module):
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = constrain_batch(Dense(self.hidden, dtype=self.dtype, name="fc1")(x))
    # torch nn.GELU() is the exact erf form. Torch keeps only its input for the backward pass;
    # autodiff of erf keeps four [B, T, 4D] tensors (low_precision: just the input)
    h = low_precision(functools.partial(jax.nn.gelu, approximate=False), self.dtype)(h)
    return Dense(x.shape[-1], dtype=self.dtype, name="fc2")(h)


class SwiGLU(nn.Module):
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = constrain_batch(Dense(2 * self.hidden, dtype=self.dtype, name="w12")(x))
    h = jax.nn.silu(h[..., : self.hidden]) * h[..., self.hidden :]
    return Dense(x.shape[-1], dtype=self.dtype, name="w3")(h)


class Block(nn.Module):
  """Pre-norm transformer block: x + ls1 * attn(norm1(x)), then x + ls2 * mlp(norm2(x))."""

  width: int
  heads: int
  ffn: str
  dtype: Any = jnp.float32
  attention: str = "auto"

  def setup(self):
    self.norm1 = LayerNorm(dtype=self.dtype)
    self.attn = Attention(self.heads, self.dtype, self.attention)
    self.ls1 = LayerScale()
    self.norm2 = LayerNorm(dtype=self.dtype)
    ffn_cls = SwiGLU if self.ffn == "swiglu" else Mlp
    self.mlp = ffn_cls(ffn_hidden(self.width, self.ffn), self.dtype)
    self.ls2 = LayerScale()

  def forward(self, x):
    x = constrain_batch(x + self.ls1(self.attn(self.norm1(x))))
    return constrain_batch(x + self.ls2(self.mlp(self.norm2(x))))

  def __call__(self, x):
    return self.forward(x)


class ScanBlock(Block):
  """`Block` over micro-batches: scanned with `nn.scan`, params broadcast (same paths)."""

  def __call__(self, carry, x):
    return carry, self.forward(x)


def remat_block(cls, remat: str):
  """`cls` itself, or wrapped in nn.remat: 'blocks' keeps only the block input for the backward
  pass, 'dots' also the outputs of its matmuls (not the attention's: those have batch dims)."""
  check_remat(remat)
  if remat == "none":
    return cls
  policy = (
    jax.checkpoint_policies.nothing_saveable
    if remat == "blocks"
    else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  )
  return nn.remat(cls, policy=policy, prevent_cse=cls is not ScanBlock)


class PatchProj(nn.Module):
  """Conv2d(3, D, 14, stride 14) as a patchify + matmul; kernel stored as a Flax conv [14,14,3,D]."""

  width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    b, h, w, c = images.shape
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (PATCH, PATCH, c, self.width))
    bias = self.param("bias", nn.initializers.zeros, (self.width,))
    gh, gw = h // PATCH, w // PATCH
    patches = images.reshape(b, gh, PATCH, gw, PATCH, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, gh * gw, PATCH * PATCH * c).astype(self.dtype)
    return grads.affine(patches, kernel.reshape(-1, self.width), bias, self.dtype)


class PatchEmbed(nn.Module):
  """Tokens [B, H'W', D] in row-major (h, w) order; keeps the `patch_embed/proj` path."""

  width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    return PatchProj(self.width, self.dtype, name="proj")(images)


class DinoViT(nn.Module):
  """DINOv2 ViT. `__call__` returns the final-normed tokens [B, 1 + R + H'W', D] (cls first);
  with `final_norm=False` the tokens before the norm (the official wrapper's norm_layer=False).

  `num_trainable_blocks` puts a `stop_gradient` after the first depth - k blocks: no gradient
  flows into them, the patch embedding or the tokens (the SALAD backbone wrapper).
  """

  variant: str = "B/14"
  registers: bool = False
  num_trainable_blocks: int | None = None  # None: everything differentiable
  dtype: Any = jnp.float32
  attention: str = "auto"
  micro_batch: int | str = "auto"  # blocks run on micro-batches of this many images
  train_micro_batch: int | str = "auto"  # the same for the trainable blocks when `train`
  remat: str = "none"  # none | blocks | dots: recompute in the backward pass (trainable blocks)
  final_norm: bool = True  # False: the tokens before `norm` (its params stay, unused)

  @nn.compact
  def __call__(self, images, train: bool = False):
    spec = decode_variant(self.variant)
    width, depth = spec["width"], spec["depth"]
    grid = check_image_shape(images.shape)
    b = images.shape[0]
    m = PRETRAIN_SIZE // PATCH

    x = PatchEmbed(width, self.dtype, name="patch_embed")(images)
    cls_token = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, width))
    pos_embed = self.param(
      "pos_embed", nn.initializers.truncated_normal(0.02), (1, 1 + m * m, width)
    )
    self.param(
      "mask_token", nn.initializers.zeros, (1, width)
    )  # unused by SALAD; kept for the checkpoint
    x = jnp.concatenate([jnp.broadcast_to(cls_token.astype(x.dtype), (b, 1, width)), x], axis=1)
    pos = posembed.interpolate_pos_embed(
      pos_embed, grid, antialias=self.registers, offset=0.0 if self.registers else 0.1
    )
    x = x + pos.astype(x.dtype)
    if self.registers:
      reg = self.param("register_tokens", nn.initializers.normal(1e-6), (1, NUM_REGISTERS, width))
      x = jnp.concatenate(
        [x[:, :1], jnp.broadcast_to(reg.astype(x.dtype), (b, NUM_REGISTERS, width)), x[:, 1:]],
        axis=1,
      )
    frozen = 0 if self.num_trainable_blocks is None else depth - self.num_trainable_blocks
    if not 0 <= frozen <= depth:
      raise ValueError(f"num_trainable_blocks={self.num_trainable_blocks} must be in [0, {depth}]")
    if self.num_trainable_blocks is not None and frozen == 0:
      x = jax.lax.stop_gradient(x)  # as the reference: token preparation never trains
    mb = micro_batch_size(self.micro_batch, b)
    mb_train = micro_batch_size(self.train_micro_batch, b, cpu_auto=4) if train else mb
    block_args = (width, spec["heads"], spec["ffn"], self.dtype, self.attention)
    for i in range(depth):
      # On CPU, micro-batches keep a block's activations in cache (train step, ViT-B, 32 images
      # at 224, interleaved A/B: trainable blocks per image 15.27 s, on 4 images 14.60 s, on 8
      # 14.72 s; README, Performance).
      trained = self.num_trainable_blocks is not None and i >= frozen
      n = mb_train if trained else mb
      remat = self.remat if (train and trained) else "none"
      if n < b:
        scan = nn.scan(
          remat_block(ScanBlock, remat),
          variable_broadcast="params",
          split_rngs={"params": False},
          in_axes=0,
          out_axes=0,
        )
        _, y = scan(*block_args, name=f"blocks_{i}")(None, x.reshape(b // n, n, *x.shape[1:]))
        x = y.reshape(x.shape)
      else:
        x = remat_block(Block, remat)(*block_args, name=f"blocks_{i}")(x)
      if self.num_trainable_blocks is not None and i == frozen - 1:
        x = jax.lax.stop_gradient(x)
    normed = LayerNorm(dtype=self.dtype, name="norm")(x)  # created either way: the torch layout
    return normed if self.final_norm else x
