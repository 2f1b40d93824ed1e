"""Matmul throughput of the ViT-B/14 train-step shapes: XLA:CPU (jnp.dot) against PyTorch (MKL).

Matmuls are ~2/3 of a train step (profile in the README), so this bounds what any JAX
formulation of the step can reach against PyTorch on this CPU. Shapes: 32 images x 257 tokens
against the qkv, fc1 and fc2 weights; forward (x W), input gradient (dY W^T) and weight gradient
(X^T dY), each as one matmul over the whole batch.

  python benchmarks/matmul.py [--rounds 5]
"""

import argparse
import os

import common


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--threads", type=int, default=os.cpu_count())
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  torch.set_num_threads(args.threads)
  rows = 32 * 257
  rng = np.random.default_rng(0)
  print(
    f"machine: {common.machine()}; jax {jax.__version__}, torch {torch.__version__}, "
    f"threads {args.threads}; fp32, best of {args.rounds}, GFLOP/s"
  )
  print(f"  {'shape (rows x in -> out)':28s} {'op':6s} {'jax':>6s} {'torch':>6s}  jax/torch")
  for din, dout, name in [(768, 2304, "qkv"), (768, 3072, "fc1"), (3072, 768, "fc2")]:
    x = rng.standard_normal((rows, din), dtype=np.float32)
    w = rng.standard_normal((din, dout), dtype=np.float32) * 0.02
    dy = rng.standard_normal((rows, dout), dtype=np.float32)
    jx, jw, jdy = map(jnp.asarray, (x, w, dy))
    tx, tw, tdy = map(torch.from_numpy, (x, w, dy))
    ops = {
      "fwd": (jax.jit(lambda a, b: a @ b), (jx, jw), lambda: tx @ tw),
      "dx": (jax.jit(lambda a, b: a @ b.T), (jdy, jw), lambda: tdy @ tw.T),
      "dw": (jax.jit(lambda a, b: a.T @ b), (jx, jdy), lambda: tx.T @ tdy),
    }
    gflop = 2 * rows * din * dout / 1e9
    for op, (jf, ja, tf) in ops.items():
      times = common.interleaved(
        {"jax": lambda: jax.block_until_ready(jf(*ja)), "torch": tf}, args.rounds
      )
      tj, tt = min(times["jax"]), min(times["torch"])
      print(
        f"  {f'{name}: {rows} x {din} -> {dout}':28s} {op:6s} {gflop / tj:6.0f} {gflop / tt:6.0f}  {tt / tj:5.2f}"
      )


if __name__ == "__main__":
  main()
