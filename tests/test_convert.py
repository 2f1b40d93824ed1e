"""Weight conversion both ways, file formats, the strict key check, and refusing unsafe pickles."""

import collections
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import salad_jax
from salad_jax.weights import convert, infer, torch_files

import torch_reference as tr
from helpers import images as random_images
from helpers import state_dict_np, torch_describe, torch_model, twin

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def images(n=2, hw=(224, 224), seed=0):
  """Random images within the value range of ImageNet-normalised ones (what describe accepts)."""
  return np.clip(random_images(n, hw, seed), -2.1, 2.6)


@pytest.fixture(scope="module")
def s14():
  return twin("S/14", seed=1)


def test_round_trip_torch_jax_torch_is_bit_exact(s14):
  tm, params, config = s14
  back = convert.params_to_torch(params, config)
  sd = tm.state_dict()
  assert list(back) == list(sd)  # official key order
  for k, v in sd.items():
    assert back[k].dtype == np.float32 and np.array_equal(back[k], v.numpy()), k


def test_round_trip_registers_and_swiglu_layout():
  tm = torch_model("S/14", seed=2, registers=True)
  sd = state_dict_np(tm)
  config, _ = infer.infer_config(sd)
  back = convert.params_to_torch(convert.torch_to_params(sd, config), config)
  assert list(back) == list(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)
  g_rows = convert.layout(salad_jax.ModelConfig(variant="g/14"))
  assert "backbone.model.blocks.39.mlp.w12.weight" in [r[0] for r in g_rows]
  assert len([r for r in g_rows if r[0].startswith("backbone.")]) == 567  # hub key count


def test_layout_matches_official_key_count_and_order():
  rows = convert.layout(salad_jax.ModelConfig())
  keys = [r[0] for r in rows]
  assert len(keys) == 188
  assert keys[:4] == [
    "backbone.model.cls_token",
    "backbone.model.pos_embed",
    "backbone.model.mask_token",
    "backbone.model.patch_embed.proj.weight",
  ]
  assert keys[175] == "aggregator.dust_bin"
  assert keys == list(tr.VPRModel("B/14").state_dict())


def test_exported_pth_loads_strictly_into_torch_and_describes_the_same(s14, tmp_path):
  tm, params, config = s14
  model = salad_jax.SaladModel(params, config)
  path = str(tmp_path / "exported.pth")
  model.to_torch(path)
  fresh = tr.VPRModel("S/14").eval()
  fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
  x = images(2, (224, 224))
  np.testing.assert_array_equal(torch_describe(fresh, x), torch_describe(tm, x))


def test_lightning_ckpt_loads_and_matches_torch(s14, tmp_path):
  tm, _, _ = s14
  path = str(tmp_path / "last.ckpt")
  torch.save(
    {
      "epoch": 3,
      "global_step": 4170,
      "pytorch-lightning_version": "2.1.2",
      "state_dict": tm.state_dict(),
      "loops": {},
      "hparams_name": "kwargs",
      "hyper_parameters": {"lr": 6e-5, "agg_arch": "SALAD"},
    },
    path,
  )
  model = salad_jax.load(path)
  assert model.source["kind"] == "salad" and len(model.source["sha256"]) == 64
  x = images(2, (224, 224))
  assert np.abs(model.describe(x) - torch_describe(tm, x)).max() <= 1e-6


def test_safetensors_both_ways(s14, tmp_path):
  tm, params, config = s14
  path = str(tmp_path / "w.safetensors")
  salad_jax.SaladModel(params, config).to_torch(path)
  model = salad_jax.load(path)
  x = images(1, (224, 224))
  assert np.abs(model.describe(x) - torch_describe(tm, x)).max() <= 1e-6


def test_dinov2_hub_file_gives_backbone_and_fresh_head(tmp_path):
  tm = torch_model("S/14", seed=3)
  path = str(tmp_path / "dinov2_vits14_pretrain.pth")
  torch.save(tm.backbone.model.state_dict(), path)  # plain hub layout: cls_token, blocks.0...
  model = salad_jax.load(path)
  assert model.source["kind"] == "dinov2"
  x = images(2, (224, 224))
  f, t = model.features(x)
  with torch.no_grad():
    f_t, t_t = tm.backbone(torch.from_numpy(x).permute(0, 3, 1, 2))
  assert np.abs(f - f_t.permute(0, 2, 3, 1).numpy()).max() <= 3e-5
  assert np.abs(t - t_t.numpy()).max() <= 3e-5
  assert model.params["aggregator"]["dust_bin"] == 1.0  # fresh head init
  assert model.describe(x).shape == (2, 8448)


def test_convert_weights_cli_writes_orbax_dir_and_refuses_to_overwrite(s14, tmp_path):
  tm, _, _ = s14
  src = str(tmp_path / "dino_salad.ckpt")
  torch.save(tm.state_dict(), src)
  dst = str(tmp_path / "converted")
  cmd = [sys.executable, os.path.join(REPO, "convert_weights.py"), "--src", src, "--dst", dst]
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
  assert out.returncode == 0, out.stderr
  meta = json.load(open(os.path.join(dst, "salad_config.json")))
  assert meta["model"]["variant"] == "S/14" and meta["model"]["num_clusters"] == 64
  assert meta["source"]["sha256"] == torch_files.sha256(src)
  model = salad_jax.load(dst)
  x = images(2, (322, 322))
  assert np.abs(model.describe(x) - torch_describe(tm, x)).max() <= 1e-6
  again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
  assert again.returncode == 2 and "exists" in again.stderr and "--overwrite" in again.stderr
  assert salad_jax.load(dst).describe(x).shape == (2, 8448)  # still intact
  replaced = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True, cwd=REPO)
  assert replaced.returncode == 0, replaced.stderr  # its own checkpoint: replaced
  assert sorted(os.listdir(dst)) == ["params", "salad_config.json"]
  assert not [d for d in os.listdir(tmp_path) if d.startswith(".salad_")]  # no leftovers


def _mutated(sd, drop=None, add=None, reshape=None):
  sd = collections.OrderedDict(sd)
  if drop:
    del sd[drop]
  if add:
    sd[add] = np.zeros(3, np.float32)
  if reshape:
    sd[reshape] = np.zeros((5, 5), np.float32)
  return sd


def test_strict_check_names_missing_unexpected_and_misshaped_keys(s14):
  tm, _, config = s14
  sd = state_dict_np(tm)
  bad = _mutated(
    sd,
    drop="aggregator.score.0.bias",
    add="aggregator.extra.weight",
    reshape="backbone.model.blocks.2.attn.qkv.weight",
  )
  with pytest.raises(convert.CheckpointMismatchError) as e:
    convert.torch_to_params(bad, config)
  msg = str(e.value)
  assert "in model, not in checkpoint (1): aggregator.score.0.bias" in msg
  assert "in checkpoint, not in model (1): aggregator.extra.weight" in msg
  assert "backbone.model.blocks.2.attn.qkv.weight: checkpoint (5, 5), model (1152, 384)" in msg


def test_checkpoint_for_a_different_config_is_a_mismatch(s14):
  tm, _, _ = s14
  with pytest.raises(convert.CheckpointMismatchError, match="shape mismatches"):
    convert.torch_to_params(
      state_dict_np(tm), salad_jax.ModelConfig(variant="S/14", num_clusters=32)
    )


def test_file_with_wrong_keys_is_a_clear_error(tmp_path):
  path = str(tmp_path / "resnet.pth")
  torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
  with pytest.raises(ValueError, match="not a SALAD or DINOv2 checkpoint"):
    salad_jax.load(path)


@pytest.mark.parametrize("content", [b"", b"hello world, not a checkpoint\n", os.urandom(4096)])
def test_not_a_checkpoint_is_a_clear_error(tmp_path, content):
  path = tmp_path / "junk.ckpt"
  path.write_bytes(content)
  with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
    salad_jax.load(str(path))
  st = tmp_path / "junk.safetensors"
  st.write_bytes(content)
  with pytest.raises(ValueError, match="not a readable .safetensors"):
    salad_jax.load(str(st))


class _Evil:
  def __init__(self, marker, fn=exec):
    self.marker, self.fn = marker, fn

  def __reduce__(self):
    return (self.fn, (f"open({self.marker!r}, 'w').write('pwned')",))


class _System:
  def __reduce__(self):
    return (os.system, ("true",))


def test_pickle_that_runs_code_is_refused_naming_what_it_calls(tmp_path):
  marker = str(tmp_path / "ran")
  path = str(tmp_path / "dino_salad.ckpt")
  cases = [
    (lambda f: pickle.dump({"state_dict": {"x": _Evil(marker)}}, f, protocol=2), "builtins.exec"),
    # newer pickle protocols are not even parsed by torch: the name comes from pickletools
    (
      lambda f: pickle.dump({"state_dict": {"x": _Evil(marker, eval)}}, f, protocol=4),
      "builtins.eval",
    ),
    # the same payload inside torch's zip format
    (lambda f: torch.save({"w": torch.zeros(1), "evil": _System()}, f), "os.system"),
  ]
  for write, name in cases:
    with open(path, "wb") as f:
      write(f)
    with pytest.raises(ValueError, match="refusing to load") as e:
      salad_jax.load(path)
    assert f"refers to {name} " in str(e.value) and "nothing in it was executed" in str(e.value)
    assert "weights_only" not in str(e.value)  # never torch's advice to load unsafely
    assert not os.path.exists(marker)


def test_missing_file_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    salad_jax.load(str(tmp_path / "nope.ckpt"))
