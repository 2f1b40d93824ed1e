r"""What summing the weight gradients in bf16 does to training: the demo's losses under bf16
compute with `model.grad_reduce_dtype` float32 (the default) and bfloat16, against float32
compute.

  python benchmarks/grad_reduce_effect.py                  # 40 steps, 1 device
  python benchmarks/grad_reduce_effect.py --steps 88 --devices 8

Each run is a fresh `train.py` process on the demo config (generated demo data, no evaluation)
into its own workdir; the losses are read from its metrics.jsonl (logged every step). Reported:
each run's loss at a few steps, and per bf16 run the mean and largest relative difference of
its losses from the float32 run's over all steps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = {
  "float32 compute": {},
  "bf16 compute, float32 gradient sums": {"model.dtype": "bfloat16"},
  "bf16 compute, bf16 gradient sums": {
    "model.dtype": "bfloat16",
    "model.grad_reduce_dtype": "bfloat16",
  },
}


def losses(tmp: str, name: str, overrides: dict, steps: int, devices: int) -> list[float]:
  workdir = os.path.join(tmp, name.replace(" ", "_").replace(",", ""))
  cmd = [
    sys.executable,
    os.path.join(REPO, "train.py"),
    "--config",
    os.path.join(REPO, "configs/demo.py"),
  ]
  cmd += ["--workdir", workdir, f"--config.stop_after_steps={steps}", "--config.log_every_steps=1"]
  cmd += ["--config.eval.sets=", "--config.compile_cache_dir="]
  cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  r = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
  if r.returncode:
    sys.exit(f"{name}: train.py failed:\n{r.stderr[-3000:]}")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [row["loss"] for row in rows if "loss" in row]


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=40)
  p.add_argument("--devices", type=int, default=1)
  args = p.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    got = {name: losses(tmp, name, o, args.steps, args.devices) for name, o in RUNS.items()}
  ref = got["float32 compute"]
  show = sorted({1, args.steps // 4, args.steps // 2, args.steps})
  print(f"demo, {args.steps} steps, {args.devices} device(s); loss at steps {show}")
  for name, ls in got.items():
    line = f"{name:40s} " + "  ".join(f"{ls[s - 1]:.5f}" for s in show)
    if ls is not ref:
      rel = [abs(a - b) / abs(b) for a, b in zip(ls, ref)]
      line += f"   vs float32: mean {sum(rel) / len(rel):.2e}, max {max(rel):.2e}"
    print(line)


if __name__ == "__main__":
  main()
