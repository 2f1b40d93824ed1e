"""describe() throughput, ViT-B/14 SALAD at 322x322, fp32, against the PyTorch reference forward.

Same random weights (converted), same batch, same thread count, same run; rounds alternate
between the frameworks so background load hits both. Prints img/s for each, the ratio, and the
JAX compile time.

  python benchmarks/describe_throughput.py [--batch 8] [--size 322] [--rounds 5] [--variant B/14]
"""

import argparse
import os
import time

import common  # noqa: F401  (puts tests/ on the path)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--variant", default="B/14")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--size", type=int, default=322)
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--threads", type=int, default=os.cpu_count())
  args = ap.parse_args()

  import jax
  import numpy as np
  import torch

  import salad_jax
  from salad_jax.weights import convert, infer

  import torch_reference as tr

  torch.set_num_threads(args.threads)
  tm = tr.randomize_(tr.VPRModel(args.variant), seed=0).eval()
  sd = {k: v.numpy() for k, v in tm.state_dict().items()}
  config, _ = infer.infer_config(sd, dtype=args.dtype)
  model = salad_jax.SaladModel(convert.torch_to_params(sd, config), config)
  model.params = jax.device_put(model.params)

  x = (
    np.random.default_rng(0)
    .standard_normal((args.batch, args.size, args.size, 3))
    .astype(np.float32)
  )
  x = np.clip(x, -2.1, 2.6)  # describe() accepts the value range of ImageNet-normalised images
  xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()

  t0 = time.perf_counter()
  model.describe(x)
  compile_s = time.perf_counter() - t0

  def run_torch(sdpa):
    tr.Attention.use_sdpa = sdpa
    with torch.inference_mode():
      tm(xt)

  results = common.interleaved(
    {
      "jax": lambda: model.describe(x),
      "torch (explicit attention)": lambda: run_torch(False),
      "torch (SDPA)": lambda: run_torch(True),
    },
    args.rounds,
  )

  print(
    f"machine: {common.machine()}; jax {jax.__version__} ({jax.devices()[0].platform}), "
    f"torch {torch.__version__}, threads {args.threads}"
  )
  print(
    f"ViT-{args.variant} SALAD, batch {args.batch} at {args.size}x{args.size}, jax dtype "
    f"{args.dtype}, {args.rounds} rounds, median"
  )
  print(f"jax compile (first call incl. run): {compile_s:.2f} s")
  jax_ips = args.batch / common.median(results["jax"])
  for name, ts in results.items():
    ips = args.batch / common.median(ts)
    ratio = "" if name == "jax" else f"   jax/torch = {jax_ips / ips:.2f}x"
    print(f"  {name:28s} {common.median(ts):7.3f} s/batch  {ips:6.2f} img/s{ratio}")


if __name__ == "__main__":
  main()
