"""benchmarks/accelerator.py --smoke runs end to end on 2 CPU devices (the batch split over both,
the pipeline from a pack); benchmarks/memory.py's figures add up."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))


def test_accelerator_benchmark_smoke(tmp_path):
  out = tmp_path / "acc.json"
  r = subprocess.run(
    [
      sys.executable,
      os.path.join(REPO, "benchmarks", "accelerator.py"),
      "--smoke",
      "--section_s",
      "900",  # a loaded shared machine: the smoke's sections take ~20 s each when idle
      "--json",
      str(out),
    ],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=600,
    env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONPATH=REPO),
  )
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  res = json.loads(out.read_text())
  assert res["errors"] == [], res["errors"]
  sections = {x["section"]: x for x in res["results"]}
  assert set(sections) == {"describe bf16 b2", "train bf16", "pipeline"}  # --smoke: bf16 only
  t = sections["train bf16"]
  assert t["finite"] and t["img_s"] > 0 and t["devices"] == 2
  # model FLOPs (analytic) and the compiled program's count (cost_analysis) side by side
  from salad_jax.models.config import ModelConfig
  from salad_jax.train import flops

  smoke = ModelConfig(
    variant="Nano/14", num_clusters=8, cluster_dim=16, token_dim=16, hidden_dim=32
  )
  model = flops.train_step_flops(smoke, (56, 56), 16).per_image / 1e9
  assert abs(t["gflop_per_image"] / model - 1) < 1e-9
  assert 0.9 < t["hlo_gflop_per_image"] / t["gflop_per_image"] < 1.3
  assert t["mfu"] is None and t["hfu"] is None  # a CPU has no peak in the table
  assert sections["describe bf16 b2"]["img_s"] > 0
  assert sections["describe bf16 b2"]["batch"] == 2
  assert sections["pipeline"]["img_s"] > 0 and sections["pipeline"]["source"] == "pack"
  summary = r.stdout[r.stdout.index("accelerator benchmark:") :]
  for words in (
    "2 x cpu",
    "mesh data=2 x fsdp=1",
    "describe 70x70 bf16",
    "train step 16 x 56x56 bf16 over 2 device(s)",
    "HFU from the compiled step's cost_analysis",
    "input pipeline (0 workers, the 224x224 pack",
    "input-bound",
  ):
    assert words in summary, summary


def test_accelerator_peak_table():
  import accelerator

  assert accelerator.peak_tflops("NVIDIA H200", "bfloat16", 0) == 989
  assert accelerator.peak_tflops("NVIDIA H100 80GB HBM3", "float32", 0) == 495
  assert accelerator.peak_tflops("NVIDIA H100 PCIe", "bfloat16", 0) == 756
  assert accelerator.peak_tflops("NVIDIA H100 NVL", "bfloat16", 0) == 835
  assert accelerator.fit_batch(240, 7) == 245 and accelerator.fit_batch(240, 8) == 240
  assert accelerator.peak_tflops("TPU v5 lite", "bfloat16", 0) == 197
  assert accelerator.peak_tflops("unknown", "bfloat16", 0) == 0
  assert accelerator.peak_tflops("unknown", "bfloat16", 500) == 500


def test_memory_figures_add_up(capsys):
  """Compiled for the 8 test devices under fsdp=8: params bytes = count x 4 / ~8 (small leaves
  stay replicated), arguments = state + batch shards (checked inside: no '!')."""
  import memory

  memory.main(
    [
      "--models",
      "Nano/14",
      "--fsdp",
      "8",
      "--remat",
      "none",
      "--dtypes",
      "float32",
      "--places",
      "8",
      "--size",
      "126",
      "--trainable_blocks",
      "2",
    ]
  )
  out = capsys.readouterr().out
  rows = [line for line in out.splitlines() if line.startswith("  Nano/14")]
  assert len(rows) == 1 and "error" not in out and "!" not in out, out
  shards = float(rows[0].split(" x 4 B / ")[1].split(")")[0])
  assert 4 < shards <= 8, rows[0]
  assert "| Nano/14 | fsdp=8 | none | fp32 |" in out and "v5e 16G" in out
