"""The ResNet backbones of serizba/salad (`models/backbones/resnet.py`) in Flax linen.

torchvision's ResNet v1.5 (stride on the Bottleneck's 3x3 conv; downsample = 1x1 conv with the
stride + BN; convs without bias) behind the official wrapper: stem, layer1, layer2, layer3 and
layer4 unless cropped, no avgpool / fc. Input NHWC images, output the NHWC feature map
[B, H/32, W/32, C] (H/16 with layer4 cropped, H/8 with layers 3 and 4).

BatchNorm is torch's, not Flax's (which keeps the biased batch variance in its running
average): running_var takes the unbiased one, and `num_batches_tracked` counts the updates.
Param paths mirror the torchvision state_dict (`layer1.0.downsample.1.weight` ->
`layer1_0/downsample_1/scale`); `torch_layout` is the conversion table.
"""

from __future__ import annotations

import collections
import functools
import re
from typing import Any, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from salad_jax.errors import UserError
from salad_jax.models.attention import low_precision
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
BN_EPS, BN_MOMENTUM = 1e-5, 0.1
CONV, RAW, INT = "conv", "raw", "int"  # conversion kinds: OIHW <-> HWIO, as is, the counter
DROPPED = ("fc.weight", "fc.bias")  # a torchvision ImageNet file's classifier: the wrapper drops it


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


# ------------------------------------------------------------------------------------ torch layout
def _flax_path(torch_name: str) -> tuple[str, ...]:
  """'layer1.0.downsample.1' -> ('layer1_0', 'downsample_1'): list indices joined with '_'."""
  return tuple(re.sub(r"\.(\d+)", r"_\1", torch_name).split("."))


def _rows(arch: str, layers_to_crop: Iterable[int] = ()):
  """(torch key, collection, flax path, kind, torch shape) in torchvision's state_dict order."""
  spec = decode_variant(arch)
  exp, groups = EXPANSION[spec["block"]], spec["groups"]

  def conv(t, o, i, k):
    return [(f"{t}.weight", "params", _flax_path(t) + ("kernel",), CONV, (o, i, k, k))]

  def bn(t, c):
    f = _flax_path(t)
    return [
      (f"{t}.weight", "params", f + ("scale",), RAW, (c,)),
      (f"{t}.bias", "params", f + ("bias",), RAW, (c,)),
      (f"{t}.running_mean", "batch_stats", f + ("running_mean",), RAW, (c,)),
      (f"{t}.running_var", "batch_stats", f + ("running_var",), RAW, (c,)),
      (f"{t}.num_batches_tracked", "batch_stats", f + ("num_batches_tracked",), INT, ()),
    ]

  rows = conv("conv1", STEM, 3, 7) + bn("bn1", STEM)
  in_ch = STEM
  for s in range(num_stages(layers_to_crop)):
    planes, out = PLANES[s], PLANES[s] * exp
    for i in range(spec["layers"][s]):
      t = f"layer{s + 1}.{i}"
      if spec["block"] == "bottleneck":
        width = int(planes * (spec["width_per_group"] / 64.0)) * groups
        rows += conv(f"{t}.conv1", width, in_ch, 1) + bn(f"{t}.bn1", width)
        rows += conv(f"{t}.conv2", width, width // groups, 3) + bn(f"{t}.bn2", width)
        rows += conv(f"{t}.conv3", out, width, 1) + bn(f"{t}.bn3", out)
      else:
        rows += conv(f"{t}.conv1", out, in_ch, 3) + bn(f"{t}.bn1", out)
        rows += conv(f"{t}.conv2", out, out, 3) + bn(f"{t}.bn2", out)
      if i == 0 and (s > 0 or in_ch != out):
        rows += conv(f"{t}.downsample.0", out, in_ch, 1) + bn(f"{t}.downsample.1", out)
      in_ch = out
  return rows


def torch_layout(
  arch: str, layers_to_crop: Iterable[int] = ()
) -> list[tuple[str, str, tuple[str, ...], str]]:
  """(torch key, collection, flax path, kind) rows in torchvision's state_dict order; keys are
  relative to the torchvision model (the official checkpoint prefixes `backbone.model.`)."""
  return [r[:4] for r in _rows(arch, layers_to_crop)]


def _names(keys: Iterable[str], limit: int = 8) -> str:
  keys = sorted(keys)
  more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
  return ", ".join(keys[:limit]) + more


def _check_keys(
  shapes: Mapping[str, tuple], arch: str, crop: tuple[int, ...], allow_extra: bool
) -> list:
  rows = _rows(arch, crop)
  want = {r[0]: r[4] for r in rows}
  dropped = set(DROPPED) | {k for k in shapes if k.split(".")[0] in {f"layer{s}" for s in crop}}
  missing = set(want) - set(shapes)
  extra = set(shapes) - set(want) - (dropped if allow_extra else set(DROPPED))
  bad = [
    f"{k} {tuple(shapes[k])} (expected {want[k]})"
    for k in want
    if k in shapes and tuple(shapes[k]) != want[k]
  ]
  if missing or extra or bad:
    parts = [f"missing: {_names(missing)}"] if missing else []
    parts += [f"unexpected: {_names(extra)}"] if extra else []
    parts += [f"wrong shapes: {'; '.join(sorted(bad)[:8])}"] if bad else []
    raise UserError(
      f"state_dict does not match {arch} (layers_to_crop={list(crop)}): " + " | ".join(parts),
      "keys are relative to the torchvision model",
    )
  return rows


def infer_arch(shapes: Mapping[str, tuple]) -> tuple[str, tuple[int, ...]]:
  """(arch, layers_to_crop) of a torchvision-layout state_dict from its key shapes.

  Blocks per stage from the `layerS.I.` keys, Bottleneck if `layer1.0.conv3.weight` exists,
  groups and width from `layer1.0.conv2.weight` [width, width / groups, 3, 3], cropped stages
  from absent layer3/layer4 keys; then every key and shape is checked against that arch. The
  classifier of a torchvision file (fc.*) is ignored. With layer3 and layer4 cropped, resnet50
  and resnet101 are the same network: the first table match (resnet50) is named.
  """
  shapes = {k: tuple(v) for k, v in shapes.items()}
  found = _names(shapes)
  if "conv1.weight" not in shapes or "layer1.0.conv2.weight" not in shapes:
    raise UserError(
      f"not a torchvision ResNet state_dict: no conv1.weight or "
      f"layer1.0.conv2.weight (found {found})",
      "keys must be relative to the torchvision model",
    )
  blocks = []
  for s in (1, 2, 3, 4):
    idx = {int(m.group(1)) for k in shapes for m in [re.match(rf"layer{s}\.(\d+)\.", k)] if m}
    if idx and idx != set(range(len(idx))):
      raise UserError(f"layer{s} has blocks {sorted(idx)}: not numbered 0..n-1")
    blocks.append(len(idx))
  crop = {(True, True): (), (True, False): (4,), (False, False): (3, 4)}.get(
    (blocks[2] > 0, blocks[3] > 0)
  )
  if crop is None or not blocks[0] or not blocks[1]:
    raise UserError(
      f"ResNet stages with blocks {blocks} (layer1..layer4): a stage is missing "
      "that the official wrapper keeps",
      "only layer4, or layer3 and layer4, crop",
    )
  block = "bottleneck" if "layer1.0.conv3.weight" in shapes else "basic"
  conv2 = shapes["layer1.0.conv2.weight"]
  if len(conv2) != 4 or conv2[1] == 0 or conv2[0] % conv2[1]:
    raise UserError(f"layer1.0.conv2.weight has shape {conv2}: not a ResNet 3x3 conv")
  groups = conv2[0] // conv2[1]
  width_per_group = conv2[0] // groups if block == "bottleneck" else 64
  kept = tuple(b for b in blocks if b)
  for arch, spec in VARIANTS.items():
    if (spec["block"], spec["layers"][: len(kept)], spec["groups"], spec["width_per_group"]) == (
      block,
      kept,
      groups,
      width_per_group,
    ):
      _check_keys(shapes, arch, crop, allow_extra=False)
      return arch, crop
  raise UserError(
    f"no known ResNet has {block} blocks {list(kept)}, groups {groups}, width per "
    f"group {width_per_group} (from layer1.0.conv2.weight {conv2})",
    f"known: {', '.join(VARIANTS)}",
  )


def _to_flax(x: np.ndarray, kind: str) -> np.ndarray:
  if kind == CONV:
    return np.ascontiguousarray(np.asarray(x, np.float32).transpose(2, 3, 1, 0))
  if kind == INT:
    v = int(np.asarray(x))
    if not 0 <= v < 2**31:
      raise UserError(f"num_batches_tracked {v} does not fit int32")
    return np.asarray(v, np.int32)
  return np.array(x, np.float32)


def _to_torch(x: np.ndarray, kind: str) -> np.ndarray:
  if kind == CONV:
    return np.ascontiguousarray(np.asarray(x, np.float32).transpose(3, 2, 0, 1))
  if kind == INT:
    return np.asarray(x, np.int64)
  return np.array(x, np.float32)


def state_dict_to_variables(
  state_dict: Mapping[str, np.ndarray], arch: str, layers_to_crop: Iterable[int] = ()
) -> dict:
  """torchvision-layout state_dict -> {"params": ..., "batch_stats": ...} (numpy).

  Keys of cropped stages and fc.* may be present (a full torchvision file): the wrapper
  discards them after loading; any other difference is an error naming the keys.
  """
  crop = check_crop(layers_to_crop)
  rows = _check_keys({k: np.shape(v) for k, v in state_dict.items()}, arch, crop, allow_extra=True)
  out: dict = {"params": {}, "batch_stats": {}}
  for tkey, coll, path, kind, _ in rows:
    node = out[coll]
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = _to_flax(state_dict[tkey], kind)
  return out


def variables_to_state_dict(
  variables: Mapping, arch: str, layers_to_crop: Iterable[int] = ()
) -> "collections.OrderedDict[str, np.ndarray]":
  """{"params", "batch_stats"} -> torchvision-layout state_dict (numpy, torchvision's order)."""
  out = collections.OrderedDict()
  for tkey, coll, path, kind, _ in _rows(arch, check_crop(layers_to_crop)):
    node = variables[coll]
    for p in path:
      node = node[p]
    out[tkey] = _to_torch(np.asarray(node), kind)
  return out
