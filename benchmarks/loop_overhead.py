r"""Host overhead of the training loop per step: the real `train_and_evaluate` with a tiny model.

The model is so small that the jitted step takes about a millisecond (a benchmark-only ViT of
width 32 and depth 2 at 28x28, 2 clusters; one place of 4 images per device, 2 places on one
device), so whatever the loop adds per step shows. Each device count
runs in its own process (XLA_FLAGS); in it, for every `log_every_steps` value, it times:

  step   the jitted train step alone: the same compiled function dispatched back to back on one
         batch already on the devices, one wait at the end (ms/step)
  input  the input pipeline alone: the same grain iterator + `sharding.global_batch` (ms/batch)
  loop   `train_and_evaluate` itself, between its first and last metrics write (steady state:
         compilation, setup and the final checkpoint save excluded) (ms/step)
  over   loop - step - input: what the loop adds per step (target < 2 ms, whatever log_every)

The data is the real pipeline (PlaceRecords, grain, batching) over an in-memory GSV-Cities
source (no file decoding), so the input is cheap and its cost is measured, not guessed.
`--baseline DIR` runs the same measurement with the `salad_jax` package found in DIR (e.g. an
export of main: `git archive main salad_jax | tar -x -C /tmp/main_loop`), in the same run.

  python benchmarks/loop_overhead.py [--devices 1,8] [--log_every 1,10,100] [--steps 600]
                                     [--baseline /tmp/main_loop]

On a 2-core CPU the step and the input pipeline share the cores (on an accelerator they
overlap), and other processes on the machine move every figure: read them as orders of magnitude.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


PICO = dict(width=32, depth=2, heads=2, ffn="mlp")  # a benchmark-only ViT: ~1 ms steps


def tiny_config(log_every: int, steps: int, places: int):
  """The real config (base_config) with a tiny model and cheap, unaugmented 28x28 input."""
  from salad_jax.models import vit
  from salad_jax.train.config import base_config

  vit.VARIANTS.setdefault("Pico/14", PICO)
  c = base_config()
  c.num_epochs = 1
  c.log_every_steps = log_every
  c.model.variant = "Pico/14"
  c.model.num_trainable_blocks = 1
  c.model.num_clusters, c.model.cluster_dim, c.model.token_dim, c.model.hidden_dim = 2, 8, 8, 16
  # whole-batch block calls (the CPU default of one image per call would be ~30x slower here)
  c.model = type(c.model)({**c.model.to_dict(), "micro_batch": 0, "train_micro_batch": 0})
  c.data.places_per_batch = places
  c.data.image_size = (28, 28)
  c.data.randaugment = False
  c.data.num_workers = 0
  c.data.num_threads = 2
  c.eval.sets = ""
  c.checkpoint.every_steps = 10**9  # only the final save, after the timed window
  c.optim.lr_total_iters = steps
  return c


def in_memory_source(num_places: int, k: int = 4, size: int = 28):
  """A GSV-Cities source of num_places x k images held in memory (16 distinct pictures)."""
  import numpy as np
  from PIL import Image

  from salad_jax.data.gsv_cities import GSVCities

  class InMemory(GSVCities):
    def open_image(self, i):
      return self.pictures[i % len(self.pictures)]

  n = num_places * k
  ds = InMemory(
    root="<memory>",
    cities=("Synthetic",),
    paths=np.asarray([f"{i}" for i in range(n)]),
    image_place=np.repeat(np.arange(num_places), k),
    place_ids=np.arange(num_places),
    place_city=np.zeros(num_places, np.int64),
    place_start=np.arange(num_places + 1) * k,
    order=np.arange(n),
    min_img_per_place=k,
  )
  rng = np.random.default_rng(0)
  ds.pictures = [
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(16)
  ]
  return ds


def worker(args) -> dict:
  if args.code:
    sys.path.insert(0, args.code)
  import jax

  if args.cache:  # compile once for all workers and rounds (same programs in both trees)
    jax.config.update("jax_compilation_cache_dir", args.cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

  from salad_jax import sharding
  from salad_jax.data import source as source_lib
  from salad_jax.train import metrics, optim, trainer
  from salad_jax.train import state as train_state

  assert os.path.dirname(os.path.dirname(trainer.__file__)) == os.path.abspath(args.code or REPO)

  places = max(2, jax.device_count())  # one place (4 images) per device
  source = in_memory_source(places * args.steps)  # one epoch of args.steps steps
  source_lib.open_source = lambda config: source  # the real loop, fed from memory

  class TimedWriter(metrics.MetricsWriter):
    stamps: list = []

    def write(self, step, scalars):
      super().write(step, scalars)
      TimedWriter.stamps.append((time.perf_counter(), time.thread_time(), step))

  metrics.MetricsWriter = TimedWriter

  # the step alone and the input alone, built as train_and_evaluate builds them
  config = tiny_config(1, args.steps, places)
  config.num_epochs = 2 * args.repeats  # enough batches for the timings below
  mesh = sharding.make_mesh()
  model_cfg = train_state.model_config(config)
  it, spec = source_lib.make_iterator(config, source, 0, 1)
  tx, schedule = optim.make_optimizer(config.optim, spec.steps_per_epoch)
  freeze = train_state.freeze_regex(config, model_cfg)
  state = train_state.create_state(
    train_state.initial_params(config, model_cfg, jax.random.PRNGKey(0)),
    tx,
    freeze,
    mesh,
    jax.random.PRNGKey(1),
  )
  step_fn = trainer.make_train_step(model_cfg, tx, freeze, dict(config.loss), schedule, mesh)
  local = next(it)
  local.pop("corrupt")
  batch = sharding.global_batch(local, mesh)

  def timed(fn, n):
    """(wall, this thread's CPU) seconds per call of fn, over n calls."""
    t, c = time.perf_counter(), time.thread_time()
    fn(n)
    return (time.perf_counter() - t) / n, (time.thread_time() - c) / n

  def run_steps(n):
    """Back to back, at most 2 steps ahead of the devices (as the loop): unbounded dispatch of
    hundreds of steps deadlocks XLA:CPU's collectives on 8 host devices (rendezvous timeout)."""
    nonlocal state
    flags = []
    for _ in range(n):
      state, m = step_fn(state, batch)
      flags.append(m["finite"])
      if len(flags) > 2:
        jax.block_until_ready(flags.pop(0))
    jax.block_until_ready((state, m))

  def run_input(n):
    for _ in range(n):
      local = next(it)
      local.pop("corrupt")
      b = sharding.global_batch(local, mesh)
    jax.block_until_ready(b)

  run_steps(20)
  chunk = max(args.steps // 3, 20)
  times = {"step": [], "input": [], **{f"loop{le}": [] for le in args.log_every}}
  for _ in range(args.repeats):  # interleaved, best of each kept: the machine is shared
    times["step"].append(timed(run_steps, chunk))
    times["input"].append(timed(run_input, chunk))
    for log_every in args.log_every:
      TimedWriter.stamps = []
      with tempfile.TemporaryDirectory() as workdir:
        r = trainer.train_and_evaluate(tiny_config(log_every, args.steps, places), workdir)
      (t0, c0, s0), (t1, c1, s1) = TimedWriter.stamps[0], TimedWriter.stamps[-1]
      assert r["step"] == s1 == args.steps and s1 > s0, (r["step"], TimedWriter.stamps[:3])
      times[f"loop{log_every}"].append(((t1 - t0) / (s1 - s0), (c1 - c0) / (s1 - s0)))
  # best wall and best CPU figure of each, in ms
  return {k: [1e3 * min(w for w, _ in v), 1e3 * min(c for _, c in v)] for k, v in times.items()}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--devices", default="1,8")
  ap.add_argument("--log_every", default="1,10,100")
  ap.add_argument("--steps", type=int, default=600)
  ap.add_argument("--baseline", default="", help="a directory holding another salad_jax package")
  ap.add_argument("--rounds", type=int, default=2, help="workers per tree, alternating; best kept")
  ap.add_argument(
    "--repeats", type=int, default=3, help="timings per worker, interleaved; best kept"
  )
  ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--code", default="", help=argparse.SUPPRESS)
  ap.add_argument("--cache", default="", help=argparse.SUPPRESS)
  args = ap.parse_args()
  args.log_every = [int(x) for x in str(args.log_every).split(",")]
  if max(args.log_every) * 2 > args.steps:
    ap.error(f"--steps must be at least twice the largest --log_every ({max(args.log_every)})")
  if args.worker:
    print("RESULT " + json.dumps(worker(args)), flush=True)
    return

  import common

  print(
    f"loop overhead: {args.steps} steps at 28x28, ViT width 32 depth 2, a place of 4 images "
    f"per device; best of {args.rounds} rounds x {args.repeats} repeats ({common.machine()})\n"
    "wall: ms per step; over = loop - max(step, input) (the input runs in grain's threads "
    "while the step runs)\ncpu: ms of the loop's own thread per step; over = loop - step - "
    "input (what the loop adds on the host)",
    flush=True,
  )
  codes = [("this tree", "")] + (
    [("baseline", os.path.abspath(args.baseline))] if args.baseline else []
  )
  print(
    f"{'devices':>7} {'code':<10} {'log_every':>9} | {'wall:':<5} {'step':>6} {'input':>6} "
    f"{'loop':>6} {'over':>6} | {'cpu:':<4} {'step':>6} {'input':>6} {'loop':>6} {'over':>6}",
    flush=True,
  )
  with tempfile.TemporaryDirectory() as cache:
    for n in (int(x) for x in args.devices.split(",")):
      runs = {label: [] for label, _ in codes}
      for _ in range(args.rounds):
        for label, code in codes:  # alternating, so slow drifts of the machine hit both alike
          runs[label].append(run_worker(args, n, code, cache, label))
      for label, res in runs.items():
        best = {k: [min(r[k][i] for r in res) for i in (0, 1)] for k in res[0]}
        (sw, sc), (iw, ic) = best["step"], best["input"]
        for le in args.log_every:
          lw, lc = best[f"loop{le}"]
          print(
            f"{n:>7} {label:<10} {le:>9} | {'':<5} {sw:6.2f} {iw:6.2f} {lw:6.2f} "
            f"{lw - max(sw, iw):6.2f} | {'':<4} {sc:6.2f} {ic:6.2f} {lc:6.2f} "
            f"{lc - sc - ic:6.2f}",
            flush=True,
          )


def run_worker(args, n: int, code: str, cache: str, label: str) -> dict:
  cmd = [
    sys.executable,
    os.path.abspath(__file__),
    "--worker",
    f"--steps={args.steps}",
    f"--log_every={','.join(map(str, args.log_every))}",
    f"--code={code}",
    f"--cache={cache}",
    f"--repeats={args.repeats}",
  ]
  env = dict(
    os.environ,
    XLA_FLAGS=f"--xla_force_host_platform_device_count={n}",
    PYTHONPATH=os.pathsep.join([code or REPO, REPO]),
  )
  r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
  line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
  if r.returncode or not line:
    sys.exit(f"worker ({n} devices, {label}) failed:\n{r.stderr[-3000:]}")
  return json.loads(line[0][len("RESULT ") :])


if __name__ == "__main__":
  main()
