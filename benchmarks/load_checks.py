"""What the checks of issue 12 cost: loading a converted dir, describe(), a checkpoint's checksum.

- load: Orbax restore alone (what `load` did before) vs `load_converted` (restore + params
  checksum + tensor checks + shape check), with the checksum and tensor checks timed alone;
- describe: the model call with the old separate NaN check (one device round trip before the
  call) vs describe() (min, max and finiteness fused into the jitted call);
- checksum: `params_checksum` of the params on the host and replicated on the devices (what
  TrainCheckpointer.save computes, per save).
Random weights; rounds alternate between the runs.

  python benchmarks/load_checks.py [--variant B/14] [--batch 8] [--size 224] [--rounds 5]
"""

import argparse
import os
import shutil
import tempfile

import common


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--variant", default="B/14")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--size", type=int, default=224)
  ap.add_argument("--rounds", type=int, default=5)
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np

  import salad_jax
  from salad_jax import sharding
  from salad_jax.weights import checksum, converted, orbax_reads, torch_files

  model_cfg = salad_jax.ModelConfig(variant=args.variant)
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(lambda: salad_jax.init_params(model_cfg, jax.random.key(0)))
  params = jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
  tmp = tempfile.mkdtemp()
  try:
    d = os.path.join(tmp, "converted")
    converted.save_converted(d, params, model_cfg)
    restored = orbax_reads.restore_params(os.path.join(d, "params"))
    converted.load_converted(d)  # traces the model's shapes once (cached per config)
    load = common.interleaved(
      {
        "restore only (before)": lambda: orbax_reads.restore_params(os.path.join(d, "params")),
        "load_converted (now)": lambda: converted.load_converted(d),
        "  params checksum alone": lambda: checksum.params_checksum(restored),
        "  tensor checks alone": lambda: torch_files.check_params(restored, "x"),
      },
      args.rounds,
    )
  finally:
    shutil.rmtree(tmp)

  model = salad_jax.SaladModel(params, model_cfg)
  plain = jax.jit(lambda p, x: model.module.apply({"params": p}, x))

  def before(images):
    x = jnp.asarray(images, jnp.float32)
    if not bool(jnp.isfinite(x).all()):
      raise ValueError("images contain NaN or Inf values")
    return np.asarray(plain(model.params, x))

  x = np.clip(rng.standard_normal((args.batch, args.size, args.size, 3)), -2.1, 2.6).astype(
    np.float32
  )
  np.testing.assert_array_equal(before(x), model.describe(x))
  describe = common.interleaved(
    {
      "describe, separate NaN check (before)": lambda: before(x),
      "describe, fused checks (now)": lambda: model.describe(x),
    },
    args.rounds,
  )

  on_devices = sharding.put_replicated(params, sharding.make_mesh())
  checksum._sums_device(on_devices)  # compile once
  checksums = common.interleaved(
    {
      "checksum on the host": lambda: checksum.params_checksum(params),
      "checksum of device params (fetched)": lambda: checksum.params_checksum(on_devices),
      f"checksum on {jax.device_count()} device(s)": lambda: checksum._sums_device(on_devices),
    },
    args.rounds,
  )

  print(
    f"machine: {common.machine()}; jax {jax.__version__} ({jax.devices()[0].platform}); "
    f"ViT-{args.variant} SALAD, {sum(v.size for v in jax.tree.leaves(params)):,} params; "
    f"median of {args.rounds} rounds"
  )
  for times in (load, describe, checksums):
    for name, ts in times.items():
      print(f"  {name:42s} {common.median(ts) * 1000:9.1f} ms")
  b, n = (
    common.median(describe["describe, separate NaN check (before)"]),
    common.median(describe["describe, fused checks (now)"]),
  )
  print(f"  describe now / before: {n / b:.3f} (batch {args.batch} at {args.size}x{args.size})")


if __name__ == "__main__":
  main()
