"""A pure-torch torchvision-layout ResNet and the official SALAD ResNet wrapper, as parity oracle.

Written from torchvision's semantics (ResNet v1.5: the Bottleneck's stride on its 3x3 conv;
downsample = 1x1 conv with the stride + BatchNorm; no conv biases) and from serizba/salad's
`models/backbones/resnet.py` (stem + layer1..4 unless cropped, freezing by requires_grad_ when
pretrained). Module names mirror torchvision, so `load_state_dict(strict=True)` checks the keys.
torch's own nn.BatchNorm2d is the BatchNorm reference.
"""

from __future__ import annotations

import torch
import torch.nn as nn

# block, blocks per stage, groups, width_per_group (torchvision's factories)
ARCHS = {
  "resnet18": ("basic", [2, 2, 2, 2], 1, 64),
  "resnet34": ("basic", [3, 4, 6, 3], 1, 64),
  "resnet50": ("bottleneck", [3, 4, 6, 3], 1, 64),
  "resnet101": ("bottleneck", [3, 4, 23, 3], 1, 64),
  "resnet152": ("bottleneck", [3, 8, 36, 3], 1, 64),
  "resnext50_32x4d": ("bottleneck", [3, 4, 6, 3], 32, 4),
  "wide_resnet50_2": ("bottleneck", [3, 4, 6, 3], 1, 128),
}


def conv(cin, cout, k, stride=1, groups=1):
  return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False)


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, cin, planes, stride, downsample, groups=1, width_per_group=64):
    super().__init__()
    assert groups == 1 and width_per_group == 64
    self.conv1, self.bn1 = conv(cin, planes, 3, stride), nn.BatchNorm2d(planes)
    self.relu = nn.ReLU()
    self.conv2, self.bn2 = conv(planes, planes, 3), nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    h = self.relu(self.bn1(self.conv1(x)))
    h = self.bn2(self.conv2(h))
    skip = x if self.downsample is None else self.downsample(x)
    return self.relu(h + skip)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, cin, planes, stride, downsample, groups=1, width_per_group=64):
    super().__init__()
    width = int(planes * width_per_group / 64) * groups
    self.conv1, self.bn1 = conv(cin, width, 1), nn.BatchNorm2d(width)
    self.conv2, self.bn2 = conv(width, width, 3, stride, groups), nn.BatchNorm2d(width)
    self.conv3, self.bn3 = conv(width, planes * 4, 1), nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU()
    self.downsample = downsample

  def forward(self, x):
    h = self.relu(self.bn1(self.conv1(x)))
    h = self.relu(self.bn2(self.conv2(h)))
    h = self.bn3(self.conv3(h))
    skip = x if self.downsample is None else self.downsample(x)
    return self.relu(h + skip)


class TorchvisionResNet(nn.Module):
  """torchvision.models.ResNet's layout (avgpool + fc included, as the factories build it)."""

  def __init__(self, arch):
    super().__init__()
    kind, layers, groups, wpg = ARCHS[arch]
    block = BasicBlock if kind == "basic" else Bottleneck
    self.conv1, self.bn1 = conv(3, 64, 7, 2), nn.BatchNorm2d(64)
    self.relu = nn.ReLU()
    self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
    cin = 64
    for s, (planes, n) in enumerate(zip([64, 128, 256, 512], layers)):
      stride = 1 if s == 0 else 2
      cout = planes * block.expansion
      down = None
      if stride != 1 or cin != cout:
        down = nn.Sequential(conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))
      blocks = [block(cin, planes, stride, down, groups, wpg)]
      blocks += [block(cout, planes, 1, None, groups, wpg) for _ in range(1, n)]
      setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
      cin = cout
    self.avgpool = nn.AdaptiveAvgPool2d(1)
    self.fc = nn.Linear(cin, 1000)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
      elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def official_arch(model_name):
  """The official wrapper's substring tests, in its order (wide_resnet50_2 contains resnet50)."""
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
  raise NotImplementedError(model_name)


def official_out_channels(model_name, layers_to_crop=()):
  """The official count: 512 if the name has '34' or '18', else 2048; halved per cropped stage."""
  channels = 512 if ("34" in model_name or "18" in model_name) else 2048
  return channels // 2 ** sum(s in layers_to_crop for s in (3, 4))


class OfficialResNet(nn.Module):
  """serizba/salad's ResNet backbone semantics. `arch` overrides the name lookup (so the real
  wide_resnet50_2 can be built: the official lookup turns that name into resnet50)."""

  def __init__(
    self, model_name="resnet50", pretrained=True, layers_to_freeze=2, layers_to_crop=(), arch=None
  ):
    super().__init__()
    self.model = TorchvisionResNet(arch or official_arch(model_name))
    if pretrained:  # the official wrapper freezes only pretrained models
      for level, name in enumerate(["layer1", "layer2", "layer3"], start=1):
        if layers_to_freeze >= level:
          getattr(self.model, name).requires_grad_(False)
      if layers_to_freeze >= 0:
        self.model.conv1.requires_grad_(False)
        self.model.bn1.requires_grad_(False)
    self.model.avgpool = None
    self.model.fc = None
    if 4 in layers_to_crop:
      self.model.layer4 = None
    if 3 in layers_to_crop:
      self.model.layer3 = None
    self.out_channels = official_out_channels(model_name, layers_to_crop)

  def forward(self, x):
    m = self.model
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    for name in ("layer1", "layer2", "layer3", "layer4"):
      if getattr(m, name) is not None:
        x = getattr(m, name)(x)
    return x


def randomize_(
  model: nn.Module, seed: int = 0, calib=(4, 64, 64), floor=0.1, branch_gamma=(0.05, 0.25)
) -> nn.Module:
  """Random weights and BN state with realistic scales, so errors show in every layer.

  Convs keep torchvision's kaiming normal (fan_out) init (seed torch before building). BN
  affines are random from `seed`; the last BN of each residual branch gets a small gamma
  (`branch_gamma`), as in trained ResNets: with gammas ~1 there, a random deep ResNet amplifies
  fp32 rounding so much that torch's own fp32 forward is 2e-5 (resnet50) to 1e-4 (resnet152)
  away from its fp64 one. Running stats: those of a random `calib` batch (one train-mode pass,
  cumulative averaging), variances floored at `floor` x their median, then perturbed, so
  eval-mode activations stay O(1) but differ from a train-mode pass; num_batches_tracked
  becomes a random count.
  """
  g = torch.Generator().manual_seed(seed)
  bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
  with torch.no_grad():
    last = {
      id(b.bn3 if isinstance(b, Bottleneck) else b.bn2)
      for b in model.modules()
      if isinstance(b, (BasicBlock, Bottleneck))
    }
    for m in bns:
      lo, hi = branch_gamma if id(m) in last else (0.5, 1.5)
      m.weight.copy_(lo + (hi - lo) * torch.rand(m.weight.shape, generator=g))
      m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
      m.momentum = None  # cumulative average: one pass sets the running stats to the batch's
      m.reset_running_stats()
    was_training = model.training
    model.train()
    model(torch.randn((calib[0], 3) + tuple(calib[1:]), generator=g))
    model.train(was_training)
    for m in bns:
      m.momentum = 0.1
      m.running_var.clamp_(min=floor * float(m.running_var.median()))
      noise = torch.randn(m.running_mean.shape, generator=g)
      m.running_mean.add_(0.1 * m.running_var.sqrt() * noise)
      m.running_var.mul_(0.7 + 0.6 * torch.rand(m.running_var.shape, generator=g))
      m.num_batches_tracked.fill_(int(torch.randint(1, 100000, (), generator=g)))
  return model
