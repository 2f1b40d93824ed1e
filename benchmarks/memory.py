"""Per-device memory and FLOPs of the compiled train step: params, optimizer state, temporaries.

Compiles (never runs) salad_jax.trainer's train step on abstract inputs (jax.ShapeDtypeStruct
with shardings: no parameter is materialised) for ViT-B/14, L/14 and g/14 SALAD at
60 places x 4 images at 224x224 with the accelerator settings (attention=dot_product_attention,
micro_batch=0), on 8 devices: replicated vs fsdp=8, remat none vs blocks, fp32 vs bf16 compute;
reads `compiled.memory_analysis()` and prints a table with what fits on a 16 GiB TPU v5e chip,
a 32 GiB TPU v4 chip and an 80 GiB GPU. "kept for backward" is what the forward pass keeps for
the backward pass (from the jaxpr, exact dtypes and remat, any backend); "temporaries" is XLA's
figure for the whole program on the target. GFLOP per image: *model* (salad_jax.train.flops,
the MFU numerator: forward through every block, backward through the trained part, no remat)
and *HLO* (the compiled program's cost_analysis, the HFU numerator: remat recompute and
elementwise ops included, a while-loop body counted once, so XLA's FSDP collective matmuls on
TPU, which run in loops, make it undercount).

  python benchmarks/memory.py [--models B/14,L/14] [--remat none,blocks,dots] [--json out.json]
  python benchmarks/memory.py --target tpu-v5e   # compile for the 8 chips of a v5e 2x4 (libtpu)
  python benchmarks/memory.py --target tpu-v5e --num_slices 2 --fsdp 8   # 2 slices over DCN

--target cpu (default) compiles for --devices CPU devices (8). XLA:CPU has no bf16 matmul: it
computes them in fp32, so the bf16 temporaries it reports are overstated. --target tpu-v5e /
tpu-v5p / tpu-v4 compiles the same program for every device of a TPU topology on this host
(`pip install "libtpu==0.0.42.*"`, the version jax[tpu] pins; no TPU needed): those are the
buffer sizes a TPU would allocate. --topology names another one (v5e up to 16x16, v5p up to
8x8x8), --num_slices N describes N such slices (the mesh's `data` then spans them over DCN,
fsdp stays inside one: `config.mesh.dcn_data`). The v4 description has one device per
TensorCore (16 for v4:2x2x2, 2 per chip with 16 GiB each), not the megacore chips a v4 VM
shows; jax's topology-aware mesh refuses that, so its mesh is in device id order.
"""

import argparse
import json
import os
import sys
import time

TARGETS = {"cpu": None, "tpu-v5e": "v5e:2x4", "tpu-v5p": "v5p:2x2x2", "tpu-v4": "v4:2x2x2"}
CHIPS = (("v5e 16G", 16), ("v4 32G", 32), ("GPU 80G", 80))
GiB = 2**30
DT = {"float32": "fp32", "bfloat16": "bf16"}


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--models", default="B/14,L/14,g/14")
  ap.add_argument("--fsdp", default="1,8", help="fsdp sizes to compare (1 = replicated)")
  ap.add_argument("--remat", default="none,blocks")
  ap.add_argument("--dtypes", default="float32,bfloat16")
  ap.add_argument("--devices", type=int, default=8, help="CPU devices (--target cpu)")
  ap.add_argument("--target", default="cpu", choices=sorted(TARGETS))
  ap.add_argument("--topology", default="", help="TPU topology, e.g. v5e:4x4 (default: target's)")
  ap.add_argument("--num_slices", type=int, default=1, help="TPU slices of that topology")
  ap.add_argument("--dcn_data", type=int, default=0, help="config.mesh.dcn_data (0: per slice)")
  ap.add_argument("--places", type=int, default=60)
  ap.add_argument("--img_per_place", type=int, default=4)
  ap.add_argument("--size", type=int, default=224)
  ap.add_argument("--trainable_blocks", type=int, default=4)
  ap.add_argument(
    "--no_compile",
    action="store_true",
    help="params, AdamW state and kept-for-backward only (seconds, not minutes)",
  )
  ap.add_argument("--json", default="")
  ap.add_argument("--save_hlo", default="", help="a folder: write each compiled program's HLO")
  return ap.parse_args(argv)


def setup_devices(args):
  """Before jax starts: N CPU devices, or the TPU topology's devices (compile only)."""
  if args.target == "cpu":
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
      os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}"
    import jax

    devices = jax.devices("cpu")
    if len(devices) < args.devices:
      sys.exit(
        f"{len(devices)} CPU devices, {args.devices} wanted: start a fresh process "
        f"(XLA_FLAGS is read when jax starts)"
      )
    return devices[: args.devices]
  try:
    import libtpu  # noqa: F401
  except ImportError:
    sys.exit(
      f"--target {args.target} compiles for a TPU on this host and needs libtpu: "
      'pip install "libtpu==0.0.42.*" (the version jax 0.10.2[tpu] pins)'
    )
  # compile-only: no chip to own, so do not wait on (or take) libtpu's one-process lock
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  import jax
  from jax.experimental import topologies

  kw = dict(num_slices=args.num_slices) if args.num_slices > 1 else {}
  name = args.topology or TARGETS[args.target]
  topo = topologies.get_topology_desc(topology_name=name, platform="tpu", **kw)
  return list(topo.devices)  # every device the topology describes


def train_step_inputs(model_cfg, mesh, tx, freeze, n_images: int, size: int):
  """Abstract (state, batch) with the train step's shardings."""
  import jax
  import jax.numpy as jnp

  from salad_jax import sharding
  from salad_jax.train import state as train_state

  shapes = train_state.abstract_state(model_cfg, tx, freeze)
  shards = train_state.state_shardings(shapes, mesh)
  state = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shards
  )
  data = sharding.data_sharded(mesh)
  batch = {
    "images": jax.ShapeDtypeStruct((n_images, size, size, 3), jnp.uint8, sharding=data),
    "labels": jax.ShapeDtypeStruct((n_images,), jnp.int32, sharding=data),
    "valid": jax.ShapeDtypeStruct((n_images,), jnp.bool_, sharding=data),
  }
  return state, batch


def _optim_cfg():
  import ml_collections

  return ml_collections.ConfigDict(
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


def compile_train_step(model_cfg, mesh, places: int, img_per_place: int, size: int):
  """(compiled train step, abstract state, abstract batch), compiled for `mesh`'s devices."""
  from salad_jax.train import optim, trainer

  tx, schedule = optim.make_optimizer(_optim_cfg(), steps_per_epoch=1000)
  freeze = optim.default_freeze_regex(model_cfg)
  step = trainer.make_train_step(
    model_cfg, tx, freeze, dict(alpha=1.0, beta=50.0, base=0.0, epsilon=0.1), schedule, mesh
  )
  state, batch = train_step_inputs(model_cfg, mesh, tx, freeze, places * img_per_place, size)
  return step.lower(state, batch).compile(), state, batch


def kept_for_backward(model_cfg, n_images: int, size: int) -> int:
  """Bytes of activations the forward pass keeps for the backward pass, for `n_images` (one
  device's share of the batch), read from the jaxpr: exact dtypes, remat included, whatever the
  backend (XLA:CPU's own buffers differ from an accelerator's; this does not)."""
  import contextlib
  import io
  import re

  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.ad_checkpoint import print_saved_residuals

  from salad_jax.train import optim, trainer

  freeze = optim.default_freeze_regex(model_cfg)
  params = jax.eval_shape(
    lambda r: trainer.VPRModel(model_cfg).init(r, jnp.zeros((1, 224, 224, 3)))["params"],
    jax.random.key(0),
  )
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), params)
  train, frozen = optim.split_trainable(zeros, freeze)
  loss_fn = trainer.make_loss_fn(model_cfg, dict(alpha=1.0, beta=50.0, base=0.0, epsilon=0.1))
  images = jnp.zeros((n_images, size, size, 3), jnp.uint8)
  labels, valid = jnp.zeros(n_images, jnp.int32), jnp.ones(n_images, bool)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    print_saved_residuals(
      lambda t: loss_fn(t, frozen, images, labels, valid, jax.random.key(0))[0], train
    )
  total = 0
  for line in out.getvalue().splitlines():
    m = re.match(r"(\w+)\[([\d,]*)\] (.*)", line)
    if m and "from the argument" not in m.group(3):  # weights are counted as params
      n = int(np.prod([int(d) for d in m.group(2).split(",") if d]))
      total += (
        n
        * jnp.dtype(
          {
            "bf16": "bfloat16",
            "f32": "float32",
            "f16": "float16",
            "u32": "uint32",
            "i32": "int32",
            "u8": "uint8",
            "bool": "bool",
          }.get(m.group(1), "float32")
        ).itemsize
      )
  return total


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (its shard of every leaf)."""
  import jax
  import numpy as np

  return int(
    sum(
      np.prod(x.sharding.shard_shape(x.shape), dtype=np.int64) * x.dtype.itemsize
      for x in jax.tree.leaves(tree)
    )
  )


def collectives(hlo: str) -> dict[str, int]:
  """'all-reduce f32 over 8' -> count, for the collectives of a compiled program's HLO text
  (the group size from replica_groups, explicit `{{0,1},{2,3}}` or iota `[2,8]<=[16]`). On a
  multi-slice TPU program the collectives between slices are host transfers to the megascale
  (DCN) runtime: 'DCN all-reduce f32 between slices', one per send."""
  import re

  out: dict[str, int] = {}
  pattern = (
    r"= \(?(\w+)\[[^\]]*\].*? (all-reduce|all-gather|reduce-scatter|all-to-all)(?:-start)?\("
  )
  for line in hlo.splitlines():
    dcn = re.search(r"= \((\w+)\[.*? send\(.*_xla_megascale_transfer_type=\"(\w+)\"", line)
    if dcn:  # a collective between slices: host transfers through the megascale runtime
      key = f"DCN {dcn.group(2).lower().replace('_', '-')} {dcn.group(1)} between slices"
      out[key] = out.get(key, 0) + 1
      continue
    fused = re.search(r"= \(?(\w+)\[.* fusion\(.*kind=kCustom, calls=%all-reduce-scatter", line)
    if fused:  # XLA:TPU's reduce-scatter of gradients fused with their producers
      cores = re.search(r"cores:\{(\d+)\}", line)
      key = f"all-reduce-scatter fusion {fused.group(1)} over {cores.group(1) if cores else '?'}"
      out[key] = out.get(key, 0) + 1
      continue
    m = re.search(pattern, line)
    if not m:
      continue
    size = "?"
    g = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)
    if g:
      size = g.group(2)
    else:
      g = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
      if g:
        size = str(len(g.group(1).split(",")))
    key = f"{m.group(2)} {m.group(1)} over {size}"
    out[key] = out.get(key, 0) + 1
  return dict(sorted(out.items()))


def measure(model_cfg, devices, fsdp: int, args) -> dict:
  import jax
  import numpy as np

  from salad_jax import sharding
  from salad_jax.train import flops

  mesh = sharding.make_mesh(devices, fsdp=fsdp, dcn_data=args.dcn_data)
  n_images = args.places * args.img_per_place
  row = dict(
    model=model_cfg.variant,
    fsdp=fsdp,
    mesh=sharding.describe_mesh(mesh),
    model_flops_per_image=flops.train_step_flops(
      model_cfg, (args.size, args.size), n_images
    ).per_image,
    remat=model_cfg.remat,
    dtype=model_cfg.dtype,
    devices=len(devices),
    kept=kept_for_backward(model_cfg, n_images // len(devices), args.size),
  )
  if args.no_compile:
    from salad_jax.train import optim

    tx, _ = optim.make_optimizer(_optim_cfg(), 1000)
    state, batch = train_step_inputs(
      model_cfg, mesh, tx, optim.default_freeze_regex(model_cfg), n_images, args.size
    )
    row.update(
      param_count=int(sum(np.prod(x.shape) for x in jax.tree.leaves(state["params"]))),
      params=per_device_bytes(state["params"]),
      opt=per_device_bytes(state["opt"]),
      batch=per_device_bytes(batch),
    )
    return row
  t0 = time.perf_counter()
  compiled, state, batch = compile_train_step(
    model_cfg, mesh, args.places, args.img_per_place, args.size
  )
  compile_s = time.perf_counter() - t0
  ma = compiled.memory_analysis()
  row.update(
    param_count=int(sum(np.prod(x.shape) for x in jax.tree.leaves(state["params"]))),
    params=per_device_bytes(state["params"]),
    opt=per_device_bytes(state["opt"]),
    batch=per_device_bytes(batch),
    argument=ma.argument_size_in_bytes,
    output=ma.output_size_in_bytes,
    alias=ma.alias_size_in_bytes,
    temp=ma.temp_size_in_bytes,
    flops_per_image=flops.compiled_flops(compiled) * len(devices) / n_images,
    compile_s=round(compile_s, 1),
  )
  row["total"] = row["argument"] + row["output"] - row["alias"] + row["temp"]
  # sanity: the program's arguments are the state shards and the batch shard (+ scalars; TPUs
  # pad small arrays to their tiles)
  row["args_accounted"] = (
    abs(row["argument"] / (row["params"] + row["opt"] + row["batch"]) - 1) < 0.05
  )
  hlo = compiled.as_text()
  row["collectives"] = collectives(hlo)
  if args.save_hlo:
    os.makedirs(args.save_hlo, exist_ok=True)
    name = f"{model_cfg.variant.replace('/', '')}_fsdp{fsdp}_{model_cfg.remat}_{model_cfg.dtype}"
    with open(os.path.join(args.save_hlo, name + ".hlo.txt"), "w") as f:
      f.write(hlo)
  del compiled, hlo
  jax.clear_caches()
  return row


def table(rows, target: str) -> str:
  head = (
    "| model | layout | remat | compute | params | AdamW state | kept for backward | temporaries | total "
    "| GFLOP/img model / HLO | " + " | ".join(n for n, _ in CHIPS) + " |"
  )
  lines = [head, "|" + "---|" * (10 + len(CHIPS))]
  for r in rows:
    if "error" in r:
      lines.append(
        f"| {r['model']} | fsdp={r['fsdp']} | {r['remat']} | {r['dtype']} | error: "
        f"{r['error'][:80]} |"
      )
      continue
    layout = "replicated" if r["fsdp"] == 1 else f"fsdp={r['fsdp']}"
    if r["devices"] != r["fsdp"] and r["fsdp"] > 1:
      layout += f" (data={r['devices'] // r['fsdp']})"
    if "total" in r:
      fits = " | ".join("yes" if r["total"] <= cap * GiB else "no" for _, cap in CHIPS)
      temp, total = f"{r['temp'] / GiB:.2f}", f"{r['total'] / GiB:.2f}"
      gflop = f"{r['model_flops_per_image'] / 1e9:.1f} / {r['flops_per_image'] / 1e9:.1f}"
    else:  # --no_compile: params + state + kept is a lower bound of the total
      low = r["params"] + r["opt"] + r["kept"]
      fits = " | ".join("no" if low > cap * GiB else "?" for _, cap in CHIPS)
      temp, total = "-", f">= {low / GiB:.2f}"
      gflop = f"{r['model_flops_per_image'] / 1e9:.1f} / -"
    lines.append(
      f"| {r['model']} | {layout} | {r['remat']} | {DT.get(r['dtype'], r['dtype'])} | "
      f"{r['params'] / GiB:.2f} | {r['opt'] / GiB:.2f} | {r['kept'] / GiB:.2f} | {temp} | "
      f"{total} | {gflop} | {fits} |"
    )
  return "\n".join(lines)


def main(argv=None):
  args = parse_args(argv)
  devices = setup_devices(args)
  import jax

  from salad_jax.models.config import ModelConfig

  print(
    f"target {args.target} {args.topology or TARGETS[args.target] or ''}"
    f"{f' x {args.num_slices} slices' if args.num_slices > 1 else ''}: {len(devices)} x "
    f"{devices[0].device_kind}; jax {jax.__version__}; "
    f"{args.places} places x {args.img_per_place} images at {args.size}x{args.size} "
    f"({args.places * args.img_per_place / len(devices):g} per device), "
    f"last {args.trainable_blocks} blocks + head trained, attention=dot_product_attention, "
    "micro_batch=0; GiB per device",
    flush=True,
  )
  rows, meshes = [], set()
  for model in args.models.split(","):
    for fsdp in (int(f) for f in args.fsdp.split(",")):
      for remat in args.remat.split(","):
        for dtype in args.dtypes.split(","):
          model_cfg = ModelConfig(
            variant=model,
            dtype=dtype,
            remat=remat,
            attention="dot_product_attention",
            micro_batch=0,
            train_micro_batch=0,
            num_trainable_blocks=args.trainable_blocks,
          )
          try:
            r = measure(model_cfg, devices, fsdp, args)
          except Exception as e:  # one failing row must not lose the others
            r = dict(
              model=model, fsdp=fsdp, remat=remat, dtype=dtype, error=f"{type(e).__name__}: {e}"
            )
          rows.append(r)
          if "error" in r:
            print(f"  {model} fsdp={fsdp} remat={remat} {dtype}: {r['error'][:300]}", flush=True)
            continue
          check = "" if r.get("args_accounted", True) else "  (arguments != params + opt + batch!)"
          if r["mesh"] not in meshes:
            meshes.add(r["mesh"])
            print(f"  mesh {r['mesh']}", flush=True)
          compiled = (
            f" temp {r['temp'] / GiB:.2f} total {r['total'] / GiB:.2f} GiB; GFLOP/img model "
            f"{r['model_flops_per_image'] / 1e9:.1f}, HLO {r['flops_per_image'] / 1e9:.1f}; "
            f"compiled in {r['compile_s']} s"
            if "total" in r
            else " GiB (not compiled)"
          )
          if r.get("collectives"):
            print(f"    collectives: {r['collectives']}", flush=True)
          print(
            f"  {model} fsdp={fsdp} remat={remat:6s} {dtype:8s}: params {r['params'] / GiB:.3f} "
            f"({r['param_count']:,} x 4 B / {r['params'] and round(r['param_count'] * 4 / r['params'], 2)}) "
            f"opt {r['opt'] / GiB:.3f} kept {r['kept'] / GiB:.2f}{compiled}{check}",
            flush=True,
          )
  print()
  print(table(rows, args.target))
  if args.target == "cpu" and "bfloat16" in args.dtypes:
    print(
      "\nnote: XLA:CPU computes bf16 matmuls in fp32, so the bf16 temporaries above are "
      "overstated; --target tpu-v5e compiles for a TPU and shows the true bf16 figure."
    )
  print(
    "fits: total (arguments + outputs not donated + temporaries) <= the chip's memory; on a GPU "
    "set XLA_PYTHON_CLIENT_MEM_FRACTION=.95 (JAX takes 75 % by default)."
  )
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"target": args.target, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main()
