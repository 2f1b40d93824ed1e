"""Pure-torch references of the aggregation heads beside SALAD and of SALAD's ablation switches.

Written from the semantics (NCHW inputs, as the official modules take them); module and parameter
names mirror the official state_dicts of serizba/salad `models/aggregators/*.py` (and of
Nanne/pytorch-NetVlad for NetVLAD), so `load_state_dict(strict=True)` checks the key layout.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def gem(x, p, eps):
  """Generalised mean over H, W of NCHW x -> [B, C, 1, 1]."""
  return F.avg_pool2d(x.clamp(min=eps).pow(p), (x.size(-2), x.size(-1))).pow(1.0 / p)


class GeMPool(nn.Module):
  def __init__(self, p=3.0, eps=1e-6):
    super().__init__()
    self.p = nn.Parameter(torch.full((1,), float(p)))
    self.eps = eps

  def forward(self, x):
    return F.normalize(gem(x, self.p, self.eps).flatten(1), p=2, dim=1)


class GeM(nn.Module):
  def __init__(self, p=3.0, eps=1e-6):
    super().__init__()
    self.p = nn.Parameter(torch.full((1,), float(p)))
    self.eps = eps

  def forward(self, x):
    return gem(x, self.p, self.eps)


class ConvAP(nn.Module):
  def __init__(self, in_channels, out_channels=512, s1=2, s2=2):
    super().__init__()
    self.channel_pool = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=True)
    self.pool = nn.AdaptiveAvgPool2d((s1, s2))  # no params: the name is not in the state_dict

  def forward(self, x):
    return F.normalize(self.pool(self.channel_pool(x)).flatten(1), p=2, dim=1)


class CosPlace(nn.Module):
  def __init__(self, in_dim, out_dim):
    super().__init__()
    self.gem = GeM()
    self.fc = nn.Linear(in_dim, out_dim)

  def forward(self, x):
    x = self.gem(F.normalize(x, p=2, dim=1)).flatten(1)
    return F.normalize(self.fc(x), p=2, dim=1)


class FeatureMixerLayer(nn.Module):
  def __init__(self, hw, mlp_ratio=1):
    super().__init__()
    hidden = int(hw * mlp_ratio)
    self.mix = nn.Sequential(
      nn.LayerNorm(hw), nn.Linear(hw, hidden), nn.ReLU(), nn.Linear(hidden, hw)
    )
    for mod in self.mix:
      if isinstance(mod, nn.Linear):
        nn.init.trunc_normal_(mod.weight, std=0.02)
        nn.init.zeros_(mod.bias)

  def forward(self, x):
    return x + self.mix(x)


class MixVPR(nn.Module):
  def __init__(
    self, in_channels=1024, in_h=20, in_w=20, out_channels=512, mix_depth=1, mlp_ratio=1, out_rows=4
  ):
    super().__init__()
    hw = in_h * in_w
    self.mix = nn.Sequential(*[FeatureMixerLayer(hw, mlp_ratio) for _ in range(mix_depth)])
    self.channel_proj = nn.Linear(in_channels, out_channels)
    self.row_proj = nn.Linear(hw, out_rows)

  def forward(self, x):
    x = self.mix(x.flatten(2))  # [B, C, hw]
    x = self.channel_proj(x.transpose(1, 2)).transpose(1, 2)  # [B, out_channels, hw]
    return F.normalize(self.row_proj(x).flatten(1), p=2, dim=-1)


class NetVLAD(nn.Module):
  """The residuals x_n - c_k are formed explicitly, [B, K, C, N]."""

  def __init__(self, num_clusters=64, dim=128, normalize_input=True, vladv2=False):
    super().__init__()
    self.k, self.normalize_input = num_clusters, normalize_input
    self.conv = nn.Conv2d(dim, num_clusters, kernel_size=1, bias=vladv2)
    self.centroids = nn.Parameter(torch.rand(num_clusters, dim))

  def forward(self, x):
    b, c = x.shape[:2]
    if self.normalize_input:
      x = F.normalize(x, p=2, dim=1)
    a = F.softmax(self.conv(x).view(b, self.k, -1), dim=1)  # [B, K, N]
    x = x.view(b, c, -1)
    residual = x[:, None] - self.centroids[None, :, :, None]  # [B, K, C, N]
    v = (residual * a[:, :, None, :]).sum(-1)  # [B, K, C]
    v = F.normalize(v, p=2, dim=2)
    return F.normalize(v.reshape(b, -1), p=2, dim=1)


def sinkhorn_balanced(scores, iters=3):
  """Log Sinkhorn without dustbin: log a = -log m, log b = -log n; returns log P + log n."""
  b, m, n = scores.shape
  kw = dict(dtype=scores.dtype)
  log_a, log_b = torch.full((m,), -math.log(m), **kw), torch.full((n,), -math.log(n), **kw)
  u, v = torch.zeros(b, m, **kw), torch.zeros(b, n, **kw)
  for _ in range(iters):
    u = log_a - torch.logsumexp(scores + v[:, None, :], dim=2)
    v = log_b - torch.logsumexp(scores + u[:, :, None], dim=1)
  return scores + u[:, :, None] + v[:, None, :] + math.log(n)


def sinkhorn_dustbin(scores, dust_bin, iters=3):
  """SALAD's Sinkhorn (reference.md §2.2): returns log P + log(n+m), [B, m+1, n]."""
  b, m, n = scores.shape
  cost = torch.cat([scores, dust_bin.expand(b, 1, n)], dim=1)
  norm = -math.log(n + m)
  kw = dict(dtype=scores.dtype)
  log_a = torch.full((m + 1,), norm, **kw)
  log_a[-1] += math.log(n - m)
  log_b = torch.full((n,), norm, **kw)
  u, v = torch.zeros(b, m + 1, **kw), torch.zeros(b, n, **kw)
  for _ in range(iters):
    u = log_a - torch.logsumexp(cost + v[:, None, :], dim=2)
    v = log_b - torch.logsumexp(cost + u[:, :, None], dim=1)
  return cost + u[:, :, None] + v[:, None, :] - norm


class Salad(nn.Module):
  """SALAD with the ablation switches (defaults = the official module)."""

  def __init__(
    self,
    d=768,
    m=64,
    l=128,
    g=256,
    hidden=512,
    dropout=0.3,
    dustbin=True,
    assignment="sinkhorn",
    global_token=True,
  ):
    super().__init__()
    self.m, self.assignment, self.global_token = m, assignment, global_token
    self.dustbin = dustbin and assignment == "sinkhorn"
    if self.dustbin:
      self.dust_bin = nn.Parameter(torch.tensor(1.0))
    drop = nn.Dropout(dropout)
    if global_token:
      self.token_features = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, g))
    self.cluster_features = nn.Sequential(
      nn.Conv2d(d, hidden, 1), drop, nn.ReLU(), nn.Conv2d(hidden, l, 1)
    )
    self.score = nn.Sequential(nn.Conv2d(d, hidden, 1), drop, nn.ReLU(), nn.Conv2d(hidden, m, 1))

  def forward(self, x, t=None):
    f = self.cluster_features(x).flatten(2)  # [B, l, n]
    s = self.score(x).flatten(2)  # [B, m, n]
    if self.assignment == "softmax":
      p = F.softmax(s, dim=1)
    elif self.dustbin:
      p = torch.exp(sinkhorn_dustbin(s, self.dust_bin))[:, :-1]
    else:
      p = torch.exp(sinkhorn_balanced(s))
    self.last_assignment = p.detach()
    v = F.normalize(torch.einsum("bcn,bkn->bck", f, p), p=2, dim=1).flatten(1)
    if not self.global_token:
      return F.normalize(v, p=2, dim=-1)
    t = F.normalize(self.token_features(t), p=2, dim=-1)
    return F.normalize(torch.cat([t, v], dim=-1), p=2, dim=-1)


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
  """Realistic but not-default weights: N(0, 1/fan_in) matrices, biases 0.05 N, norm weights
  1 + 0.2 N, p in [2.5, 4.5], centroids unit vectors (NetVLAD with normalised inputs)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.split(".")[-1] == "p":
        p.fill_(2.5 + 2.0 * float(torch.rand((), generator=g)))
      elif name.endswith("dust_bin"):
        p.fill_(1.0)
      elif name == "centroids":
        p.copy_(F.normalize(torch.randn(p.shape, generator=g), dim=1))
      elif p.ndim == 1 and ".0.weight" in name and "mix" in name:  # MixVPR's LayerNorm
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
      elif name.endswith("bias"):
        p.copy_(0.05 * torch.randn(p.shape, generator=g))
      else:
        fan_in = p[0].numel()
        p.copy_(torch.randn(p.shape, generator=g) * fan_in**-0.5)
  return model
