"""The ResNet backbones of serizba/salad (`models/backbones/resnet.py`) in Flax linen.

torchvision's ResNet v1.5 (stride on the Bottleneck's 3x3 conv; downsample = 1x1 conv with the
stride + BN; convs without bias) behind the official wrapper: stem, layer1, layer2, layer3 and
layer4 unless cropped, no avgpool / fc. Input NHWC images, output the NHWC feature map
[B, H/32, W/32, C] (H/16 with layer4 cropped, H/8 with layers 3 and 4).

BatchNorm is torch's (`salad_jax.models.batchnorm`). Param paths mirror the torchvision
state_dict (`layer1.0.downsample.1.weight` -> `layer1_0/downsample_1/scale`);
`salad_jax.models.resnet_layout` holds the conversion table and reads the arch off a state_dict.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp

from salad_jax.errors import UserError
from salad_jax.models.batchnorm import BatchNorm
from salad_jax.models.vit import constrain_batch

# torchvision's factories: block, blocks per stage, groups, width_per_group.
VARIANTS: dict[str, dict[str, Any]] = {
  "resnet18": dict(block="basic", layers=(2, 2, 2, 2), groups=1, width_per_group=64),
  "resnet34": dict(block="basic", layers=(3, 4, 6, 3), groups=1, width_per_group=64),
  "resnet50": dict(block="bottleneck", layers=(3, 4, 6, 3), groups=1, width_per_group=64),
  "resnet101": dict(block="bottleneck", layers=(3, 4, 23, 3), groups=1, width_per_group=64),
  "resnet152": dict(block="bottleneck", layers=(3, 8, 36, 3), groups=1, width_per_group=64),
  "resnext50_32x4d": dict(block="bottleneck", layers=(3, 4, 6, 3), groups=32, width_per_group=4),
  "wide_resnet50_2": dict(block="bottleneck", layers=(3, 4, 6, 3), groups=1, width_per_group=128),
}
EXPANSION = {"basic": 1, "bottleneck": 4}
PLANES = (64, 128, 256, 512)  # per stage; stages 2-4 start with stride 2
STEM = 64


def decode_variant(arch: str) -> dict[str, Any]:
  if arch not in VARIANTS:
    raise UserError(f"unknown ResNet arch {arch!r}", f"choose one of {', '.join(VARIANTS)}")
  return dict(VARIANTS[arch])


def check_crop(layers_to_crop: Iterable[int]) -> tuple[int, ...]:
  """The official wrapper crops layer4, or layer3 and layer4; layer3 alone would feed layer2's
  output to layer4 (a channel mismatch there), so it is refused here."""
  crop = tuple(sorted(set(int(c) for c in layers_to_crop)))
  if crop not in ((), (4,), (3, 4)):
    raise UserError(
      f"layers_to_crop={list(layers_to_crop)} is not supported",
      "use [], [4] or [3, 4] (cropping layer3 alone breaks layer4's input)",
    )
  return crop


def num_stages(layers_to_crop: Iterable[int] = ()) -> int:
  return 4 - len(check_crop(layers_to_crop))


def out_channels(arch: str, layers_to_crop: Iterable[int] = ()) -> int:
  """Channels of the output map: the last kept stage's planes x expansion."""
  spec = decode_variant(arch)
  return PLANES[num_stages(layers_to_crop) - 1] * EXPANSION[spec["block"]]


def official_arch(model_name: str) -> str:
  """The torchvision factory the official wrapper builds for `backbone_arch`.

  It tests substrings in this order, case-sensitively: resnext50, resnet50, 101, 152, 34, 18,
  wide_resnet50_2. So 'wide_resnet50_2' (which contains 'resnet50') builds a plain resnet50
  there; this mirrors that. The swsl/ssl torch-hub models are not supported.
  """
  if "swsl" in model_name or "ssl" in model_name:
    raise UserError(
      f"backbone {model_name!r}: the torch-hub swsl/ssl ResNets are not supported",
      f"use one of {', '.join(VARIANTS)}",
    )
  for needle, arch in [
    ("resnext50", "resnext50_32x4d"),
    ("resnet50", "resnet50"),
    ("101", "resnet101"),
    ("152", "resnet152"),
    ("34", "resnet34"),
    ("18", "resnet18"),
    ("wide_resnet50_2", "wide_resnet50_2"),
  ]:
    if needle in model_name:
      return arch
  raise UserError(
    f"backbone {model_name!r} is not a ResNet the official wrapper knows",
    f"use one of {', '.join(VARIANTS)}",
  )


def freeze_regex(layers_to_freeze: int, prefix: str = "backbone/") -> str:
  """Regex (for `re.search`) over param paths matching exactly the params the official wrapper
  freezes: conv1 + bn1 if >= 0, layer1 if >= 1, layer2 if >= 2, layer3 if >= 3 (layer4 never).

  The wrapper freezes only when `pretrained=True`; pass -1 otherwise. Returns '' when nothing is
  frozen (`optim.split_trainable` reads '' as no freezing). BN running stats are not params:
  frozen layers still update them in train mode, as in torch.
  """
  parts = (["conv1", "bn1"] if layers_to_freeze >= 0 else []) + [
    rf"layer{s}_\d+" for s in (1, 2, 3) if layers_to_freeze >= s
  ]
  if not parts:
    return ""
  return rf"^{re.escape(prefix)}({'|'.join(parts)})/"


# ------------------------------------------------------------------------------------ modules

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu"); fan_out = out * kh * kw
# (torch counts a grouped conv's fan_out the same way), a plain (untruncated) normal.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(features, kernel, stride, dtype, name, groups=1):
  pad = (kernel - 1) // 2  # torch: 7x7 pad 3, 3x3 pad 1, 1x1 pad 0
  return nn.Conv(
    features,
    (kernel, kernel),
    (stride, stride),
    padding=[(pad, pad)] * 2,
    feature_group_count=groups,
    use_bias=False,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=_conv_init,
    name=name,
  )


class Block(nn.Module):
  """torchvision BasicBlock (two 3x3) or Bottleneck (1x1, grouped 3x3 with the stride, 1x1)."""

  planes: int
  stride: int
  downsample: bool
  bottleneck: bool
  groups: int = 1
  width_per_group: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, valid=None):
    def bn(name):
      return functools.partial(BatchNorm(dtype=self.dtype, name=name), valid=valid)

    if self.bottleneck:
      width = int(self.planes * (self.width_per_group / 64.0)) * self.groups
      out = self.planes * EXPANSION["bottleneck"]
      h = nn.relu(bn("bn1")(_conv(width, 1, 1, self.dtype, "conv1")(x), train))
      h = _conv(width, 3, self.stride, self.dtype, "conv2", self.groups)(h)
      h = nn.relu(bn("bn2")(h, train))
      h = bn("bn3")(_conv(out, 1, 1, self.dtype, "conv3")(h), train)
    else:
      out = self.planes
      h = nn.relu(bn("bn1")(_conv(out, 3, self.stride, self.dtype, "conv1")(x), train))
      h = bn("bn2")(_conv(out, 3, 1, self.dtype, "conv2")(h), train)
    if self.downsample:
      x = bn("downsample_1")(_conv(out, 1, self.stride, self.dtype, "downsample_0")(x), train)
    return constrain_batch(nn.relu(h + x))


def _max_pool(x):
  """torch MaxPool2d(3, stride 2, padding 1): padded with -inf, floor mode."""
  return jax.lax.reduce_window(
    x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
  )


class ResNet(nn.Module):
  """The official ResNet wrapper: `__call__(images [B, H, W, 3], train)` -> [B, h, w, C].

  `layers_to_freeze` (-1: none) puts a stop_gradient after the frozen stages, so their params
  get zero gradients (torch: none); the optimizer freezes them with `freeze_regex`. Their BN
  running stats still update in train mode (as torch's requires_grad_(False) layers do).
  """

  arch: str = "resnet50"
  layers_to_crop: tuple[int, ...] = ()
  layers_to_freeze: int = -1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False, valid=None):
    spec = decode_variant(self.arch)
    stages = num_stages(self.layers_to_crop)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise UserError(
        f"images must be a batch [B, H, W, 3] (NHWC RGB), got shape {tuple(images.shape)}",
        "convert NCHW with x.transpose(0, 2, 3, 1)",
      )
    bottleneck = spec["block"] == "bottleneck"
    last_frozen = min(self.layers_to_freeze, 3, stages)  # the wrapper never freezes layer4

    x = _conv(STEM, 7, 2, self.dtype, "conv1")(images.astype(self.dtype))
    x = _max_pool(nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(x, train, valid)))
    if last_frozen == 0:
      x = jax.lax.stop_gradient(x)
    in_ch = STEM
    for s in range(stages):
      planes = PLANES[s]
      for i in range(spec["layers"][s]):
        stride = 2 if s > 0 and i == 0 else 1
        down = i == 0 and (stride != 1 or in_ch != planes * EXPANSION[spec["block"]])
        x = Block(
          planes,
          stride,
          down,
          bottleneck,
          spec["groups"],
          spec["width_per_group"],
          self.dtype,
          name=f"layer{s + 1}_{i}",
        )(x, train, valid)
        in_ch = planes * EXPANSION[spec["block"]]
      if s + 1 == last_frozen:
        x = jax.lax.stop_gradient(x)
    return x
