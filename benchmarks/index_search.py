"""Index costs: recall and memory of exact vs IVF-PQ vs PCA-reduced descriptors on the demo, and
search time on a database of 1 M random 8448-d (SALAD-sized) descriptors.

  python benchmarks/index_search.py [--checkpoint runs/demo | --random_weights] [--database 1000000]

Demo: the embedded demo dataset (60 held-out places: 120 database images, 60 queries, UTM
positives within 25 m) described at 112x112 by the demo model, trained here with
`train.py --config configs/demo.py` (~1 min) unless --checkpoint names one (--random_weights: an
untrained model). PCA and the IVF-PQ codebooks are fitted on the demo's training images (other
places), never on the database.

Timing: unit-norm random descriptors; queries are database rows plus noise, so each has one true
nearest neighbour. A flat (exact) index holds 4 x 8448 bytes per image: 1 M is 34 GB, more than
this machine's 24 GiB, so exact search is measured on the largest database that fits in half the
memory available and extrapolated linearly (a flat search reads every vector: its time is linear
in N). IVF-PQ (trained on 20k other random descriptors) is measured at the full size.
faiss's OpenMP threads wait passively (OMP_WAIT_POLICY=PASSIVE unless set): on a shared 2-core
machine their default spinning made k-means 10-100x slower.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before faiss loads libgomp

import argparse
import subprocess
import sys
import tempfile
import time

import common  # noqa: F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D = 8448


def log(*a):
  print(*a, flush=True)


def available_bytes() -> int:
  with open("/proc/meminfo") as f:
    for line in f:
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  raise RuntimeError("no MemAvailable in /proc/meminfo")


# ------------------------------------------------------------------------------ demo
def demo(args, work):
  import numpy as np

  import salad_jax
  from salad_jax.data import demo as demo_data
  from salad_jax.data import eval_sets
  from salad_jax.evaluation import recall
  from salad_jax.index import Index, describe_folder, fit_pca

  base = demo_data.ensure(os.path.join(work, "demo_data", "gsv"))
  if args.random_weights:
    cfg = salad_jax.ModelConfig(
      variant="Nano/14", num_clusters=16, cluster_dim=32, token_dim=32, hidden_dim=128
    )
    import jax

    model = salad_jax.SaladModel(salad_jax.init_params(cfg, jax.random.key(0), 112), cfg)
    which = "random weights (untrained demo model)"
  else:
    ckpt = args.checkpoint
    if not ckpt:
      ckpt = os.path.join(work, "run")
      t = time.perf_counter()
      subprocess.run(
        [
          sys.executable,
          os.path.join(REPO, "train.py"),
          "--config",
          os.path.join(REPO, "configs", "demo.py"),
          "--workdir",
          ckpt,
          f"--config.data.root={base}/gsv",
          f"--config.eval.sets=folder:{base}/eval",
        ],
        check=True,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
      )
      log(f"trained the demo model in {time.perf_counter() - t:.0f} s")
    model = salad_jax.load(ckpt)
    which = f"trained demo model ({ckpt})"
  size = (112, 112)
  db, db_paths = describe_folder(model, f"{base}/eval/database", size, progress=False)
  q, q_paths = describe_folder(model, f"{base}/eval/queries", size, progress=False)
  train, _ = describe_folder(model, f"{base}/gsv/Images", size, progress=False)
  positives = eval_sets.folder_set(f"{base}/eval/database", f"{base}/eval/queries", 25.0).positives
  ks = (1, 5, 10)
  d = db.shape[1]
  log(
    f"\n== demo: {which}; {len(db)} database images, {len(q)} queries, {d}-d descriptors; "
    f"PCA / IVF-PQ fitted on {len(train)} training images =="
  )
  log(f"{'index':<42} {'bytes/image':>11} " + " ".join(f"{'R@' + str(k):>6}" for k in ks))

  def row(name, index, per_image=None):
    idx, _ = index.search_indices(q, max(ks))
    r = recall.recalls(idx, positives, ks, len(db))
    per_image = per_image or index.memory_bytes() / len(index)
    log(f"{name:<42} {per_image:>11.0f} " + " ".join(f"{r[f'R@{k}']:>6.2f}" for k in ks))

  row(f"exact, {d}-d float32", Index(db, db_paths))
  for m, nbits in ((d // 16, None), (d // 8, None)):
    ix = Index(db, db_paths, kind="ivfpq", train_on=train, nlist=4, m=m, nbits=nbits, nprobe=4)
    b = int(np.ceil(m * faiss_nbits(ix) / 8))
    row(f"IVF-PQ {m}x{faiss_nbits(ix)} bits (nlist 4, all probed)", ix, b)
  for dim in (32, 64, 128, 256):
    for whiten in (True, False):
      p = fit_pca(train, dim, whiten)
      row(f"PCA{'-whitened' if whiten else ''} to {dim}-d, exact", Index(db, db_paths, pca=p))
  p = fit_pca(train, 128)
  ix = Index(db, db_paths, kind="ivfpq", pca=p, train_on=train, nlist=4, m=16, nprobe=4)
  row(
    f"PCA-whitened 128-d + IVF-PQ 16x{faiss_nbits(ix)} bits",
    ix,
    int(np.ceil(16 * faiss_nbits(ix) / 8)),
  )


def faiss_nbits(index) -> int:

  return int(index._index.pq.nbits)  # noqa: SLF001 (benchmark)


# ------------------------------------------------------------------------------ 1 M x 8448
def random_unit(rng, n, d=D):
  import numpy as np

  x = rng.standard_normal((n, d), dtype=np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  return x


def chunks(n, size, seed):
  """Database rows [start, stop) in fixed chunks, each from its own seed: any prefix of the
  database is the same whatever the total."""
  import numpy as np

  for start in range(0, n, size):
    stop = min(n, start + size)
    yield start, random_unit(np.random.default_rng([seed, start]), stop - start)


def timed(search, q):
  """(seconds for the whole batch of queries, seconds for one query alone, indices)."""
  search(q[:2])  # warm-up
  t = time.perf_counter()
  idx = search(q)
  batch = time.perf_counter() - t
  t = time.perf_counter()
  for i in range(3):
    search(q[i : i + 1])
  return batch, (time.perf_counter() - t) / 3, idx


def large(args):
  import faiss
  import numpy as np

  from salad_jax.index import Index

  n, nq, k, chunk, seed = args.database, args.queries, 10, 25_000, 0
  avail = available_bytes()
  n_exact = max(chunk, min(n, int(0.5 * avail / (4 * D)) // chunk * chunk))
  rng = np.random.default_rng(1)
  rows = np.sort(rng.choice(n_exact, nq, replace=False))  # in the exact part: both see them
  log(
    f"\n== {n:,} random unit {D}-d descriptors, {nq} queries (database rows + noise), top-{k}; "
    f"{faiss.omp_get_max_threads()} faiss threads; MemAvailable {avail / 2**30:.1f} GiB =="
  )

  # exact: one preallocated array searched with faiss.knn, the routine IndexFlatL2.search runs
  # (an IndexFlatL2 would hold a second copy while it is filled, and grow its buffer by copying)
  t = time.perf_counter()
  xb = np.empty((n_exact, D), np.float32)
  for start, x in chunks(n_exact, chunk, seed):
    xb[start : start + len(x)] = x
  made = time.perf_counter() - t
  q = xb[rows] + (0.5 / np.sqrt(D)) * rng.standard_normal((nq, D), dtype=np.float32)
  q /= np.linalg.norm(q, axis=1, keepdims=True)  # |noise| ~ 0.5: the row is by far the nearest
  batch, single, truth = timed(lambda x: faiss.knn(x, xb, k)[1], q)
  xb = None  # frees the database before the approximate index is built
  log(
    f"exact (faiss flat L2, as evaluation) measured on {n_exact:,} images "
    f"({n_exact * 4 * D / 2**30:.1f} GiB, generated in {made:.0f} s): {1e3 * batch / nq:.1f} "
    f"ms/query in a batch of {nq}, {1e3 * single:.0f} ms for one query alone; true row first: "
    f"{np.mean(truth[:, 0] == rows):.2f}"
  )
  scale = n / n_exact
  if scale > 1:
    log(
      f"exact at {n:,}: NOT MEASURED: {n * 4 * D / 1e9:.1f} GB of float32 does not fit in this "
      f"machine's memory ({avail / 2**30:.1f} GiB available); extrapolated linearly "
      f"x{scale:.1f}: "
      f"~{1e3 * batch / nq * scale:.0f} ms/query batched, ~{1e3 * single * scale:.0f} ms alone"
    )

  if args.skip_ivfpq:
    return
  t = time.perf_counter()
  train = random_unit(np.random.default_rng(7), args.train)
  ivfpq = Index(
    np.zeros((0, D), np.float32),
    [],
    kind="ivfpq",
    train_on=train,
    nlist=args.nlist,
    m=args.m,
    nbits=8,
  )
  del train
  trained = time.perf_counter() - t
  t = time.perf_counter()
  for start, x in chunks(n, chunk, seed):
    ivfpq.add(x, [str(i) for i in range(start, start + len(x))])
  added = time.perf_counter() - t
  mem = ivfpq.memory_bytes()
  ivf = ivfpq._index  # noqa: SLF001 (benchmark): the faiss IndexIVFPQ
  table = ivf.nlist * ivf.pq.M * ivf.pq.ksub * 4 if ivf.use_precomputed_table == 1 else 0
  log(
    f"IVF-PQ nlist={args.nlist}, {args.m} bytes/image (PQ{args.m}x8), trained on {args.train:,} "
    f"in {trained:.0f} s, {n:,} added in {added:.0f} s (incl. generating); index "
    f"{mem / 2**30:.2f} GiB ({mem / n:.0f} B/image) + precomputed table {table / 2**20:.0f} MiB"
  )
  for nprobe in args.nprobe:
    ivfpq.nprobe = nprobe
    batch, single, idx = timed(lambda x: ivfpq.search_indices(x, k)[0], q)
    log(
      f"  nprobe {nprobe:>3}: {1e3 * batch / nq:6.1f} ms/query batched, {1e3 * single:6.1f} ms "
      f"alone; true row first: {np.mean(idx[:, 0] == rows):.2f}, in top-{k}: "
      f"{np.mean([r in row for r, row in zip(rows, idx)]):.2f}"
    )


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--checkpoint", default="", help="a trained demo model (default: train one)")
  ap.add_argument("--random_weights", action="store_true", help="an untrained demo model")
  ap.add_argument("--skip_demo", action="store_true")
  ap.add_argument("--skip_large", action="store_true")
  ap.add_argument("--skip_ivfpq", action="store_true", help="large: exact search only")
  ap.add_argument("--database", type=int, default=1_000_000)
  ap.add_argument("--queries", type=int, default=100)
  ap.add_argument("--train", type=int, default=20_000, help="IVF-PQ training descriptors")
  ap.add_argument("--nlist", type=int, default=256)
  ap.add_argument("--m", type=int, default=64, help="PQ bytes per image (divides 8448)")
  ap.add_argument("--nprobe", type=int, nargs="+", default=[1, 4, 16, 64])
  args = ap.parse_args()
  import faiss
  import jax

  log(
    f"machine: {common.machine()}; jax {jax.__version__}, faiss {faiss.__version__}; "
    f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; load average {os.getloadavg()[0]:.1f}"
  )
  with tempfile.TemporaryDirectory() as work:
    if not args.skip_demo:
      demo(args, work)
  if not args.skip_large:
    large(args)
  log(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
