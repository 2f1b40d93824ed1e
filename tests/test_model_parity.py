"""JAX model vs the pure-torch oracle, fp32 on CPU, random weights with realistic scales."""

import functools

import jax
import numpy as np
import pytest
import torch

from salad_jax.models.vpr import VPRModel
from salad_jax.weights import convert, infer

import torch_reference as tr
from helpers import parity_diffs

SIZES = [(224, 224), (322, 322), (518, 518), (224, 322)]


@functools.lru_cache(maxsize=None)
def pair(variant):
  tm = tr.randomize_(tr.VPRModel(variant), seed=11).eval()
  sd = {k: v.numpy() for k, v in tm.state_dict().items()}
  config, backbone_only = infer.infer_config(sd)
  assert not backbone_only and config.variant == variant
  params = convert.torch_to_params(sd, config)
  model = VPRModel(config)
  fwd = jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=["intermediates"]))
  feats = jax.jit(lambda p, x: model.apply({"params": p}, x, method=VPRModel.features))
  return tm, params, fwd, feats


# S/14 at every size; B/14 (the same code, wider) at two, for the suite's time
CASES = [("S/14", hw) for hw in SIZES] + [("B/14", (224, 224)), ("B/14", (224, 322))]


@pytest.mark.parametrize("variant,hw", CASES)
def test_descriptors_features_and_assignment_match_torch(variant, hw):
  tm, params, fwd, feats = pair(variant)
  x = np.random.default_rng(hash(hw) % 2**32).standard_normal((2,) + hw + (3,)).astype(np.float32)
  for batch in (x, x[:1]) if hw == SIZES[0] else (x,):  # batch 1 once: it compiles another program
    d = parity_diffs(tm, params, fwd, feats, batch)
    assert d["shape"] == (len(batch), 8448)
    assert d["descriptor"] <= 1e-6
    assert d["features"] <= 3e-5 and d["token"] <= 3e-5
    assert d["assignment"] <= 1e-5


def test_registers_variant_matches_torch():
  tm = tr.randomize_(tr.VPRModel("S/14", registers=True), seed=12).eval()
  sd = {k: v.numpy() for k, v in tm.state_dict().items()}
  config, _ = infer.infer_config(sd)
  assert config.registers
  params = convert.torch_to_params(sd, config)
  model = VPRModel(config)
  both = jax.jit(
    lambda x: (
      model.apply({"params": params}, x),
      model.apply({"params": params}, x, method=VPRModel.features)[0],
    )
  )
  for n, hw in [(2, (224, 224)), (2, (322, 224)), (1, (532, 532))]:  # down-, mixed, up-sampling
    x = np.random.default_rng(5).standard_normal((n,) + hw + (3,)).astype(np.float32)
    with torch.no_grad():
      d_t = tm(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
      f_t, _ = tm.backbone(torch.from_numpy(x).permute(0, 3, 1, 2))
    with jax.default_matmul_precision("highest"):
      d_j, f_j = both(x)
    assert np.abs(d_j - d_t).max() <= 1e-6
    assert np.abs(np.asarray(f_j) - f_t.permute(0, 2, 3, 1).numpy()).max() <= 3e-5


def test_head_variant_sizes_follow_config():
  """The paper's smaller SALAD (m=16, l=32, g=32 -> 544-d) converts and matches torch."""
  tm = tr.randomize_(tr.VPRModel("S/14", m=16, l=32, g=32), seed=13).eval()
  sd = {k: v.numpy() for k, v in tm.state_dict().items()}
  config, _ = infer.infer_config(sd)
  assert (config.num_clusters, config.cluster_dim, config.token_dim) == (16, 32, 32)
  assert config.descriptor_dim == 544
  params = convert.torch_to_params(sd, config)
  x = np.random.default_rng(6).standard_normal((2, 126, 126, 3)).astype(np.float32)
  with torch.no_grad():
    d_t = tm(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  with jax.default_matmul_precision("highest"):
    d_j = np.asarray(VPRModel(config).apply({"params": params}, x))
  assert d_j.shape == (2, 544)
  assert np.abs(d_j - d_t).max() <= 1e-6
