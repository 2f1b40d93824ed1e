"""The model's one config: `ModelConfig`, every field that builds a backbone x head model.

Flat, with the official argument names of serizba/salad's `VPRModel(backbone_arch,
backbone_config, agg_arch, agg_config)` where they do not clash (`salad_jax.models.official`
translates those arguments). It checks its fields on construction, derives the sizes the rest of
the package needs (feature width and grid, descriptor size, an image size the model takes), and
names the field groups that fix the parameters, the trainable set and the descriptors.
`parse_overrides` reads fields from `FIELD=VALUE` command-line items.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Mapping, Sequence

import jax.numpy as jnp

from salad_jax.errors import UserError
from salad_jax.models import (
  attention,
  convap,
  cosplace,
  gem,
  grads,
  mixvpr,
  netvlad,
  resnet,
  salad,
  vit,
)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DINOV2 = "dinov2"
BACKBONES = (DINOV2,) + tuple(resnet.VARIANTS)
AGGREGATORS = ("salad", "gem", "convap", "cosplace", "mixvpr", "netvlad")
HEAD_NAMES = {
  "salad": "SALAD",
  "gem": "GeM",
  "convap": "ConvAP",
  "cosplace": "CosPlace",
  "mixvpr": "MixVPR",
  "netvlad": "NetVLAD",
}

# Which fields fix the parameters and the function computed, per backbone kind and per head
# (the others are ignored by that model); and which fix the trainable set.
BACKBONE_FIELDS = {DINOV2: ("variant", "registers", "norm_layer"), "resnet": ("layers_to_crop",)}
HEAD_FIELDS = {
  "salad": (
    "num_clusters",
    "cluster_dim",
    "token_dim",
    "hidden_dim",
    "salad_dustbin",
    "salad_assignment",
    "salad_global_token",
  ),
  "gem": (),  # p is the init of a learned parameter: it fixes neither shapes nor function
  "convap": ("out_channels", "s1", "s2"),
  "cosplace": ("out_dim",),
  "mixvpr": ("in_h", "in_w", "out_channels", "mix_depth", "mlp_ratio", "out_rows"),
  "netvlad": ("num_clusters", "normalize_input", "vladv2"),
}
TRAINABLE_FIELDS = {DINOV2: ("num_trainable_blocks",), "resnet": ("layers_to_freeze",)}


def _union(*groups) -> tuple[str, ...]:
  return tuple(dict.fromkeys(f for g in groups for f in g))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything that builds the model (saved next to weights). Defaults: DINOv2 ViT-B/14 + SALAD,
  the paper's model; every field saved by an earlier salad_jax keeps its meaning."""

  variant: str = "B/14"  # DINOv2: S/14, B/14, L/14, g/14
  registers: bool = False  # the `*_reg` DINOv2 models (4 register tokens)
  num_trainable_blocks: int = 4  # DINOv2: last blocks that receive gradients (SALAD: 4)
  num_clusters: int = 64  # SALAD's m, NetVLAD's K
  cluster_dim: int = 128  # SALAD's l
  token_dim: int = 256  # SALAD's g
  hidden_dim: int = 512  # width of SALAD's MLPs
  dropout: float = 0.3  # SALAD's (the other heads have none)
  dtype: str = "float32"  # compute dtype: float32 or bfloat16 (params stay float32)
  # auto: chunked on CPU; elsewhere jax.nn.dot_product_attention (cuDNN flash attention on GPUs
  # for bf16/fp16, else XLA); chunked | dot_product_attention | xla | cudnn force one
  attention: str = "auto"
  micro_batch: int | str = "auto"  # images per ViT block call; auto: 1 on CPU, all elsewhere
  train_micro_batch: int | str = "auto"  # the same for trainable blocks in training; auto: 4 on CPU
  remat: str = (
    "none"  # trainable blocks in training: none | blocks (recompute) | dots (keep matmuls)
  )
  # ---- backbone: "dinov2" (variant, registers) or a ResNet arch (resnet.VARIANTS)
  backbone: str = DINOV2
  norm_layer: bool = True  # DINOv2 wrapper: final LayerNorm on the tokens (official default False)
  return_token: bool = True  # DINOv2 wrapper: hand the cls token to the head (SALAD needs it)
  layers_to_freeze: int = 2  # ResNet wrapper: conv1+bn1 (>= 0) and layer1..3 (>= 1..3); -1 none
  layers_to_crop: tuple[int, ...] = ()  # ResNet wrapper: (), (4,) or (3, 4)
  # ---- head: salad | gem | convap | cosplace | mixvpr | netvlad
  aggregator: str = "salad"
  salad_dustbin: bool = True  # SALAD ablations (models/salad.py): Sinkhorn without the dustbin,
  salad_assignment: str = "sinkhorn"  # softmax assignment instead of Sinkhorn,
  salad_global_token: bool = True  # no global token
  p: float = 3.0  # GeM: the initial p (learned)
  out_channels: int = 512  # ConvAP and MixVPR
  s1: int = 2  # ConvAP's pooled grid
  s2: int = 2
  out_dim: int = 512  # CosPlace
  in_h: int = 20  # MixVPR: the feature map it is built for
  in_w: int = 20
  mix_depth: int = 1
  mlp_ratio: float = 1.0
  out_rows: int = 4
  normalize_input: bool = True  # NetVLAD
  vladv2: bool = False
  # weight gradients under bf16 compute: summed (over the batch and across devices) in float32,
  # or in bfloat16 (the cheaper collective); no effect under float32 compute (models/grads.py)
  grad_reduce_dtype: str = "float32"

  # The fields that fix the parameters and the function computed, for any backbone and head (a
  # saved model cannot change them; `model_fields()` gives this model's own); ...
  MODEL_FIELDS: ClassVar[tuple[str, ...]] = _union(
    ("backbone", "aggregator"), *BACKBONE_FIELDS.values(), *HEAD_FIELDS.values()
  )
  # ... and the trainable set (the optimizer state's shapes: a checkpoint to resume from); ...
  TRAIN_STATE_FIELDS: ClassVar[tuple[str, ...]] = _union(MODEL_FIELDS, *TRAINABLE_FIELDS.values())
  # ... and the compute dtype (the descriptors given the weights: the descriptor cache key).
  DESCRIPTOR_FIELDS: ClassVar[tuple[str, ...]] = MODEL_FIELDS + ("dtype",)
  SHAPE_FIELDS: ClassVar[tuple[str, ...]] = MODEL_FIELDS  # the name before ResNets and heads

  def __post_init__(self):
    object.__setattr__(self, "layers_to_crop", tuple(int(c) for c in self.layers_to_crop))
    vit.decode_variant(self.variant)
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
    attention.check_attention(self.attention)
    vit.check_remat(self.remat)
    vit.check_micro_batch(self.micro_batch)
    vit.check_micro_batch(self.train_micro_batch)
    if self.backbone not in BACKBONES:
      raise UserError(
        f"unknown backbone {self.backbone!r}", f"choose one of {', '.join(BACKBONES)}"
      )
    if self.aggregator not in AGGREGATORS:
      raise UserError(
        f"unknown aggregator {self.aggregator!r}", f"choose one of {', '.join(AGGREGATORS)}"
      )
    if self.is_resnet:
      resnet.check_crop(self.layers_to_crop)
      if self.layers_to_freeze < -1:
        raise UserError(f"layers_to_freeze={self.layers_to_freeze}: -1 (none) or 0..4")
    else:
      depth = vit.VARIANTS[self.variant]["depth"]
      if not 0 <= self.num_trainable_blocks <= depth:
        raise ValueError(f"num_trainable_blocks must be in [0, {depth}] for {self.variant}")
      if self.layers_to_crop:
        raise UserError(
          f"layers_to_crop={list(self.layers_to_crop)} crops ResNet stages; the backbone is DINOv2",
          "use layers_to_crop=()",
        )
    self._check_head()
    grads.check_grad_reduce_dtype(self.grad_reduce_dtype)

  def _check_head(self) -> None:
    a = self.aggregator
    positive = {
      "salad": ("num_clusters", "cluster_dim", "token_dim", "hidden_dim"),
      "convap": ("out_channels", "s1", "s2"),
      "cosplace": ("out_dim",),
      "mixvpr": ("in_h", "in_w", "out_channels", "out_rows"),
      "netvlad": ("num_clusters",),
    }.get(a, ())
    for name in positive:
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise UserError(f"{name}={v!r}: {HEAD_NAMES[a]} needs an integer >= 1")
    if a == "mixvpr" and (self.mix_depth < 0 or not self.mlp_ratio > 0):
      raise UserError(
        f"mix_depth={self.mix_depth}, mlp_ratio={self.mlp_ratio}: MixVPR needs mix_depth >= 0 "
        "and mlp_ratio > 0"
      )
    if a == "gem" and not (math.isfinite(self.p) and self.p > 0):
      raise UserError(f"p={self.p}: GeM's p must be a positive number (the official init: 3)")
    if a != "salad":
      return
    salad.check_assignment(self.salad_assignment)
    if self.salad_global_token and self.is_resnet:
      raise UserError(
        f"SALAD's global token needs the backbone's cls token; {self.backbone} has none",
        "use salad_global_token=False, or another aggregator (gem, convap, cosplace, mixvpr, "
        "netvlad)",
      )
    if self.salad_global_token and not self.return_token:
      raise UserError(
        "SALAD's global token needs the cls token, but return_token=False",
        "set return_token=True (the official SALAD config does), or salad_global_token=False",
      )

  # ------------------------------------------------------------------ derived sizes
  @property
  def is_resnet(self) -> bool:
    return self.backbone != DINOV2

  @property
  def backbone_kind(self) -> str:
    return "resnet" if self.is_resnet else DINOV2

  @property
  def has_batch_stats(self) -> bool:
    """ResNets carry BatchNorm running statistics (a `batch_stats` collection)."""
    return self.is_resnet

  @property
  def width(self) -> int:
    """Channels of the backbone's feature map (the head's input)."""
    if self.is_resnet:
      return resnet.out_channels(self.backbone, self.layers_to_crop)
    return vit.VARIANTS[self.variant]["width"]

  @property
  def feature_stride(self) -> int:
    """Image pixels per feature-map cell: 14 (DINOv2), 32 (ResNet; 16 or 8 when cropped)."""
    if self.is_resnet:
      return 2 ** (1 + resnet.num_stages(self.layers_to_crop))
    return vit.PATCH

  @property
  def min_patches(self) -> int:
    """Sinkhorn with the dustbin needs more features than clusters (its marginal is log(n-m))."""
    sinkhorn = self.salad_assignment == "sinkhorn" and self.salad_dustbin
    return self.num_clusters if self.aggregator == "salad" and sinkhorn else 0

  @property
  def descriptor_dim(self) -> int:
    a, c = self.aggregator, self.width
    if a == "salad":
      return salad.descriptor_dim(
        self.num_clusters, self.cluster_dim, self.token_dim, self.salad_global_token
      )
    if a == "gem":
      return gem.descriptor_dim(c)
    if a == "convap":
      return convap.descriptor_dim(self.out_channels, self.s1, self.s2)
    if a == "cosplace":
      return cosplace.descriptor_dim(self.out_dim)
    if a == "mixvpr":
      return mixvpr.descriptor_dim(self.out_channels, self.out_rows)
    return netvlad.descriptor_dim(self.num_clusters, c)

  def feature_grid(self, h: int, w: int) -> tuple[int, int]:
    """The backbone's feature map size for an h x w image (ResNet: each stride-2 layer gives
    ceil(size / 2), as torch's padded convs and max pool do)."""
    if not self.is_resnet:
      return h // vit.PATCH, w // vit.PATCH
    for _ in range(1 + resnet.num_stages(self.layers_to_crop)):
      h, w = -(-h // 2), -(-w // 2)
    return h, w

  def check_image_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
    """An NHWC image batch shape this model takes (ValueError/UserError naming a size that
    fits); returns the feature grid."""
    if self.is_resnet:
      if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(
          f"images must be a batch [B, H, W, 3] (NHWC RGB), got shape {tuple(shape)}; "
          "add a batch axis with x[None], convert NCHW with x.transpose(0, 2, 3, 1)"
        )
      if shape[1] < 1 or shape[2] < 1:
        raise ValueError(f"image {shape[1]}x{shape[2]}: height and width must be positive")
      grid = self.feature_grid(shape[1], shape[2])
    else:
      grid = vit.check_image_shape(shape, min_patches=self.min_patches)
    if self.aggregator == "mixvpr" and grid[0] * grid[1] != self.in_h * self.in_w:
      s = self.feature_stride
      raise UserError(
        f"image {shape[1]}x{shape[2]} gives a {grid[0]}x{grid[1]} feature map, but MixVPR "
        f"was built for {self.in_h}x{self.in_w} ({self.in_h * self.in_w} cells)",
        f"use {self.in_h * s}x{self.in_w * s} images, or a model with in_h, in_w that fit",
      )
    return grid

  def example_image_size(self) -> tuple[int, int]:
    """An image size (h, w) the model takes (for init and shape tracing)."""
    if self.aggregator == "mixvpr":
      return self.in_h * self.feature_stride, self.in_w * self.feature_stride
    side = max(224, vit.PATCH * (math.isqrt(self.min_patches) + 1))
    return side, side

  def describe(self) -> str:
    """One line for messages: 'ViT-B/14 + SALAD (8448-d)'."""
    if self.is_resnet:
      crop = f" cropped {list(self.layers_to_crop)}" if self.layers_to_crop else ""
      back = f"{self.backbone}{crop}"
    else:
      back = f"ViT-{self.variant}{' +registers' if self.registers else ''}"
    return f"{back} + {HEAD_NAMES[self.aggregator]} ({self.descriptor_dim}-d)"

  # ------------------------------------------------------------------ field groups
  def model_fields(self) -> tuple[str, ...]:
    """This model's fields that fix its parameters and the function it computes."""
    return (
      ("backbone", "aggregator")
      + BACKBONE_FIELDS[self.backbone_kind]
      + HEAD_FIELDS[self.aggregator]
    )

  def train_state_fields(self) -> tuple[str, ...]:
    return self.model_fields() + TRAINABLE_FIELDS[self.backbone_kind]

  def descriptor_fields(self) -> tuple[str, ...]:
    return self.model_fields() + ("dtype",)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def fields(self, names) -> dict[str, Any]:
    """{name: value} of the named fields as JSON stores them (tuples as lists)."""
    return {n: (list(v) if isinstance(v, tuple) else v) for n in names for v in [getattr(self, n)]}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
      raise ValueError(f"unknown model config keys {sorted(unknown)}; known: {sorted(names)}")
    return cls(**dict(d))

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)


def parse_overrides(items: Sequence[str], flag: str = "--model") -> dict[str, Any]:
  """['salad_assignment=softmax', 'layers_to_crop=3,4', ...] -> typed ModelConfig fields (by
  each field's default: bool, int, float, str, tuple of ints)."""
  defaults = ModelConfig().to_dict()
  out: dict[str, Any] = {}
  for item in items:
    key, sep, text = item.partition("=")
    key, text = key.strip(), text.strip()
    if not sep or key not in defaults:
      raise UserError(
        f"{flag} {item!r}: expected FIELD=VALUE with a ModelConfig field",
        f"e.g. {flag} salad_assignment=softmax; fields: {', '.join(sorted(defaults))}",
      )
    default = defaults[key]
    try:
      if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
          raise ValueError("not a boolean")
        value = text.lower() in ("true", "1")
      elif isinstance(default, tuple):
        value = tuple(int(v) for v in text.strip("[]()").replace(",", " ").split())
      elif isinstance(default, int) and not text.lstrip("-").isdigit() and key.endswith("batch"):
        value = text  # micro_batch: an int or "auto"
      elif isinstance(default, int):
        value = int(text)
      elif isinstance(default, float):
        value = float(text)
      else:
        value = text
    except ValueError:
      raise UserError(
        f"{flag} {item!r}: {text!r} is not a {type(default).__name__}",
        f"e.g. {flag} {key}={default!r}",
      ) from None
    out[key] = value
  return out
