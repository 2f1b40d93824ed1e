r"""The persistent compilation cache (`config.compile_cache_dir`): a start's compile time, without
and with the entries a first start wrote.

  python benchmarks/compile_cache.py                       # the demo, 1 step, 2 starts
  python benchmarks/compile_cache.py --devices 8 --starts 3

Each start is a fresh process that trains the demo config for one step (`stop_after_steps=1`,
no evaluation) into its own workdir, all with one cache directory. Reported per start: JAX's
own timings (jax.monitoring: XLA compiles or cache loads, cache reads alone, tracing and
lowering), the programs compiled or loaded and the cache hits among them, the time from the
process start to the end of the first step, and the whole process's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVENTS = {
  "/jax/core/compile/backend_compile_duration": "compile_or_load_s",  # XLA, or a cache read
  "/jax/compilation_cache/cache_retrieval_time_sec": "cache_read_s",
  "/jax/core/compile/jaxpr_trace_duration": "trace_s",
  "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
}
COUNTS = {
  "/jax/compilation_cache/compile_requests_use_cache": "programs",
  "/jax/compilation_cache/cache_hits": "cache_hits",
}


def child(workdir: str, cache: str) -> None:
  t0 = time.perf_counter()
  import jax
  from absl import flags

  flags.FLAGS.mark_as_parsed()
  sys.path.insert(0, REPO)
  from salad_jax.train import trainer

  from configs import demo

  totals = dict.fromkeys([*EVENTS.values(), *COUNTS.values()], 0.0)

  def duration(event, secs, **kw):
    if event in EVENTS:
      totals[EVENTS[event]] += secs

  def count(event, **kw):
    if event in COUNTS:
      totals[COUNTS[event]] += 1

  jax.monitoring.register_event_duration_secs_listener(duration)
  jax.monitoring.register_event_listener(count)
  cfg = demo.get_config()
  cfg.unlock()
  cfg.data.root = os.path.join(REPO, "demo_data/gsv")
  cfg.eval.sets = ""
  cfg.eval.at_start = False
  cfg.stop_after_steps = 1
  cfg.compile_cache_dir = cache
  trainer.train_and_evaluate(cfg, workdir)
  totals["to_first_step_s"] = time.perf_counter() - t0
  print("RESULT " + json.dumps({k: round(v, 2) for k, v in totals.items()}), flush=True)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--devices", type=int, default=1)
  p.add_argument("--starts", type=int, default=2)
  p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    return child(*args.child)
  env = dict(
    os.environ,
    XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices}",
    JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
  )
  with tempfile.TemporaryDirectory() as tmp:
    cache = os.path.join(tmp, "cache")
    for i in range(args.starts):
      t = time.perf_counter()
      r = subprocess.run(
        [sys.executable, __file__, "--child", os.path.join(tmp, f"run{i}"), cache],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
      )
      wall = time.perf_counter() - t
      if r.returncode:
        sys.exit(r.stderr[-3000:])
      result = json.loads(r.stdout.split("RESULT ")[-1])
      result.update(start=i + 1, process_wall_s=round(wall, 2), devices=args.devices)
      print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
