r"""The cross-device collectives of the compiled train step, with their element types and sizes:
are the weight gradients summed in float32 or bf16 (`model.grad_reduce_dtype`)?

  python benchmarks/grad_collectives.py --target tpu-v5e --model B/14 --fsdp 1,8
  python benchmarks/grad_collectives.py --target cpu --model Nano/14   # 8 CPU devices

--target tpu-v5e compiles for 8 TPU v5e chips on this host (`pip install "libtpu==0.0.42.*"`, no
TPU needed) and reads the compiled HLO: what a TPU would run. XLA:CPU promotes every bf16
all-reduce to f32 late in its pipeline (it has no bf16 reduction), so for --target cpu the
program is read right after SPMD partitioning instead (`xla_dump_hlo_pass_re`), where the
collectives carry the dtypes an accelerator keeps. Only collectives of arrays are listed
(scalars are metrics); an entry is `dtype: count ops, MiB per step`.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
TOPOLOGIES = {"tpu-v5e": "v5e:2x4", "tpu-v4": "v4:2x2x2"}
OPS = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all")
BYTES = {"f32": 4, "bf16": 2, "s32": 4, "pred": 1, "u32": 4, "f16": 2}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--target", default="cpu", choices=["cpu", *TOPOLOGIES])
  p.add_argument("--model", default="B/14", help="ViT variant (Nano/14 for a quick look)")
  p.add_argument("--fsdp", default="1,8", help="comma-separated fsdp sizes")
  p.add_argument("--reduce", default="float32,bfloat16", help="grad_reduce_dtype values")
  p.add_argument("--places", type=int, default=60)
  p.add_argument("--img_per_place", type=int, default=4)
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--json", default="")
  return p.parse_args(argv)


def devices(target: str):
  if target == "cpu":
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
      os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    return jax.devices("cpu")[:8]
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no chip to own: compile only
  from jax.experimental import topologies

  return list(
    topologies.get_topology_desc(topology_name=TOPOLOGIES[target], platform="tpu").devices
  )


def hlo_text(model_cfg, mesh, args) -> str:
  """The train step's HLO: compiled (TPU), or right after SPMD partitioning (CPU)."""
  import jax
  import jax.numpy as jnp
  import ml_collections

  from salad_jax import sharding
  from salad_jax.train import optim, trainer
  from salad_jax.train import state as train_state

  cfg = ml_collections.ConfigDict(
    dict(lr=6e-5, weight_decay=9.5e-9, b1=0.9, b2=0.999, eps=1e-8, lr_start_factor=1.0,
         lr_end_factor=0.2, lr_total_iters=4000, lightning_epoch_step=True, freeze="auto")
  )  # fmt: skip
  tx, schedule = optim.make_optimizer(cfg, steps_per_epoch=1000)
  freeze = optim.default_freeze_regex(model_cfg)
  step = trainer.make_train_step(
    model_cfg, tx, freeze, dict(alpha=1.0, beta=50.0, base=0.0, epsilon=0.1), schedule, mesh
  )
  shapes = train_state.abstract_state(model_cfg, tx, freeze)
  state = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    shapes,
    train_state.state_shardings(shapes, mesh),
  )
  n, data = args.places * args.img_per_place, sharding.data_sharded(mesh)
  batch = {
    "images": jax.ShapeDtypeStruct((n, args.size, args.size, 3), jnp.uint8, sharding=data),
    "labels": jax.ShapeDtypeStruct((n,), jnp.int32, sharding=data),
    "valid": jax.ShapeDtypeStruct((n,), jnp.bool_, sharding=data),
  }
  lowered = step.lower(state, batch)
  if args.target != "cpu":
    return lowered.compile().as_text()
  with tempfile.TemporaryDirectory() as d:
    lowered.compile(
      compiler_options={
        "xla_dump_to": d,
        "xla_dump_hlo_pass_re": "spmd-partitioning",
        "xla_backend_optimization_level": 0,
        "xla_llvm_disable_expensive_passes": True,
      }
    )
    (path,) = glob.glob(f"{d}/*jit_step*after_spmd-partitioning*.txt")
    with open(path) as f:
      return f.read()


def collectives(text: str) -> dict:
  """{op: {dtype: [count, MiB]}} over the collectives of arrays (rank >= 1)."""
  out: dict = collections.defaultdict(lambda: collections.defaultdict(lambda: [0, 0.0]))
  pattern = r"= (\(?[^=]*?) (" + "|".join(OPS) + r")(-start)?\("
  text = re.sub(r"/\*index=\d+\*/", "", text)  # tuple element markers hold an '='
  for m in re.finditer(pattern, text):
    for dtype, shape in re.findall(r"(\w+)\[([\d,]+)\]", m.group(1)):
      size = 1
      for d in shape.split(","):
        size *= int(d)
      row = out[m.group(2)][dtype]
      row[0] += 1
      row[1] += size * BYTES.get(dtype, 4) / 2**20
  return {op: {k: [c, round(mb, 2)] for k, (c, mb) in v.items()} for op, v in out.items()}


def main(argv=None):
  args = parse_args(argv)
  devs = devices(args.target)
  from salad_jax import sharding
  from salad_jax.models.config import ModelConfig

  rows = []
  for fsdp in [int(x) for x in args.fsdp.split(",")]:
    mesh = sharding.make_mesh(devs, fsdp=fsdp)
    for reduce in args.reduce.split(","):
      model_cfg = ModelConfig(
        variant=args.model,
        dtype="bfloat16",
        grad_reduce_dtype=reduce,
        attention="dot_product_attention",
        micro_batch=0,
        train_micro_batch=0,
      )
      t = time.time()
      found = collectives(hlo_text(model_cfg, mesh, args))
      row = dict(target=args.target, model=args.model, fsdp=fsdp, grad_reduce_dtype=reduce)
      row.update(collectives=found, compile_s=round(time.time() - t, 1))
      rows.append(row)
      print(json.dumps(row), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
