"""Training input pipeline throughput: 640x480 JPEGs -> 224x224 -> RandAugment -> place batches.

Writes a synthetic GSV-Cities tree of JPEGs (textured scenes, quality 90), then reads it with
salad_jax.data.pipeline.train_dataset (grain) with 1 and 2 worker processes, and times the
per-image stages (decode, resize, RandAugment) in one process to give their shares.

  python benchmarks/pipeline_throughput.py [--places 64] [--batches 12]
"""

import argparse
import os
import tempfile
import time

import common  # noqa: F401


def write_dataset(root, places, rng):
  import numpy as np
  from PIL import Image, ImageFilter

  from salad_jax.data import demo
  from helpers import make_gsv
  make_gsv(root, {"Bench": [4] * places}, size=(8, 8))  # CSVs + names; images replaced below
  img_dir = os.path.join(root, "Images", "Bench")
  for name in sorted(os.listdir(img_dir)):
    scene = demo.scene(rng).resize((640, 480), Image.BILINEAR)
    noise = rng.integers(-25, 25, (480, 640, 3))  # camera-like texture so JPEG sizes are realistic
    arr = np.clip(np.asarray(scene, np.int16) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(arr).filter(ImageFilter.SMOOTH).save(os.path.join(img_dir, name), quality=90)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--places", type=int, default=64)
  ap.add_argument("--places_per_batch", type=int, default=16)
  ap.add_argument("--batches", type=int, default=12)
  args = ap.parse_args()

  import numpy as np
  from absl import flags
  from PIL import Image

  from salad_jax.data import augment, gsv_cities, pipeline
  flags.FLAGS.mark_as_parsed()

  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory() as root:
    write_dataset(root, args.places, rng)
    ds = gsv_cities.read_gsv_cities(root, ("Bench",))
    paths = [ds.image_path(i) for i in range(len(ds.paths))]
    size_kb = np.mean([os.path.getsize(p) for p in paths]) / 1024

    # per-stage costs, one process
    t_dec = t_res = t_aug = 0.0
    n = min(len(paths), 128)
    for i, p in enumerate(paths[:n]):
      t = time.perf_counter()
      with Image.open(p) as im:
        im = im.convert("RGB")
      t_dec += time.perf_counter() - t
      t = time.perf_counter()
      im = im.resize((224, 224), Image.BILINEAR)
      t_res += time.perf_counter() - t
      t = time.perf_counter()
      augment.rand_augment(im, np.random.default_rng(i))
      t_aug += time.perf_counter() - t
    total = t_dec + t_res + t_aug

    print(f"machine: {common.machine()}")
    print(f"{len(paths)} JPEGs 640x480 (mean {size_kb:.0f} KiB) -> 224x224 + RandAugment(3, 9)")
    print(f"per image, one process: {1000 * total / n:.2f} ms = decode {100 * t_dec / total:.0f}% "
          f"+ resize {100 * t_res / total:.0f}% + RandAugment {100 * t_aug / total:.0f}% "
          f"({n / total:.0f} img/s single-threaded)")
    for workers in (1, 2):
      it, spec = pipeline.train_dataset(ds, places_per_batch=args.places_per_batch, img_per_place=4,
                                        image_size=(224, 224), num_epochs=100, seed=0,
                                        num_workers=workers, num_threads=1)
      it = iter(it)
      next(it)  # worker start-up
      next(it)
      t = time.perf_counter()
      for _ in range(args.batches):
        next(it)
      dt = time.perf_counter() - t
      imgs = args.batches * args.places_per_batch * 4
      print(f"grain pipeline, {workers} worker(s): {imgs / dt:7.1f} img/s "
            f"({args.places_per_batch} places x 4 per batch, {args.batches} batches)")
      del it


if __name__ == "__main__":
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
  main()
