"""One accelerator benchmark: describe img/s, the train step on every local device (s/step,
img/s, MFU and HFU, memory), the input pipeline's img/s from the pre-resized pack with all host
cores, and whether the step waits for input.

  python benchmarks/accelerator.py [--json accelerator.json] [--peak_tflops 989]
  python benchmarks/accelerator.py --smoke        # tiny sizes, bf16 only, any machine (tested)

Full run (one host, aimed at < 5 minutes): ViT-B/14 SALAD with random weights, on a data-parallel
mesh over all local devices (the batch sharded, so the gradient all-reduce runs; fsdp=1);
describe at 322x322 (fp32 and bf16, global batch 64 and 256); the train step at 60 places x 4
images at 224x224 (bf16, fp32) with the accelerator settings (attention auto: cuDNN flash
attention for bf16 on GPUs, XLA otherwise; whole-batch blocks). MFU = model FLOPs
(salad_jax.train.flops: forward through every block, backward through the trained part; remat
not counted) / time / the devices' peak (a table by device kind, or --peak_tflops). HFU, beside
it, uses the compiled step's cost_analysis(): it counts remat recompute and elementwise ops,
and each while-loop body once (XLA's FSDP collective matmuls on TPU run in loops: it undercounts
there; cuDNN attention custom calls may not be counted at all). The input pipeline: a generated
GSV-Cities tree (640x480 JPEGs) packed at 224x224 with `python -m salad_jax.data.tfds_gsv` (the
pack the README recommends for accelerators), read through grain with RandAugment and one
worker per host core. Every section catches its own errors, prints them and goes on; --budget_s
skips what would start after the time budget. Prints one summary block and saves JSON.
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import common  # noqa: F401  (puts tests/ on the path: helpers.make_gsv)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DT = {"float32": "fp32", "bfloat16": "bf16"}
DEFAULT_DTYPES = "bfloat16,float32"


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--smoke", action="store_true", help="tiny sizes (Nano/14), 1-2 timed steps")
  ap.add_argument("--variant", default="B/14")
  ap.add_argument("--dtypes", default=DEFAULT_DTYPES)
  ap.add_argument("--describe_batches", default="64,256")
  ap.add_argument("--describe_size", type=int, default=322)
  ap.add_argument("--places", type=int, default=60)
  ap.add_argument("--img_per_place", type=int, default=4)
  ap.add_argument("--train_size", type=int, default=224)
  ap.add_argument("--steps", type=int, default=10, help="timed train steps (after 2 warm-up)")
  ap.add_argument("--describe_iters", type=int, default=10)
  ap.add_argument("--pipeline_places", type=int, default=128)
  ap.add_argument("--workers", type=int, default=os.cpu_count(), help="grain workers (host cores)")
  ap.add_argument(
    "--peak_tflops",
    type=float,
    default=0.0,
    help="bf16 dense peak TFLOP/s of one device; default: by device kind",
  )
  ap.add_argument("--budget_s", type=float, default=290.0, help="no section starts after this")
  ap.add_argument("--section_s", type=float, default=150.0, help="time limit of one section")
  ap.add_argument("--json", default="accelerator.json")
  args = ap.parse_args(argv)
  if args.smoke:
    args.variant, args.describe_batches, args.describe_size = "Nano/14", "2", 70
    args.places, args.train_size, args.steps, args.describe_iters = 4, 56, 2, 2
    args.pipeline_places, args.workers = 8, 0
    args.dtypes = "bfloat16" if args.dtypes == DEFAULT_DTYPES else args.dtypes
  return args


def peak_tflops(kind: str, dtype: str, override: float, memory_bytes: int | None = None) -> float:
  """Dense peak TFLOP/s of one device (salad_jax.train.flops.PEAKS, its sources cited there)."""
  from salad_jax.train import flops

  return flops.peak_tflops(kind, dtype, override, memory_bytes)


def fit_batch(n: int, devices: int) -> int:
  """`n` rounded up to a multiple of the device count (each device an equal share)."""
  return -(-n // devices) * devices


def model_config(args, dtype, attention="auto"):
  from salad_jax.models.config import ModelConfig

  head = dict(num_clusters=8, cluster_dim=16, token_dim=16, hidden_dim=32) if args.smoke else {}
  return ModelConfig(
    variant=args.variant,
    dtype=dtype,
    attention=attention,
    micro_batch=0,
    train_micro_batch=0,
    **head,
  )


def with_xla_fallback(fn):
  """fn(attention) with 'auto'; if that fails where auto means cuDNN, once more with XLA."""

  def run():
    try:
      return fn("auto")
    except Exception as e:
      if not getattr(fn, "cudnn", False):
        raise
      print(
        f"[retry] cuDNN attention failed ({type(e).__name__}: {str(e)[:300]}); with XLA attention",
        flush=True,
      )
      r = fn("xla")
      r["attention"] = f"xla (cudnn failed: {type(e).__name__})"
      return r

  return run


def random_params(model_cfg):
  """Host params of `model_cfg`'s shapes, normal(0.02) (norm scales 1): no init to compile."""
  import numpy as np

  from salad_jax.train import optim
  from salad_jax.weights import convert

  rng = np.random.default_rng(0)
  flat = {
    "/".join(p): (
      np.ones(s, np.float32)
      if p[-1] in ("scale", "gamma", "dust_bin")
      else (0.02 * rng.standard_normal(s, np.float32))
    )
    for p, s in convert.param_shapes(model_cfg).items()
  }
  return optim.unflatten(flat)


def timed(fn, iters: int) -> float:
  """Median seconds of `iters` calls of fn (which blocks until its result is ready)."""
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def bench_describe(args, mesh, dtype, batch, kind, memory=None, attention="auto"):
  import jax
  import numpy as np

  from salad_jax import sharding
  from salad_jax.evaluation import descriptors
  from salad_jax.models import attention as attention_lib
  from salad_jax.train import flops

  model_cfg = model_config(args, dtype, attention)
  params = sharding.put_replicated(random_params(model_cfg), mesh)
  batch = fit_batch(batch, mesh.devices.size)  # split over every device
  images = np.random.default_rng(0).integers(
    0, 256, (batch, args.describe_size, args.describe_size, 3), dtype=np.uint8
  )
  x = sharding.global_batch({"images": images}, mesh)["images"]
  t = time.perf_counter()
  fn = descriptors.make_describe(model_cfg, mesh).lower(params, x).compile()
  compile_s = time.perf_counter() - t
  jax.block_until_ready(fn(params, x))
  s = timed(lambda: jax.block_until_ready(fn(params, x)), args.describe_iters)
  size = (args.describe_size, args.describe_size)
  gflop = flops.describe_flops(model_cfg, size, batch) / 1e9
  peak = peak_tflops(kind, dtype, args.peak_tflops, memory)
  return dict(
    dtype=dtype,
    batch=batch,
    size=args.describe_size,
    img_s=batch / s,
    s_batch=s,
    gflop_per_image=gflop,
    mfu=gflop * 1e9 * batch / s / (peak * 1e12 * mesh.devices.size) if peak else None,
    compile_s=compile_s,
    attention=attention_lib.attention_impl(attention, getattr(jax.numpy, dtype), 64),
  )


def bench_train(args, mesh, dtype, kind, memory=None, attention="auto"):
  import jax
  import ml_collections
  import numpy as np

  from salad_jax import sharding
  from salad_jax.models import attention as attention_lib
  from salad_jax.train import flops, optim, trainer
  from salad_jax.train import state as train_state

  model_cfg = model_config(args, dtype, attention)
  cfg = ml_collections.ConfigDict(
    dict(
      lr=6e-5,
      weight_decay=9.5e-9,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      lr_start_factor=1.0,
      lr_end_factor=0.2,
      lr_total_iters=4000,
      lightning_epoch_step=True,
      freeze="auto",
    )
  )
  tx, schedule = optim.make_optimizer(cfg, steps_per_epoch=1000)
  freeze = optim.default_freeze_regex(model_cfg)
  state = train_state.create_state(
    random_params(model_cfg), tx, freeze, mesh, jax.random.PRNGKey(0)
  )
  step = trainer.make_train_step(
    model_cfg, tx, freeze, dict(alpha=1.0, beta=50.0, base=0.0, epsilon=0.1), schedule, mesh
  )
  devices = mesh.devices.size
  places = args.places  # the paper's 60 x 4 = 240 images; more places if they do not split
  while places * args.img_per_place % devices:
    places += 1
  n = places * args.img_per_place
  rng = np.random.default_rng(0)
  base = rng.integers(0, 256, (places, 1, args.train_size, args.train_size, 3))
  noise = rng.integers(-30, 30, (places, args.img_per_place, args.train_size, args.train_size, 3))
  images = (
    np.clip(base + noise, 0, 255).astype(np.uint8).reshape(n, args.train_size, args.train_size, 3)
  )
  batch = sharding.global_batch(
    {
      "images": images,
      "labels": np.repeat(np.arange(places), args.img_per_place).astype(np.int32),
      "valid": np.ones(n, bool),
    },
    mesh,
  )
  t = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t
  hlo_flops = flops.compiled_flops(compiled) * devices  # per device -> whole step
  model_flops = flops.train_step_flops(model_cfg, (args.train_size,) * 2, n).per_step
  mem = compiled.memory_analysis()
  box = {"state": state}

  def one():
    box["state"], m = compiled(box["state"], batch)
    jax.block_until_ready(m["loss"])
    return m

  for _ in range(2):
    m = one()
  s = timed(one, args.steps)
  peak = peak_tflops(kind, dtype, args.peak_tflops, memory)
  scale = peak * 1e12 * devices * s
  return dict(
    dtype=dtype,
    images=n,
    places=places,
    devices=devices,
    size=args.train_size,
    s_step=s,
    img_s=n / s,
    gflop_per_image=model_flops / n / 1e9,  # model FLOPs (the MFU numerator)
    hlo_gflop_per_image=hlo_flops / n / 1e9,  # cost_analysis (the HFU numerator)
    peak_tflops=peak,
    mfu=model_flops / scale if peak else None,
    hfu=hlo_flops / scale if peak and hlo_flops else None,
    compile_s=compile_s,
    loss=float(m["loss"]),
    finite=bool(m["finite"]),
    temp_gib=mem.temp_size_in_bytes / 2**30 if mem else None,
    args_gib=mem.argument_size_in_bytes / 2**30 if mem else None,
    attention=attention_lib.attention_impl(attention, getattr(jax.numpy, dtype), 64),
  )


def bench_pipeline(args):
  """img/s of the grain pipeline from the pre-resized pack (RandAugment on, one worker per host
  core): a generated GSV-Cities tree of 640x480 JPEGs, packed at 224x224 by the documented
  command, read as `configs/gsv.py:packed` reads it (one thread per worker)."""
  import numpy as np
  import pipeline_throughput
  from absl import flags

  from salad_jax.data import pipeline, tfds_gsv

  flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
  ppb = 4 if args.smoke else 16
  with tempfile.TemporaryDirectory() as tmp:
    root, data_dir = os.path.join(tmp, "gsv"), os.path.join(tmp, "tfds")
    t = time.perf_counter()
    pipeline_throughput.write_dataset(root, args.pipeline_places, np.random.default_rng(0))
    write_s = time.perf_counter() - t
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "salad_jax.data.tfds_gsv", "--manual_dir", root]
    cmd += ["--data_dir", data_dir, "--image_size", "224,224"]
    cmd += ["--num_workers", str(max(1, args.workers))]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if r.returncode:
      raise RuntimeError(f"packing failed ({r.returncode}): {r.stderr[-1500:]}")
    pack_s = time.perf_counter() - t
    ds = tfds_gsv.open_gsv_cities(data_dir, image_size=(224, 224))
    it, _ = pipeline.train_dataset(
      ds,
      places_per_batch=ppb,
      img_per_place=4,
      image_size=(224, 224),
      num_epochs=1000,
      seed=0,
      num_workers=args.workers,
      num_threads=1 if args.workers else 4,
    )
    it = iter(it)
    warm = max(2, args.workers)
    for _ in range(warm):  # worker start-up
      next(it)
    batches = 2 if args.smoke else 3 * max(1, args.workers)
    t = time.perf_counter()
    for _ in range(batches):
      next(it)
    dt = time.perf_counter() - t
    del it
  return dict(
    source="pack",
    workers=args.workers,
    img_s=batches * ppb * 4 / dt,
    images=batches * ppb * 4,
    jpeg="640x480",
    out=224,
    write_s=write_s,
    pack_s=pack_s,
  )


class SectionTimeout(Exception):
  pass


def _alarm(signum, frame):
  raise SectionTimeout("section ran past its time limit (--section_s)")


def section(name, fn, results, errors, t_end, limit_s):
  if time.perf_counter() > t_end:
    errors.append(f"{name}: skipped (time budget)")
    print(f"[skip] {name}: time budget spent", flush=True)
    return None
  t = time.perf_counter()
  signal.signal(signal.SIGALRM, _alarm)
  signal.alarm(
    int(limit_s)
  )  # a hung section (a stuck worker, a slow compile) does not hang the run
  try:
    r = fn()
  except Exception as e:  # report and go on: one failing section must not lose the others
    errors.append(f"{name}: {type(e).__name__}: {str(e)[:500]}")
    print(f"[error] {name}: {type(e).__name__}: {e}", flush=True)
    traceback.print_exc(limit=3)
    return None
  finally:
    signal.alarm(0)
  r["section_s"] = round(time.perf_counter() - t, 1)
  results.append({"section": name, **r})
  print(
    f"[done] {name} ({r['section_s']} s): "
    + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()),
    flush=True,
  )
  return r


HFU_NOTE = (
  "HFU from the compiled step's cost_analysis: it counts remat recompute and elementwise ops, "
  "each while-loop body once (FSDP collective matmuls on TPU: undercounts), maybe not cuDNN "
  "attention calls"
)


def summary(info, results, errors) -> str:
  lines = [
    f"accelerator benchmark: {info['devices']} x {info['kind']} ({info['platform']}), "
    f"jax {info['jax']}, {info['host_cores']} host cores, ViT-{info['variant']} SALAD, "
    f"mesh {info['mesh']}"
  ]
  for r in (r for r in results if r["section"].startswith("describe")):
    mfu = f", MFU {100 * r['mfu']:.1f} %" if r.get("mfu") else ""
    lines.append(
      f"  describe {r['size']}x{r['size']} {DT[r['dtype']]} batch {r['batch']:4d}: "
      f"{r['img_s']:8.1f} img/s  ({r['attention']} attention; {r['gflop_per_image']:.3g} "
      f"GFLOP/img{mfu})"
    )
  for r in (r for r in results if r["section"].startswith("train")):
    if r["mfu"]:
      util = (
        f"MFU {100 * r['mfu']:.1f} % (model {r['gflop_per_image']:.3g} GFLOP/img), HFU "
        + (f"{100 * r['hfu']:.1f} %" if r.get("hfu") else "n/a")
        + f" (HLO {r['hlo_gflop_per_image']:.3g} GFLOP/img) of {r['peak_tflops']:.0f} TFLOP/s "
        f"x {r['devices']}"
      )
    else:
      util = (
        f"model {r['gflop_per_image']:.3g} / HLO {r['hlo_gflop_per_image']:.3g} GFLOP/img, "
        "MFU n/a (unknown peak: --peak_tflops)"
      )
    mem = f", temporaries {r['temp_gib']:.1f} GiB" if r.get("temp_gib") is not None else ""
    lines.append(
      f"  train step {r['images']} x {r['size']}x{r['size']} {DT[r['dtype']]} over "
      f"{r['devices']} device(s): {r['s_step'] * 1000:7.1f} ms/step {r['img_s']:8.1f} img/s  "
      f"{util}{mem}"
    )
  if any(r["section"].startswith("train") for r in results):
    lines.append(f"    ({HFU_NOTE})")
  pipe = next((r for r in results if r["section"] == "pipeline"), None)
  if pipe:
    lines.append(
      f"  input pipeline ({pipe['workers']} workers, the 224x224 pack + RandAugment): "
      f"{pipe['img_s']:.1f} img/s"
    )
  steps = [r for r in results if r["section"].startswith("train")]
  if pipe and steps:
    fastest = max(steps, key=lambda r: r["img_s"])
    bound = pipe["img_s"] < fastest["img_s"]
    lines.append(
      f"  input-bound: {'YES, the step waits for input' if bound else 'no'} (pipeline "
      f"{pipe['img_s']:.0f} img/s {'<' if bound else '>='} {DT[fastest['dtype']]} step "
      f"{fastest['img_s']:.0f} img/s"
      + (
        f"; needs {fastest['img_s'] / pipe['img_s']:.1f}x the host's input throughput)"
        if bound
        else ")"
      )
    )
  for e in errors:
    lines.append(f"  error: {e}")
  return "\n".join(lines)


def main(argv=None):
  args = parse_args(argv)
  t_end = time.perf_counter() + args.budget_s
  import jax

  from salad_jax import sharding
  from salad_jax.train import flops

  devices = jax.local_devices()  # every device of this host: the batch split over all of them
  mesh = sharding.make_mesh(devices)
  memory = flops.device_memory_bytes(devices[0])
  info = dict(
    platform=devices[0].platform,
    kind=devices[0].device_kind,
    devices=len(devices),
    mesh=sharding.describe_mesh(mesh),
    jax=jax.__version__,
    host_cores=os.cpu_count(),
    variant=args.variant,
    smoke=args.smoke,
  )
  print(
    f"{info['kind']} ({info['platform']}); jax {info['jax']}; {info['host_cores']} host cores",
    flush=True,
  )
  results, errors = [], []

  def run(name, fn):
    section(name, fn, results, errors, t_end, args.section_s)
    if args.json:  # after every section: a run cut short keeps what it measured
      with open(args.json, "w") as f:
        json.dump({"info": info, "results": results, "errors": errors}, f, indent=1)

  dtypes = args.dtypes.split(",")

  def fallback(fn, dtype):
    from salad_jax.models import attention as attention_lib

    fn.cudnn = attention_lib.attention_impl("auto", getattr(jax.numpy, dtype), 64) == "cudnn"
    return with_xla_fallback(fn)

  for dtype in dtypes:
    for b in (int(x) for x in args.describe_batches.split(",")):
      run(
        f"describe {DT[dtype]} b{b}",
        fallback(lambda a: bench_describe(args, mesh, dtype, b, info["kind"], memory, a), dtype),
      )
  for dtype in dtypes:
    run(
      f"train {DT[dtype]}",
      fallback(lambda a: bench_train(args, mesh, dtype, info["kind"], memory, a), dtype),
    )
  run("pipeline", lambda: bench_pipeline(args))
  text = summary(info, results, errors)
  print("\n" + text)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"info": info, "results": results, "errors": errors, "summary": text}, f, indent=1)
    print(f"saved {args.json}")
  return 0 if results else 1


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  sys.exit(main())
