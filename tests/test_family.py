"""Every model the official code trains, through salad_jax's public paths: official-layout
checkpoints (flat and Lightning) of each backbone x head load with `salad_jax.load` and give the
torch descriptors; each exports back to a state_dict the official layout loads with strict=True;
the describe API on every head; BatchNorm statistics in converted dirs; the config checks."""

import json
import os

import jax
import numpy as np
import official_models as om
import pytest
import torch

import salad_jax
from salad_jax.errors import UserError
from salad_jax.models import official, vpr
from salad_jax.models.config import ModelConfig, parse_overrides
from salad_jax.weights import convert, infer

# name: (backbone, head, image side, head arguments). ResNets at 64x64 (MixVPR on the 4x4 map
# of layer3), DINOv2 S/14 at 56x56 (a 4x4 patch grid), so each case compiles in seconds.
CASES = {
  "resnet50_mixvpr": (
    "resnet50",
    "mixvpr",
    64,
    dict(layers_to_crop=(4,), in_h=4, in_w=4, out_channels=128, mix_depth=2, out_rows=4),
  ),
  "resnet50_convap": ("resnet50", "convap", 64, dict(out_channels=256)),
  "resnext50_gem": ("resnext50_32x4d", "gem", 64, {}),
  "resnet18_cosplace": ("resnet18", "cosplace", 64, dict(out_dim=96)),
  "dinov2_mixvpr": (
    "S/14",
    "mixvpr",
    56,
    dict(in_h=4, in_w=4, out_channels=64, mix_depth=1, out_rows=2, norm_layer=True),
  ),
  "dinov2_gem": ("S/14", "gem", 56, {}),
}
REPORT: dict[str, dict] = {}


def images(n, side, seed=0):
  """Random images within the range of ImageNet-normalised ones (what describe accepts)."""
  x = np.random.default_rng(seed).standard_normal((n, side, side, 3)).astype(np.float32)
  return np.clip(x, -2.1, 2.6)


def lightning(path, model, hparams):
  """A Lightning checkpoint as `save_weights_only=True` writes it."""
  torch.save(
    {
      "epoch": 3,
      "global_step": 100,
      "pytorch-lightning_version": "2.1.2",
      "state_dict": model.state_dict(),
      "hparams_name": "kwargs",
      "hyper_parameters": hparams,
    },
    path,
  )


HPARAMS = {  # what VPRModel.save_hyperparameters() stores for dinov2_mixvpr
  "backbone_arch": "dinov2_vits14",
  "backbone_config": {"num_trainable_blocks": 2, "norm_layer": True, "return_token": False},
  "agg_arch": "MixVPR",
  "agg_config": {
    "in_channels": 384,
    "in_h": 4,
    "in_w": 4,
    "out_channels": 64,
    "mix_depth": 1,
    "mlp_ratio": 1,
    "out_rows": 2,
  },
  "lr": 6e-5,
  "optimizer": "adamw",
  "loss_name": "MultiSimilarityLoss",
}


@pytest.mark.parametrize("name", list(CASES))
def test_official_checkpoint_loads_describes_as_torch_and_exports_back_strict(
  name, tmp_path, capsys
):
  backbone, head, side, kw = CASES[name]
  tm = om.build(backbone, head, seed=len(name), **dict(kw))
  path = str(tmp_path / f"{name}.ckpt")
  if name == "dinov2_mixvpr":  # the Lightning file: norm_layer comes from its hyper_parameters
    lightning(path, tm, HPARAMS)
  else:  # a flat state_dict, BatchNorm's int64 counters included
    torch.save(tm.state_dict(), path)
  model = salad_jax.load(path)
  notes = capsys.readouterr().err
  c = model.config
  assert c.aggregator == head and (c.backbone == backbone or c.variant == backbone)
  if name == "dinov2_gem":  # no hyper_parameters: the wrapper's default, with a note
    assert not c.norm_layer and "norm_layer=False (the official DINOv2 wrapper" in notes
  if name == "dinov2_mixvpr":
    assert c.norm_layer and c.num_trainable_blocks == 2 and "norm_layer" not in notes

  x = images(3, side, seed=1)
  d_j, d_t = model.describe(x), om.describe(tm, x)
  err = float(np.abs(d_j - d_t).max())
  REPORT[name] = dict(dim=d_j.shape[1], max_abs=err)
  assert d_j.shape == (3, c.descriptor_dim) and err <= 1e-5, err
  f, t = model.features(x)
  assert f.shape[-1] == c.width and (t is None) == c.is_resnet

  out = str(tmp_path / "back.pth")
  model.to_torch(out)
  fresh = om.build(backbone, head, seed=99, **dict(kw))
  fresh.load_state_dict(torch.load(out, weights_only=True), strict=True)
  sd = tm.state_dict()
  assert list(fresh.state_dict()) == list(sd)
  for k, v in fresh.state_dict().items():
    assert v.dtype == sd[k].dtype and torch.equal(v, sd[k]), k


def test_mixvpr_recipe_at_320_shapes_only():
  """The released ResNet-50 + MixVPR layout (4096-d at 320x320), shapes only: its keys give the
  README's model; the forward is traced at 320 and refused at 322 with one line."""
  bb = om.trn.OfficialResNet("resnet50", pretrained=False, layers_to_crop=(4,))
  head = om.th.MixVPR(1024, 20, 20, 1024, 4, 1, 4)
  sd = om.state_dict_np(om.VPRModel(bb, head))
  config, backbone_only = infer.infer_config(sd)
  expected = official.from_official(
    "resnet50",
    {"layers_to_crop": [4]},
    "MixVPR",
    {
      "in_channels": 1024,
      "in_h": 20,
      "in_w": 20,
      "out_channels": 1024,
      "mix_depth": 4,
      "mlp_ratio": 1,
      "out_rows": 4,
    },
  )
  assert not backbone_only and config.fields(config.model_fields()) == expected.fields(
    expected.model_fields()
  )
  assert config.descriptor_dim == 4096 and config.feature_grid(320, 320) == (20, 20)
  variables = convert.torch_to_variables(sd, config)  # every key and shape, both ways
  assert len(jax.tree.leaves(variables["batch_stats"])) == 43 * 3  # 43 BatchNorms to layer3
  out = jax.eval_shape(
    lambda v, x: vpr.VPRModel(config).apply(v, x), variables, np.zeros((2, 320, 320, 3), "f4")
  )
  assert out.shape == (2, 4096)
  with pytest.raises(UserError, match="MixVPR was built for 20x20") as e:
    config.check_image_shape((1, 322, 322, 3))
  assert "use 320x320 images" in e.value.hint


@pytest.fixture(scope="module")
def nano_heads():
  """Nano ViT twins of the heads beside the acceptance cases: NetVLAD and SALAD's ablations."""
  out = {}
  for name, kw in {
    "netvlad": dict(num_clusters=8),
    "salad_no_dustbin": dict(num_clusters=8, cluster_dim=16, token_dim=16, dustbin=False),
    "salad_softmax": dict(num_clusters=8, cluster_dim=16, token_dim=16, assignment="softmax"),
    "salad_no_token": dict(num_clusters=8, cluster_dim=16, token_dim=16, global_token=False),
  }.items():
    head = "netvlad" if name == "netvlad" else "salad"
    out[name] = om.build("Nano/14", head, seed=3, norm_layer=True, **kw)
  return out


@pytest.mark.parametrize(
  "name,overrides",
  [
    ("netvlad", dict(norm_layer=True)),
    ("salad_no_dustbin", dict(salad_assignment="sinkhorn")),
    ("salad_softmax", dict(salad_assignment="softmax")),
    ("salad_no_token", {}),
  ],
)
def test_describe_api_on_the_other_heads(nano_heads, name, overrides, tmp_path):
  tm = nano_heads[name]
  path = str(tmp_path / "m.safetensors")
  from safetensors.torch import save_file

  save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, path)
  if name in ("salad_no_dustbin", "salad_softmax"):  # no dust_bin: the user's to say which
    with pytest.raises(ValueError, match="salad_assignment='sinkhorn' or 'softmax'"):
      salad_jax.load(path)
  model = salad_jax.load(path, **overrides)
  x = images(2, 70, seed=2)
  err = float(np.abs(model.describe(x) - om.describe(tm, x)).max())
  REPORT[name] = dict(dim=model.descriptor_dim, max_abs=err)
  assert err <= 1e-5, err
  if name.startswith("salad"):
    a = model.assignment(x)
    assert a.shape == (2, 9, 5, 5) and np.allclose(a.sum(axis=1), 1.0, atol=1e-5)
  else:
    with pytest.raises(UserError, match="assignment maps exist for SALAD only"):
      model.assignment(x)


def test_converted_dir_keeps_batch_stats_and_a_resnet_backbone_file_gets_a_fresh_head(tmp_path):
  tm = om.build("resnet18", "gem", seed=7, layers_to_crop=(3, 4))
  path = str(tmp_path / "r18.pth")
  torch.save(tm.state_dict(), path)
  model = salad_jax.load(path)
  x = images(2, 64, seed=3)
  d = model.describe(x)
  model.save(str(tmp_path / "conv"))
  meta = json.loads((tmp_path / "conv" / "salad_config.json").read_text())
  assert "batch_stats_checksum" in meta and any(k.startswith("batch_stats/") for k in meta["files"])
  again = salad_jax.load(str(tmp_path / "conv"))  # the same weights: the same descriptors
  jax.tree.map(np.testing.assert_array_equal, again.params, model.params)
  jax.tree.map(np.testing.assert_array_equal, again.batch_stats, model.batch_stats)
  assert again.config == model.config and d.shape == (2, 128)
  # --overwrite replaces only what salad_jax wrote: the batch_stats item included
  model.save(str(tmp_path / "conv"), overwrite=True)
  (tmp_path / "conv" / "batch_stats" / "mine.txt").write_text("a user's file")
  with pytest.raises(UserError, match="batch_stats/mine.txt"):
    model.save(str(tmp_path / "conv"), overwrite=True)

  # a torchvision ImageNet file (fc.* and all four stages): the head is named by the caller
  tv = om.trn.TorchvisionResNet("resnet18")
  torch.save(tv.state_dict(), str(tmp_path / "resnet18-f37072fd.pth"))
  with pytest.raises(ValueError, match="needs the backbone's cls token"):
    salad_jax.load(str(tmp_path / "resnet18-f37072fd.pth"))
  fresh = salad_jax.load(
    str(tmp_path / "resnet18-f37072fd.pth"),
    aggregator="mixvpr",
    in_h=8,
    in_w=8,
    layers_to_crop=(3, 4),
    out_channels=32,
  )
  assert fresh.source["kind"] == "resnet" and fresh.describe(x).shape == (2, 128)
  want = tv.state_dict()["layer1.0.bn1.running_var"].numpy()
  np.testing.assert_array_equal(
    fresh.batch_stats["backbone"]["layer1_0"]["bn1"]["running_var"], want
  )


def test_hyper_parameters_and_keys_decide_or_the_error_names_the_flag(tmp_path, capsys):
  tm = om.build("resnet18", "convap", seed=2, s1=3, s2=1)
  sd = om.state_dict_np(tm)
  config, _ = infer.infer_config(sd)  # s1, s2 are not in the keys: the class default + a note
  assert (config.s1, config.s2) == (2, 2) and "s1=2 (ConvAP's default" in capsys.readouterr().err
  hp = {"backbone_arch": "resnet18", "agg_arch": "ConvAP", "agg_config": {"s1": 3, "s2": 1}}
  config, _ = infer.infer_config(sd, hp)
  assert (config.s1, config.s2, config.layers_to_freeze) == (3, 1, 2)
  with pytest.raises(convert.CheckpointMismatchError, match="agg_arch|aggregator='gem'"):
    infer.infer_config(sd, {**hp, "agg_arch": "GeM", "agg_config": {"p": 3}})
  with pytest.raises(convert.CheckpointMismatchError, match="in_channels=2048"):
    infer.infer_config(sd, {**hp, "agg_config": {"in_channels": 2048}})
  # MixVPR's own hyper_parameters (pretrained, layers_to_freeze, layers_to_crop at the top)
  fields, _ = official.fields_from_hyper_parameters(
    {
      "backbone_arch": "resnet50",
      "pretrained": True,
      "layers_to_freeze": 1,
      "layers_to_crop": [4],
      "agg_arch": "GeM",
      "agg_config": {"p": 3},
    }
  )
  assert fields["layers_to_crop"] == (4,) and fields["layers_to_freeze"] == 1
  # the main.py arguments are today's default model; official quirks are reproduced
  assert (
    official.from_official(
      "dinov2_vitb14",
      {"num_trainable_blocks": 4, "return_token": True, "norm_layer": True},
      "SALAD",
      {"num_channels": 768, "num_clusters": 64, "cluster_dim": 128, "token_dim": 256},
    )
    == ModelConfig()
  )
  assert official.from_official("wide_resnet50_2", {}, "GeM").backbone == "resnet50"
  assert (
    official.from_official("dinov2_vits14", {"num_trainable_blocks": 0}, "GeM").num_trainable_blocks
    == 12
  )


def test_model_config_checks_are_one_line():
  with pytest.raises(UserError, match="SALAD's global token needs the backbone's cls token"):
    ModelConfig(backbone="resnet50")
  with pytest.raises(UserError, match="return_token=False"):
    ModelConfig(return_token=False)
  with pytest.raises(UserError, match="unknown aggregator 'vlad'"):
    ModelConfig(aggregator="vlad")
  with pytest.raises(UserError, match="layers_to_crop=\\[3\\] is not supported"):
    ModelConfig(backbone="resnet18", aggregator="gem", layers_to_crop=(3,))
  with pytest.raises(UserError, match="crops ResNet stages"):
    ModelConfig(aggregator="gem", layers_to_crop=(4,))
  assert parse_overrides(["salad_assignment=softmax", "layers_to_crop=3,4", "s1=3"]) == dict(
    salad_assignment="softmax", layers_to_crop=(3, 4), s1=3
  )
  with pytest.raises(UserError, match="expected FIELD=VALUE"):
    parse_overrides(["nope=1"])
  # a saved model keeps what fixes its parameters and function; the rest may change
  c = ModelConfig(aggregator="gem")
  assert set(c.model_fields()) == {"backbone", "aggregator", "variant", "registers", "norm_layer"}
  assert "num_trainable_blocks" in c.train_state_fields() and "dtype" in c.descriptor_fields()


def test_zz_report():
  """The measured figures (pytest -s shows them; docs/parity.md quotes them)."""
  for name, r in REPORT.items():
    print(f"{name}: {r['dim']}-d, max abs descriptor diff vs torch {r['max_abs']:.1e}")


def test_convert_weights_cli_takes_model_settings(nano_heads, tmp_path):
  import subprocess
  import sys

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  src = str(tmp_path / "softmax.pth")
  torch.save(nano_heads["salad_softmax"].state_dict(), src)
  dst = str(tmp_path / "conv")
  cmd = [sys.executable, os.path.join(repo, "convert_weights.py"), "--src", src, "--dst", dst]
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
  assert out.returncode == 2 and "--model salad_assignment=" in out.stderr, out.stderr
  out = subprocess.run(
    cmd + ["--model", "salad_assignment=softmax"], capture_output=True, text=True, cwd=tmp_path
  )
  assert out.returncode == 0, out.stderr
  assert "ViT-Nano/14 + SALAD (144-d), m=8 l=16 g=16" in out.stdout
  meta = json.loads((tmp_path / "conv" / "salad_config.json").read_text())
  assert meta["model"]["salad_assignment"] == "softmax" and "batch_stats_checksum" not in meta
