"""DINOv2 backbone + SALAD head: the whole place-recognition model, and its config."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from salad_jax.models import attention, grads, vit
from salad_jax.models.salad import SALAD

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything that fixes the parameter shapes and the forward pass (saved next to weights)."""

  variant: str = "B/14"  # S/14, B/14, L/14, g/14
  registers: bool = False  # the `*_reg` DINOv2 models (4 register tokens)
  num_trainable_blocks: int = 4  # last blocks that receive gradients (SALAD: 4)
  num_clusters: int = 64  # m
  cluster_dim: int = 128  # l
  token_dim: int = 256  # g
  hidden_dim: int = 512  # width of the head MLPs
  dropout: float = 0.3
  dtype: str = "float32"  # compute dtype: float32 or bfloat16 (params stay float32)
  # auto: chunked on CPU; elsewhere jax.nn.dot_product_attention (cuDNN flash attention on GPUs
  # for bf16/fp16, else XLA); chunked | dot_product_attention | xla | cudnn force one
  attention: str = "auto"
  micro_batch: int | str = "auto"  # images per ViT block call; auto: 1 on CPU, all elsewhere
  train_micro_batch: int | str = "auto"  # the same for trainable blocks in training; auto: 4 on CPU
  remat: str = (
    "none"  # trainable blocks in training: none | blocks (recompute) | dots (keep matmuls)
  )
  # weight gradients under bf16 compute: summed (over the batch and across devices) in float32,
  # or in bfloat16 (the cheaper collective); no effect under float32 compute (models/grads.py)
  grad_reduce_dtype: str = "float32"

  # The fields that fix the parameter shapes (a saved model cannot change them)...
  SHAPE_FIELDS: ClassVar[tuple[str, ...]] = (
    "variant",
    "registers",
    "num_clusters",
    "cluster_dim",
    "token_dim",
    "hidden_dim",
  )
  # ... and, with the trainable set, the optimizer state's (a checkpoint to resume from)
  TRAIN_STATE_FIELDS: ClassVar[tuple[str, ...]] = SHAPE_FIELDS + ("num_trainable_blocks",)
  # ... and, with the compute dtype, the descriptors given the params (the descriptor cache key)
  DESCRIPTOR_FIELDS: ClassVar[tuple[str, ...]] = SHAPE_FIELDS + ("dtype",)

  def __post_init__(self):
    vit.decode_variant(self.variant)
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
    depth = vit.VARIANTS[self.variant]["depth"]
    if not 0 <= self.num_trainable_blocks <= depth:
      raise ValueError(f"num_trainable_blocks must be in [0, {depth}] for {self.variant}")
    attention.check_attention(self.attention)
    vit.check_remat(self.remat)
    vit.check_micro_batch(self.micro_batch)
    vit.check_micro_batch(self.train_micro_batch)
    grads.check_grad_reduce_dtype(self.grad_reduce_dtype)

  @property
  def width(self) -> int:
    return vit.VARIANTS[self.variant]["width"]

  @property
  def descriptor_dim(self) -> int:
    return self.num_clusters * self.cluster_dim + self.token_dim

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def fields(self, names) -> dict[str, Any]:
    """{name: value} of the named fields (e.g. `ModelConfig.SHAPE_FIELDS`)."""
    return {n: getattr(self, n) for n in names}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
      raise ValueError(f"unknown model config keys {sorted(unknown)}; known: {sorted(names)}")
    return cls(**dict(d))

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)


class VPRModel(nn.Module):
  """`__call__(images [B,H,W,3], train)` -> descriptors [B, m*l+g]; `features` -> (map, token)."""

  config: ModelConfig

  def setup(self):
    c = self.config
    dtype = DTYPES[c.dtype]
    self.backbone = vit.DinoViT(
      c.variant,
      c.registers,
      c.num_trainable_blocks,
      dtype,
      c.attention,
      c.micro_batch,
      c.train_micro_batch,
      c.remat,
    )
    self.aggregator = SALAD(
      c.num_clusters, c.cluster_dim, c.token_dim, c.hidden_dim, c.dropout, dtype=dtype
    )

  def features(self, images, train: bool = False):
    """Backbone outputs after the final norm: patch map [B, H/14, W/14, C] and cls token [B, C]."""
    gh, gw = vit.check_image_shape(images.shape)
    tokens = self.backbone(images, train=train)
    skip = 1 + (vit.NUM_REGISTERS if self.config.registers else 0)
    return tokens[:, skip:].reshape(images.shape[0], gh, gw, -1), tokens[:, 0]

  def __call__(self, images, train: bool = False, example_ids=None):
    """`example_ids` [B] (training): each image's identity in the step, keying its dropout."""
    vit.check_image_shape(images.shape, min_patches=self.config.num_clusters)
    with grads.reduce_dtype(self.config.grad_reduce_dtype):
      feats, token = self.features(images, train=train)
      return self.aggregator(feats, token, train=train, example_ids=example_ids)


def init_params(config: ModelConfig, rng: jax.Array, image_size: int = 224) -> dict:
  """Fresh parameters (DINOv2-style backbone init, torch-default head init), as a plain dict."""
  model = VPRModel(config)
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  variables = jax.jit(lambda r: model.init(r, x))(rng)
  return jax.tree.map(lambda a: a, dict(variables["params"]))


def assignment(model: VPRModel, params, images) -> jax.Array:
  """The Sinkhorn assignment the descriptor aggregates with: [B, m+1, H/14, W/14] float32.

  Rows 0..m-1 are the head's own `assignment` (sown by `SALAD.__call__` in the same forward pass
  that makes the descriptor); row m is the dustbin: Sinkhorn ends with the column update, so
  every patch's column sums to 1 and the dustbin holds 1 minus the clusters' mass.
  """
  gh, gw = vit.check_image_shape(images.shape, min_patches=model.config.num_clusters)
  _, state = model.apply({"params": params}, images, mutable=["intermediates"])
  p = state["intermediates"]["aggregator"]["assignment"][0]  # [B, m, n]
  dust = jnp.clip(1.0 - p.sum(axis=1, keepdims=True), 0.0, 1.0)
  return jnp.concatenate([p, dust], axis=1).reshape(p.shape[0], p.shape[1] + 1, gh, gw)
