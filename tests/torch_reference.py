"""A small pure-torch DINOv2 SALAD, written from shared/reference.md, used as the parity oracle.

Module names mirror the official state_dict (`backbone.model.blocks.3.attn.qkv.weight`,
`aggregator.score.0.weight`, ...), so `load_state_dict(strict=True)` also checks the key layout.
`tests/test_reference_vs_official.py` checks this file against the official code when a checkout
of serizba/salad and facebookresearch/dinov2 is available.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

VARIANTS = {
  "S/14": (384, 12, 6, "mlp"),
  "B/14": (768, 12, 12, "mlp"),
  "L/14": (1024, 24, 16, "mlp"),
  "g/14": (1536, 40, 24, "swiglu"),
  "Nano/14": (128, 4, 2, "mlp"),
}  # salad_jax's demo size, for cheap tests


class LayerScale(nn.Module):
  def __init__(self, d):
    super().__init__()
    self.gamma = nn.Parameter(torch.ones(d))

  def forward(self, x):
    return x * self.gamma


class Attention(nn.Module):
  use_sdpa = False  # True: F.scaled_dot_product_attention, as DINOv2 HEAD (same math)

  def __init__(self, d, heads):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(d, 3 * d)
    self.proj = nn.Linear(d, d)

  def forward(self, x):
    b, n, d = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    if self.use_sdpa:
      out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
    else:  # DINOv2 at SALAD time: explicit scaled q.k^T, softmax, times v
      q, k, v = qkv[0] * (d // self.heads) ** -0.5, qkv[1], qkv[2]
      out = (q @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
  def __init__(self, d, hidden):
    super().__init__()
    self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
  def __init__(self, d, hidden):
    super().__init__()
    hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
    self.w12, self.w3 = nn.Linear(d, 2 * hidden), nn.Linear(hidden, d)

  def forward(self, x):
    x1, x2 = self.w12(x).chunk(2, dim=-1)
    return self.w3(F.silu(x1) * x2)


class Block(nn.Module):
  def __init__(self, d, heads, ffn):
    super().__init__()
    self.norm1 = nn.LayerNorm(d, eps=1e-6)
    self.attn = Attention(d, heads)
    self.ls1 = LayerScale(d)
    self.norm2 = nn.LayerNorm(d, eps=1e-6)
    self.mlp = SwiGLU(d, 4 * d) if ffn == "swiglu" else Mlp(d, 4 * d)
    self.ls2 = LayerScale(d)

  def forward(self, x):
    x = x + self.ls1(self.attn(self.norm1(x)))
    return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
  def __init__(self, d):
    super().__init__()
    self.proj = nn.Conv2d(3, d, 14, 14)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class DinoViT(nn.Module):
  def __init__(self, variant="B/14", registers=False):
    super().__init__()
    d, depth, heads, ffn = VARIANTS[variant]
    self.d, self.registers = d, registers
    self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
    self.pos_embed = nn.Parameter(torch.zeros(1, 1 + 37 * 37, d))
    if registers:
      self.register_tokens = nn.Parameter(torch.zeros(1, 4, d))
    self.mask_token = nn.Parameter(torch.zeros(1, d))
    self.patch_embed = PatchEmbed(d)
    self.blocks = nn.ModuleList([Block(d, heads, ffn) for _ in range(depth)])
    self.norm = nn.LayerNorm(d, eps=1e-6)

  def pos_encoding(self, npatch, h, w):
    # reference.md §1.3: shortcut for 37x37 square, else bicubic resample in fp32
    if npatch == 37 * 37 and h == w:
      return self.pos_embed
    pe = self.pos_embed.float()
    grid = pe[:, 1:].reshape(1, 37, 37, self.d).permute(0, 3, 1, 2)
    h0, w0 = h // 14, w // 14
    if self.registers:
      grid = F.interpolate(grid, size=(h0, w0), mode="bicubic", antialias=True)
    else:
      grid = F.interpolate(
        grid, scale_factor=((h0 + 0.1) / 37, (w0 + 0.1) / 37), mode="bicubic", antialias=False
      )
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, self.d)
    return torch.cat([pe[:, :1], grid], dim=1)

  def prepare_tokens(self, x):
    b, _, h, w = x.shape
    t = self.patch_embed(x)
    t = torch.cat([self.cls_token.expand(b, -1, -1), t], dim=1)
    t = t + self.pos_encoding(t.shape[1] - 1, h, w)
    if self.registers:
      t = torch.cat([t[:, :1], self.register_tokens.expand(b, -1, -1), t[:, 1:]], dim=1)
    return t


class Backbone(nn.Module):
  """reference.md §3: frozen first blocks under no_grad, then detach, last k blocks, final norm."""

  def __init__(self, variant="B/14", registers=False, num_trainable_blocks=4):
    super().__init__()
    self.model = DinoViT(variant, registers)
    self.k = num_trainable_blocks

  def forward(self, img):
    b, _, h, w = img.shape
    x = self.model.prepare_tokens(img)
    n_frozen = len(self.model.blocks) - self.k
    with torch.no_grad():
      for blk in self.model.blocks[:n_frozen]:
        x = blk(x)
    x = x.detach()
    for blk in self.model.blocks[n_frozen:]:
      x = blk(x)
    x = self.model.norm(x)
    skip = 5 if self.model.registers else 1
    f = x[:, skip:].reshape(b, h // 14, w // 14, -1).permute(0, 3, 1, 2)
    return f, x[:, 0]


def sinkhorn_log(scores, dust_bin, iters=3):
  """reference.md §2.2 steps 2-4: returns log P + log(n+m), [B, m+1, n]."""
  b, m, n = scores.shape
  cost = torch.cat([scores, dust_bin.expand(b, 1, n).to(scores.dtype)], dim=1)
  norm = -math.log(n + m)
  log_a = torch.full((m + 1,), norm)
  log_a[-1] += math.log(n - m)
  log_b = torch.full((n,), norm)
  u, v = torch.zeros(b, m + 1), torch.zeros(b, n)
  for _ in range(iters):
    u = log_a - torch.logsumexp(cost + v[:, None, :], dim=2)
    v = log_b - torch.logsumexp(cost + u[:, :, None], dim=1)
  return cost + u[:, :, None] + v[:, None, :] - norm


class Salad(nn.Module):
  def __init__(self, d=768, m=64, l=128, g=256, hidden=512, dropout=0.3):
    super().__init__()
    self.m, self.l = m, l
    self.dust_bin = nn.Parameter(torch.tensor(1.0))
    drop = nn.Dropout(dropout)
    self.token_features = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, g))
    self.cluster_features = nn.Sequential(
      nn.Conv2d(d, hidden, 1), drop, nn.ReLU(), nn.Conv2d(hidden, l, 1)
    )
    self.score = nn.Sequential(nn.Conv2d(d, hidden, 1), drop, nn.ReLU(), nn.Conv2d(hidden, m, 1))
    self.last_assignment = None

  def forward(self, feats):
    x, t = feats
    f = self.cluster_features(x).flatten(2)  # [B, l, n]
    s = self.score(x).flatten(2)  # [B, m, n]
    t = self.token_features(t)
    p = torch.exp(sinkhorn_log(s, self.dust_bin))[:, :-1, :]
    self.last_assignment = p
    v = torch.einsum("bcn,bkn->bck", f, p)
    v = F.normalize(v, p=2, dim=1).flatten(1)
    return F.normalize(torch.cat([F.normalize(t, p=2, dim=-1), v], dim=-1), p=2, dim=-1)


class VPRModel(nn.Module):
  def __init__(
    self,
    variant="B/14",
    registers=False,
    num_trainable_blocks=4,
    m=64,
    l=128,
    g=256,
    hidden=512,
    dropout=0.3,
  ):
    super().__init__()
    self.backbone = Backbone(variant, registers, num_trainable_blocks)
    self.aggregator = Salad(VARIANTS[variant][0], m, l, g, hidden, dropout)

  def forward(self, img):
    return self.aggregator(self.backbone(img))


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
  """Random weights with realistic scales: LayerScale not all ones, pos_embed not tiny."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("gamma"):
        p.copy_(torch.rand(p.shape, generator=g) * 0.9 + 0.1)
      elif (
        name.endswith("pos_embed") or name.endswith("cls_token") or name.endswith("register_tokens")
      ):
        p.copy_(torch.randn(p.shape, generator=g) * 0.5)
      elif name.endswith("mask_token"):
        p.copy_(torch.randn(p.shape, generator=g) * 0.02)
      elif name.endswith("dust_bin"):
        p.fill_(1.0)
      elif "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
      elif name.endswith("bias"):
        p.copy_(0.05 * torch.randn(p.shape, generator=g))
      else:
        fan_in = p[0].numel()
        p.copy_(torch.randn(p.shape, generator=g) * fan_in**-0.5)
  return model
