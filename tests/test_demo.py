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
