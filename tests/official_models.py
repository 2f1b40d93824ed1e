"""serizba/salad's VPRModel layout assembled from our pure-torch references, as the parity oracle
for every backbone x head: `backbone.model.*` (a torchvision-layout ResNet in the official ResNet
wrapper, or the DINOv2 hub layout in the official DINOv2 wrapper) and `aggregator.*` (the head
references of torch_heads.py). Module names mirror the official ones, so `load_state_dict(
strict=True)` checks an exported state_dict key for key.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch_heads as th
import torch_resnet as trn

import torch_reference as tr

WIDTH = {"S/14": 384, "B/14": 768, "Nano/14": 128}


class DINOv2Wrapper(nn.Module):
  """models/backbones/dinov2.py: tokens, frozen blocks under no_grad, the last k blocks, the
  final norm only with `norm_layer`; returns (map, token) with `return_token`, else the map."""

  def __init__(self, variant="B/14", num_trainable_blocks=2, norm_layer=False, return_token=False):
    super().__init__()
    self.model = tr.DinoViT(variant)
    self.k, self.norm_layer, self.return_token = num_trainable_blocks, norm_layer, return_token

  def forward(self, x):
    b, _, h, w = x.shape
    x = self.model.prepare_tokens(x)
    with torch.no_grad():
      for blk in self.model.blocks[: -self.k]:
        x = blk(x)
    x = x.detach()
    for blk in self.model.blocks[-self.k :]:
      x = blk(x)
    if self.norm_layer:
      x = self.model.norm(x)
    f = x[:, 1:].reshape(b, h // 14, w // 14, -1).permute(0, 3, 1, 2)
    return (f, x[:, 0]) if self.return_token else f


class VPRModel(nn.Module):
  """vpr_model.py's forward: aggregator(backbone(x))."""

  def __init__(self, backbone: nn.Module, aggregator: nn.Module):
    super().__init__()
    self.backbone, self.aggregator = backbone, aggregator

  def forward(self, x):
    out = self.backbone(x)
    return self.aggregator(*out) if isinstance(out, tuple) else self.aggregator(out)


def head(name: str, channels: int, **kw) -> nn.Module:
  if name == "gem":
    return th.GeMPool(kw.get("p", 3.0))
  if name == "convap":
    return th.ConvAP(channels, kw.get("out_channels", 512), kw.get("s1", 2), kw.get("s2", 2))
  if name == "cosplace":
    return th.CosPlace(channels, kw["out_dim"])
  if name == "mixvpr":
    args = ("in_h", "in_w", "out_channels", "mix_depth", "mlp_ratio", "out_rows")
    return th.MixVPR(channels, **{k: kw[k] for k in args if k in kw})
  if name == "netvlad":
    return th.NetVLAD(kw.get("num_clusters", 64), channels, kw.get("normalize_input", True))
  return th.Salad(
    channels,
    kw.get("num_clusters", 64),
    kw.get("cluster_dim", 128),
    kw.get("token_dim", 256),
    dropout=0.0,
    dustbin=kw.get("dustbin", True),
    assignment=kw.get("assignment", "sinkhorn"),
    global_token=kw.get("global_token", True),
  )


def build(backbone: str, aggregator: str, seed: int = 0, **kw) -> VPRModel:
  """A random official-layout VPRModel in eval mode: ResNets with realistic BN statistics
  (`torch_resnet.randomize_`), DINOv2 and heads with realistic weights."""
  torch.manual_seed(seed)
  if backbone in trn.ARCHS:
    bb = trn.OfficialResNet(
      backbone,
      pretrained=False,
      layers_to_crop=kw.pop("layers_to_crop", ()),
      arch=backbone,
    )
    trn.randomize_(bb, seed=seed)
    channels = bb.out_channels if backbone != "wide_resnet50_2" else 2048
  else:
    bb = DINOv2Wrapper(
      backbone,
      kw.pop("num_trainable_blocks", 2),
      kw.pop("norm_layer", False),
      kw.pop("return_token", aggregator == "salad"),
    )
    tr.randomize_(bb, seed=seed)
    channels = WIDTH[backbone]
  agg = th.randomize_(head(aggregator, channels, **kw), seed=seed + 1)
  return VPRModel(bb, agg).eval()


def state_dict_np(model: nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def describe(model: nn.Module, x_nhwc: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(np.ascontiguousarray(x_nhwc)).permute(0, 3, 1, 2)).numpy()
