"""The embedded demo end to end (shortened): generate data, train, checkpoint, evaluate, learn."""

import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_short_demo_learns_and_evaluate_reproduces_its_numbers(tmp_path):
  data = tmp_path / "demo_data"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  cmd = [
    sys.executable,
    os.path.join(REPO, "train.py"),
    "--config",
    os.path.join(REPO, "configs/demo.py:short"),
    "--workdir",
    str(tmp_path / "run"),
    f"--config.data.root={data / 'gsv'}",
    f"--config.eval.sets=folder:{data / 'eval'}",
  ]
  r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  m = re.search(r"R@1 on eval: untrained ([\d.]+) -> trained ([\d.]+)", r.stdout)
  assert m, r.stdout[-2000:]
  untrained, trained = float(m.group(1)), float(m.group(2))
  chance = 100 * 2 / 120  # 2 database images of the right place among 120
  assert trained >= 2 * untrained and trained >= 10 * chance, (untrained, trained)
  assert (data / ".demo_complete").exists() and (tmp_path / "run" / "tensorboard").is_dir()

  # evaluate.py on the workdir picks the best checkpoint and shows the numbers training printed
  best = max(
    json.loads(line).get("val/eval/R@1", -1)
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
  )
  cmd = [
    sys.executable,
    os.path.join(REPO, "evaluate.py"),
    "--checkpoint",
    str(tmp_path / "run"),
    "--database_folder",
    str(data / "eval" / "database"),
    "--queries_folder",
    str(data / "eval" / "queries"),
    "--image_size",
    "112",
    "--num_workers",
    "0",
    "--output_dir",
    str(tmp_path / "eval"),
  ]
  r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  recalls = json.loads((tmp_path / "eval" / "recalls.json").read_text())
  assert abs(recalls["eval"]["R@1"] - best) < 1e-6


@pytest.mark.slow
def test_short_resnet_mixvpr_demo_trains_saves_batch_stats_and_exports(tmp_path):
  """A non-SALAD head end to end: ResNet-18 (cut after layer2) + MixVPR with SGD, warmup and
  MultiStepLR; its BatchNorm statistics go through the checkpoints, evaluate.py and the export
  to an official-layout state_dict."""
  import numpy as np
  import official_models as om
  import torch

  import salad_jax

  data = tmp_path / "demo_data"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  cmd = [
    sys.executable,
    os.path.join(REPO, "train.py"),
    "--config",
    os.path.join(REPO, "configs/demo.py:mixvpr,short"),
    "--workdir",
    str(tmp_path / "run"),
    f"--config.data.root={data / 'gsv'}",
    f"--config.eval.sets=folder:{data / 'eval'}",
  ]
  r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "training resnet18 cropped [3, 4] + MixVPR (256-d)" in r.stdout
  m = re.search(r"R@1 on eval: untrained ([\d.]+) -> trained ([\d.]+)", r.stdout)
  assert m and float(m.group(2)) > float(m.group(1)), r.stdout[-2000:]
  step_dirs = sorted((tmp_path / "run" / "checkpoints").glob("[0-9]*"))
  assert step_dirs and all((d / "batch_stats").is_dir() for d in step_dirs)

  cmd = [
    sys.executable,
    os.path.join(REPO, "evaluate.py"),
    "--checkpoint",
    str(tmp_path / "run"),
    "--database_folder",
    str(data / "eval" / "database"),
    "--queries_folder",
    str(data / "eval" / "queries"),
    "--image_size",
    "64",
    "--num_workers",
    "0",
    "--output_dir",
    str(tmp_path / "eval"),
  ]
  r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  best = max(
    json.loads(line).get("val/eval/R@1", -1)
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
  )
  assert (
    abs(json.loads((tmp_path / "eval" / "recalls.json").read_text())["eval"]["R@1"] - best) < 1e-6
  )

  # the trained weights, BatchNorm statistics included, as the official layout
  model = salad_jax.load(str(tmp_path / "run"))
  model.to_torch(str(tmp_path / "demo.pth"))
  tm = om.build(
    "resnet18",
    "mixvpr",
    layers_to_crop=(3, 4),
    in_h=8,
    in_w=8,
    out_channels=32,
    mix_depth=2,
    out_rows=8,
  )
  tm.load_state_dict(torch.load(str(tmp_path / "demo.pth"), weights_only=True), strict=True)
  x = np.clip(np.random.default_rng(0).standard_normal((2, 64, 64, 3)), -2, 2).astype("f4")
  assert np.abs(model.describe(x) - om.describe(tm, x)).max() <= 1e-5
