r"""Training input throughput: 640x480 JPEG files vs pre-resized packed records, with and without
RandAugment(3, 9), per image in one process and through the grain pipeline with 1 and 2 workers.

Writes a synthetic GSV-Cities tree of JPEGs (textured scenes, quality 90), packs it with
`salad_jax.data.pack` at 224x224, then measures:
  1. record formats: bytes per 1,000 images and decode time (raw uint8 vs lossless codecs);
  2. per image, one process, CPU time: today's path (decode, resize, PIL RandAugment), the JPEG
     path with the fast RandAugment, and the packed path, with the stage shares and per-op costs;
  3. grain pipeline img/s (wall clock) with 1 and 2 worker processes, and the extrapolation to
     16- and 96-core hosts (linear in the per-worker rate: an extrapolation, not a measurement).

  python benchmarks/pipeline_throughput.py                  # full run (a few minutes on 2 cores)
  python benchmarks/pipeline_throughput.py --places 16 --batches 2 --no-pipeline   # quick check

Figures from a shared or loaded machine are noisy; the script prints the load average. Rerun on
an idle machine for figures to quote.
"""

import argparse
import io
import os
import sys
import tempfile
import time

import common  # noqa: F401  (puts tests/ on the path)


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


def cpu_ms(fn, items, repeat=1):
  """Median over `repeat` passes of the CPU time (this process) per item, in ms."""
  import statistics

  per = []
  for _ in range(repeat):
    t = time.process_time()
    for x in items:
      fn(x)
    per.append((time.process_time() - t) / len(items) * 1e3)
  return statistics.median(per)


def record_formats(images224):
  """Bytes per 1,000 images and decode ms per image of candidate record formats."""
  import numpy as np
  from array_record.python import array_record_module as ar
  from PIL import Image

  rows = []
  with tempfile.TemporaryDirectory() as d:
    raw = [im.tobytes() for im in images224]
    for opt, label in (
      ("group_size:1,uncompressed", "raw uint8, uncompressed (chosen)"),
      ("group_size:1", "raw uint8, ArrayRecord zstd"),
    ):
      path = os.path.join(d, "x.ar")
      w = ar.ArrayRecordWriter(path, opt)
      for r in raw:
        w.write(r)
      w.close()
      reader = ar.ArrayRecordReader(path)
      ms = cpu_ms(lambda i: np.frombuffer(reader.read([i])[0], np.uint8), range(len(raw)), 3)
      rows.append((label, os.path.getsize(path) / len(raw) * 1000, ms))
    for fmt, kw, label in (
      ("PNG", dict(compress_level=1), "PNG level 1"),
      ("WEBP", dict(lossless=True, quality=0, method=0), "WebP lossless, fastest"),
    ):
      blobs = []
      for im in images224:
        b = io.BytesIO()
        im.save(b, fmt, **kw)
        blobs.append(b.getvalue())
      ms = cpu_ms(lambda b: np.asarray(Image.open(io.BytesIO(b)).convert("RGB")), blobs, 3)
      rows.append((label, np.mean([len(b) for b in blobs]) * 1000, ms))
  return rows


def stage_profile(ds_files, ds_packed, n):
  """CPU ms per image, one process, for each path and stage."""
  import numpy as np
  from PIL import Image

  from salad_jax.data import augment, images

  idx = list(range(min(n, len(ds_files.paths))))
  paths = [ds_files.image_path(i) for i in idx]

  def old_decode(p):  # today's reader: PIL open + convert
    with Image.open(p) as im:
      return im.convert("RGB")

  decoded = {p: old_decode(p) for p in paths}
  resized = {p: decoded[p].resize((224, 224), Image.BILINEAR) for p in paths}
  r = {}
  r["decode (PIL open+convert)"] = cpu_ms(old_decode, paths, 3)
  r["decode (images.decode)"] = cpu_ms(
    lambda p: images.decode(images.read_file(p), p, damaged="allow"), paths, 3
  )
  r["resize 640x480 -> 224x224"] = cpu_ms(lambda p: images.resize(decoded[p], (224, 224)), paths, 3)
  rngs = lambda: [np.random.default_rng(i) for i in range(len(paths))]  # noqa: E731
  r["RandAugment, PIL ops (today)"] = cpu_ms(
    lambda x: augment.rand_augment(resized[paths[x[0]]], x[1], fast=False),
    list(enumerate(rngs())),
    3,
  )
  r["RandAugment, fast ops"] = cpu_ms(
    lambda x: augment.rand_augment(resized[paths[x[0]]], x[1]), list(enumerate(rngs())), 3
  )
  r["packed record read"] = cpu_ms(lambda i: ds_packed.read_image(i), idx, 3)
  r["to numpy (np.asarray)"] = cpu_ms(lambda p: np.asarray(resized[p]), paths, 3)
  ops = {}
  img = resized[paths[0]]
  for op in augment.OPS:
    mag = augment.magnitude_of(op, (224, 224))
    ops[op] = (
      cpu_ms(lambda _: augment.apply_op(img, op, mag), range(30), 3),
      cpu_ms(lambda _: augment.apply_op_fast(img, op, mag), range(30), 3),
    )
  return r, ops


def cpu_seconds():
  """User + system CPU time of this process and its worker processes."""
  import psutil

  me = psutil.Process()
  total = sum(me.cpu_times()[:2])
  for child in me.children(recursive=True):
    try:
      total += sum(child.cpu_times()[:2])
    except psutil.NoSuchProcess:
      pass
  return total


def pipeline_rate(ds, workers, randaugment, places_per_batch, batches, fast_augment=True):
  """(img/s wall clock, img per CPU-second of all the pipeline's processes)."""
  from salad_jax.data import pipeline

  it, _ = pipeline.train_dataset(
    ds,
    places_per_batch=places_per_batch,
    img_per_place=4,
    image_size=(224, 224),
    num_epochs=1000,
    seed=0,
    num_workers=workers,
    num_threads=1,
    randaugment=randaugment,
    fast_augment=fast_augment,
  )
  it = iter(it)
  for _ in range(2 * max(workers, 1)):  # worker start-up, one batch from each
    next(it)
  t, c = time.perf_counter(), cpu_seconds()
  for _ in range(batches):
    next(it)
  dt, dc = time.perf_counter() - t, cpu_seconds() - c
  del it
  n = batches * places_per_batch * 4
  return n / dt, n / dc


def main():
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--places", type=int, default=64)
  ap.add_argument("--places_per_batch", type=int, default=16)
  ap.add_argument("--batches", type=int, default=8)
  ap.add_argument("--profile_images", type=int, default=48)
  ap.add_argument(
    "--no-pipeline",
    dest="pipeline",
    action="store_false",
    help="skip the grain runs (worker start-up dominates on small machines)",
  )
  args = ap.parse_args()

  import numpy as np
  import PIL
  from absl import flags

  from salad_jax.data import gsv_cities, pack, pack_records, tfds_gsv

  flags.FLAGS.mark_as_parsed()
  load0 = os.getloadavg()
  print(f"machine: {common.machine()}; load average {load0[0]:.1f} (1 min) at start")
  print(f"python {sys.version.split()[0]}, Pillow {PIL.__version__}, numpy {np.__version__}")
  print(f"command: python benchmarks/pipeline_throughput.py {' '.join(sys.argv[1:])}")

  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory() as root, tempfile.TemporaryDirectory() as out:
    write_dataset(root, args.places, rng)
    ds_files = gsv_cities.read_gsv_cities(root, ("Bench",))
    n = len(ds_files.paths)
    jpeg_kib = np.mean([os.path.getsize(ds_files.image_path(i)) for i in range(n)]) / 1024
    t = time.perf_counter()
    pack.pack(root, out, image_size=(224, 224), progress=False)
    pack_s = time.perf_counter() - t
    ds_packed = tfds_gsv.open_gsv_cities(out, image_size=(224, 224))
    final = pack_records.pack_dir(out, (224, 224))
    pack_bytes = sum(os.path.getsize(os.path.join(final, f)) for f in os.listdir(final))

    print(
      f"\n{n} JPEGs 640x480, mean {jpeg_kib:.0f} KiB ({jpeg_kib * 1000 / 1024:.0f} MiB per "
      f"1,000); packed at 224x224 in {pack_s:.1f} s wall ({os.cpu_count()} workers, incl. "
      f"start-up): {pack_bytes / n * 1000 / 2**20:.0f} MiB per 1,000 images"
    )

    print("\n1. record formats for a 224x224 image (CPU ms per image to get the uint8 pixels)")
    sample = [ds_packed.read_image(i)[0].copy() for i in range(min(32, n))]
    for label, bytes_k, ms in record_formats(sample):
      print(f"   {label:34s} {bytes_k / 2**20:6.1f} MiB per 1,000   {ms:6.3f} ms")

    print(
      f"\n2. per image, one process, CPU time (median of 3 passes over {args.profile_images} images)"
    )
    r, ops = stage_profile(ds_files, ds_packed, args.profile_images)
    for k, v in r.items():
      print(f"   {k:34s} {v:6.3f} ms")
    today = (
      r["decode (PIL open+convert)"]
      + r["resize 640x480 -> 224x224"]
      + r["RandAugment, PIL ops (today)"]
      + r["to numpy (np.asarray)"]
    )
    paths_ms = {
      "today: JPEG, decode+resize+RandAugment": today,
      "JPEG files, fast RandAugment": r["decode (images.decode)"]
      + r["resize 640x480 -> 224x224"]
      + r["RandAugment, fast ops"]
      + r["to numpy (np.asarray)"],
      "packed records, fast RandAugment": r["packed record read"]
      + r["RandAugment, fast ops"]
      + r["to numpy (np.asarray)"],
      "JPEG files, no RandAugment": r["decode (images.decode)"]
      + r["resize 640x480 -> 224x224"]
      + r["to numpy (np.asarray)"],
      "packed records, no RandAugment": r["packed record read"] + r["to numpy (np.asarray)"],
    }
    for k, v in paths_ms.items():
      print(
        f"   = {k:38s} {v:6.3f} ms/img  {1000 / v:7.0f} img/s per core  {today / v:5.2f}x today"
      )
    print(
      f"   today's shares: decode {100 * r['decode (PIL open+convert)'] / today:.0f}%, resize "
      f"{100 * r['resize 640x480 -> 224x224'] / today:.0f}%, RandAugment "
      f"{100 * r['RandAugment, PIL ops (today)'] / today:.0f}%"
    )
    print("   RandAugment ops at 224x224, ms (PIL ops -> fast ops); each is drawn 3/14 of images:")
    for op, (a, b) in ops.items():
      print(f"     {op:13s} {a:6.3f} -> {b:6.3f}")
    mean_pil = sum(a for a, _ in ops.values()) / len(ops)
    mean_fast = sum(b for _, b in ops.values()) / len(ops)
    print(
      f"   RandAugment expected per image (3 x mean op): PIL ops {3 * mean_pil:.3f} ms, fast ops "
      f"{3 * mean_fast:.3f} ms ({100 * (1 - mean_fast / mean_pil):.0f}% less)"
    )
    bound = sum(ops[o][1] for o in ("ShearX", "ShearY", "Rotate", "Sharpness"))
    total = sum(b for _, b in ops.values())
    print(
      f"   what bounds the packed path: ShearX, ShearY, Rotate (PIL's bilinear affine transform) "
      f"and Sharpness (PIL's 3x3 filter) are {100 * bound / total:.0f}% of the fast "
      f"RandAugment's time; their exact numpy ports are slower than PIL's C"
    )

    if args.pipeline:
      print(
        f"\n3. grain pipeline, wall clock ({args.places_per_batch} places x 4 per batch, "
        f"{args.batches} batches after start-up, num_threads=1 per worker)"
      )
      print(
        "   img/s wall clock; and img per CPU-second of all its processes (workers + the "
        "consuming process), which load on the machine affects far less"
      )
      rates = {}
      variants = (
        ("today: JPEG files, PIL RandAugment ops", ds_files, True, False),
        ("JPEG files, RandAugment on", ds_files, True, True),
        ("JPEG files, RandAugment off", ds_files, False, True),
        ("packed, RandAugment on", ds_packed, True, True),
        ("packed, RandAugment off", ds_packed, False, True),
      )
      for label, ds, ra, fast in variants:
        for workers in (1, 2):
          wall, per_cpu = pipeline_rate(ds, workers, ra, args.places_per_batch, args.batches, fast)
          rates[(label, workers)] = per_cpu
          print(
            f"   {label:38s} {workers} worker(s): {wall:7.0f} img/s wall   "
            f"{per_cpu:7.0f} img per CPU-second"
          )
      today1 = rates[(variants[0][0], 1)]
      print(
        "   img per CPU-second with 1 worker against today's path through grain, and "
        "extrapolated to whole hosts (x cores, i.e. every core busy and linear scaling; "
        "not measured):"
      )
      for label, *_ in variants:
        w1 = rates[(label, 1)]
        print(
          f"     {label:38s} {w1:6.0f} img/s per core ({w1 / today1:4.2f}x today) -> "
          f"16 cores {16 * w1:8.0f}, 96 cores {96 * w1:9.0f} img/s"
        )
  load1 = os.getloadavg()
  print(
    f"\nload average {load1[0]:.1f} (1 min) at the end: figures taken with other work on the "
    "machine are noisy; the CPU-time figures of part 2 are the least affected."
  )


if __name__ == "__main__":
  main()
