"""Train-step time: ViT-B/14 SALAD, P places x 4 images at 224x224, last 4 blocks trainable.

JAX: the jitted train step of salad_jax.trainer (forward, multi-similarity loss + miner,
backward, AdamW). PyTorch: the same step in eager mode (the torch oracle of tests/, frozen
blocks under no_grad as the reference, pytorch-metric-learning loss + miner, torch AdamW).
Same weights, same batch, same thread count, rounds alternating.

  python benchmarks/train_step.py [--places 8] [--rounds 5] [--variant B/14] [--dtype bfloat16]

--dtype bfloat16 times JAX's bf16-compute step (fp32 params, optimizer state and loss) against
the same fp32 PyTorch steps.
"""

import argparse
import os
import time

import common  # noqa: F401


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--variant", default="B/14")
  ap.add_argument("--places", type=int, default=8)
  ap.add_argument("--size", type=int, default=224)
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--threads", type=int, default=os.cpu_count())
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  args = ap.parse_args()

  import jax
  import ml_collections
  import numpy as np
  import torch
  from pytorch_metric_learning import distances, losses, miners

  from salad_jax import sharding
  from salad_jax.train import optim, trainer
  from salad_jax.train import state as train_state
  from salad_jax.weights import convert, infer

  import torch_reference as tr

  torch.set_num_threads(args.threads)
  k = 4
  n = args.places * k
  tm = tr.randomize_(tr.VPRModel(args.variant), seed=0)
  sd = {key: v.numpy().copy() for key, v in tm.state_dict().items()}
  model_cfg, _ = infer.infer_config(sd)
  model_cfg = model_cfg.replace(dtype=args.dtype)
  params = convert.torch_to_params(sd, model_cfg)

  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, args.size, args.size, 3), dtype=np.uint8)
  labels = np.repeat(np.arange(args.places), k).astype(np.int32)

  # --- JAX
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
  mesh = sharding.make_mesh(jax.devices()[:1])
  state = train_state.create_state(params, tx, freeze, mesh, jax.random.PRNGKey(0))
  step = trainer.make_train_step(
    model_cfg, tx, freeze, dict(alpha=1.0, beta=50.0, base=0.0, epsilon=0.1), schedule, mesh
  )
  batch = sharding.global_batch(
    {"images": images, "labels": labels, "valid": np.ones(n, bool)}, mesh
  )
  t0 = time.perf_counter()
  state, m = step(state, batch)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0

  def jax_step():
    nonlocal state
    state, m = step(state, batch)
    jax.block_until_ready(m)

  # --- PyTorch
  opt = torch.optim.AdamW(tm.parameters(), lr=6e-5, weight_decay=9.5e-9)
  miner = miners.MultiSimilarityMiner(epsilon=0.1, distance=distances.CosineSimilarity())
  loss_fn = losses.MultiSimilarityLoss(
    alpha=1.0, beta=50, base=0.0, distance=distances.DotProductSimilarity()
  )
  mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
  std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
  xt = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  lt = torch.from_numpy(labels).long()
  tm.train()

  def torch_step(sdpa):
    tr.Attention.use_sdpa = sdpa
    x = (xt.float() / 255.0 - mean) / std
    opt.zero_grad()
    d = tm(x)
    loss = loss_fn(d, lt, miner(d, lt))
    loss.backward()
    opt.step()

  times = common.interleaved(
    {
      "jax": jax_step,
      "torch eager (explicit attention)": lambda: torch_step(False),
      "torch eager (SDPA)": lambda: torch_step(True),
    },
    args.rounds,
  )

  print(
    f"machine: {common.machine()}; jax {jax.__version__}, torch {torch.__version__}, "
    f"threads {args.threads}"
  )
  print(
    f"train step, ViT-{args.variant} SALAD, {args.places} places x {k} images at "
    f"{args.size}x{args.size}, last 4 blocks + head trainable, jax {args.dtype} compute, torch fp32, "
    f"{args.rounds} rounds, median"
  )
  print(f"jax compile (first step incl. run): {compile_s:.2f} s")
  jt = common.median(times["jax"])
  for name, ts in times.items():
    t = common.median(ts)
    ratio = "" if name == "jax" else f"   jax time / torch time = {jt / t:.2f}"
    print(f"  {name:34s} {t:7.3f} s/step  {n / t:6.1f} img/s{ratio}")


if __name__ == "__main__":
  main()
