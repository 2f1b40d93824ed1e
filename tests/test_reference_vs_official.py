"""Checks the pure-torch oracle (tests/torch_reference.py) against the official PyTorch code.

The official code cannot be downloaded in CI, so this runs only when SALAD_OFFICIAL_SRC points to
a folder holding `dinov2/` (facebookresearch/dinov2, the package folder) and `salad/models/`
(serizba/salad), e.g. made with `git archive`. How it was run is in the README ("Parity").
"""

import importlib.util
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch_reference as tr  # noqa: E402

SRC = os.environ.get("SALAD_OFFICIAL_SRC")
pytestmark = pytest.mark.skipif(
  not SRC, reason="set SALAD_OFFICIAL_SRC to a checkout of the official dinov2 + salad code"
)


def _load_file(name, path):
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _official_model(variant, registers):
  os.environ["XFORMERS_DISABLED"] = "1"
  sys.path.insert(0, SRC)
  from dinov2.models import vision_transformer as vits

  arch = {"S/14": "vit_small", "B/14": "vit_base", "L/14": "vit_large", "g/14": "vit_giant2"}[
    variant
  ]
  kw = dict(
    img_size=518,
    patch_size=14,
    init_values=1.0,
    block_chunks=0,
    ffn_layer="swiglufused" if variant == "g/14" else "mlp",
    num_register_tokens=4 if registers else 0,
    interpolate_antialias=registers,
    interpolate_offset=0.0 if registers else 0.1,
  )
  dino = getattr(vits, arch)(**kw)
  backbone_mod = _load_file(
    "official_dinov2_backbone", os.path.join(SRC, "salad/models/backbones/dinov2.py")
  )
  salad_mod = _load_file("official_salad", os.path.join(SRC, "salad/models/aggregators/salad.py"))
  orig = torch.hub.load
  torch.hub.load = lambda *a, **k: dino  # the wrapper downloads the hub model in __init__
  try:
    name = {"S/14": "dinov2_vits14", "B/14": "dinov2_vitb14"}[variant]
    backbone = backbone_mod.DINOv2(name, num_trainable_blocks=4, norm_layer=True, return_token=True)
  finally:
    torch.hub.load = orig

  class Official(torch.nn.Module):  # VPRModel's forward without Lightning
    def __init__(self):
      super().__init__()
      self.backbone = backbone
      self.aggregator = salad_mod.SALAD(
        num_channels=dino.embed_dim, num_clusters=64, cluster_dim=128, token_dim=256
      )

    def forward(self, x):
      return self.aggregator(self.backbone(x))

  return Official()


@pytest.mark.parametrize("variant", ["S/14", "B/14"])
@pytest.mark.parametrize("hw", [(224, 224), (322, 322), (518, 518), (224, 322)])
def test_oracle_matches_official(variant, hw):
  ours = tr.randomize_(tr.VPRModel(variant), seed=3).eval()
  official = _official_model(variant, False).eval()
  official.load_state_dict(ours.state_dict(), strict=True)  # same key layout
  x = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 3) + hw).astype(np.float32))
  with torch.no_grad():
    d_ours, d_off = ours(x), official(x)
    f_ours, t_ours = ours.backbone(x)
    f_off, t_off = official.backbone(x)
  assert (d_ours - d_off).abs().max().item() <= 1e-6
  assert (f_ours - f_off).abs().max().item() <= 1e-5
  assert (t_ours - t_off).abs().max().item() <= 1e-5


def _dino_tokens(vit_model, x):
  t = vit_model.prepare_tokens(x)
  for blk in vit_model.blocks:
    t = blk(t)
  return vit_model.norm(t)


@pytest.mark.parametrize("hw", [(224, 224), (322, 224), (644, 644)])
def test_oracle_registers_vit_matches_official(hw):
  ours = tr.randomize_(tr.DinoViT("S/14", registers=True), seed=4).eval()
  official = _official_model("S/14", True).backbone.model.eval()
  official.load_state_dict(ours.state_dict(), strict=True)
  x = torch.from_numpy(np.random.default_rng(2).standard_normal((2, 3) + hw).astype(np.float32))
  with torch.no_grad():
    a, b = _dino_tokens(ours, x), official.forward_features(x)
  b = torch.cat([b["x_norm_clstoken"][:, None], b["x_norm_regtokens"], b["x_norm_patchtokens"]], 1)
  assert (a - b).abs().max().item() <= 1e-5


def test_oracle_swiglu_matches_official():
  sys.path.insert(0, SRC)
  from dinov2.layers import SwiGLUFFNFused

  ours = tr.randomize_(tr.SwiGLU(96, 4 * 96), seed=5)
  official = SwiGLUFFNFused(in_features=96, hidden_features=4 * 96)
  official.load_state_dict(ours.state_dict(), strict=True)
  x = torch.randn(2, 7, 96)
  with torch.no_grad():
    assert (ours(x) - official(x)).abs().max().item() <= 1e-6
