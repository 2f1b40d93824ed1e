"""Evaluation cost for a 10k-image database: descriptor extraction and exact kNN search.

Extraction: the real eval path (JPEG decode + PIL resize in the grain pipeline, the jitted
sharded describe) over --images JPEGs of 640x480 at 322x322, ViT-B/14 SALAD; throughput measured
and the 10k figure extrapolated from it. Search: measured on a real 10,000 x 8448 database with
--queries queries, faiss IndexFlatL2 vs the JAX matmul + top_k, which must agree.

  python benchmarks/eval_search.py [--images 48] [--queries 1000]
"""

import argparse
import os
import tempfile
import time

import common  # noqa: F401


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--images", type=int, default=48)
  ap.add_argument("--queries", type=int, default=1000)
  ap.add_argument("--database", type=int, default=10_000)
  ap.add_argument("--variant", default="B/14")
  args = ap.parse_args()

  import jax
  import numpy as np

  import salad_jax
  from salad_jax import sharding
  from salad_jax.data import demo
  from salad_jax.evaluation import descriptors, search

  rng = np.random.default_rng(0)
  model_cfg = salad_jax.ModelConfig(variant=args.variant)
  params = salad_jax.init_params(model_cfg, jax.random.key(0))
  mesh = sharding.make_mesh()
  with tempfile.TemporaryDirectory() as d:
    paths = []
    for i in range(args.images):
      p = os.path.join(d, f"{i:05d}.jpg")
      demo.scene(rng).resize((640, 480)).save(p, quality=90)
      paths.append(p)
    describe = descriptors.make_describe(model_cfg, mesh)
    descriptors.extract(
      params,
      model_cfg,
      paths[:8],
      image_size=(322, 322),
      batch_size=8,
      mesh=mesh,
      describe=describe,
    )  # compile
    t = time.perf_counter()
    descriptors.extract(
      params,
      model_cfg,
      paths,
      image_size=(322, 322),
      batch_size=8,
      mesh=mesh,
      num_workers=1,
      describe=describe,
    )
    dt = time.perf_counter() - t
  ips = args.images / dt
  print(f"machine: {common.machine()}; jax {jax.__version__}")
  print(
    f"extraction, ViT-{args.variant} SALAD at 322x322 incl. JPEG decode + resize: {ips:.2f} img/s "
    f"(measured on {args.images} images) -> {args.database / ips / 60:.0f} min for "
    f"{args.database:,} database images (extrapolated)"
  )

  db = rng.standard_normal((args.database, model_cfg.descriptor_dim)).astype(np.float32)
  db /= np.linalg.norm(db, axis=1, keepdims=True)
  q = db[rng.choice(args.database, args.queries, replace=False)] + 0.05 * rng.standard_normal(
    (args.queries, model_cfg.descriptor_dim)
  ).astype(np.float32)
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  for method in ("faiss", "jax"):
    search.search(db[:100], q[:10], 25, method, mesh)  # warm-up / compile
    t = time.perf_counter()
    _, idx = search.search(db, q, 25, method, mesh)
    dt = time.perf_counter() - t
    if method == "faiss":
      ref = idx
    print(
      f"search {method:5s}: {dt:6.2f} s for {args.queries} queries x {args.database:,} x "
      f"{model_cfg.descriptor_dim} (top-25), {1000 * dt / args.queries:.2f} ms/query"
      + (
        ""
        if method == "faiss"
        else f"; top-1 equal to faiss: {np.mean(idx[:, 0] == ref[:, 0]):.3f}"
      )
    )


if __name__ == "__main__":
  main()
