"""Packs GSV-Cities into the TFDS records of `tfds_gsv`: in parallel, resumable, never partial.

The images are cut into shards of `images_per_shard` consecutive records. Worker processes (one
per core by default) each write whole shards into a staging directory next to the final one,
`<data_dir>/gsv_cities/<config>/2.0.0.partial/`: a shard is written under a temporary name, its
record count checked, its summary (`.json`) written, and then renamed; that rename commits it.
A killed pack leaves committed shards and temporary files; running the same command again skips
the committed shards (checking each one's record count and source files) and writes the rest. A
staging directory from a different job (other source, cities, size or shard size) is ours and is
removed first. Only when every shard is committed and the record count is right does TFDS write
the dataset info and rename its directory to the final name: the final directory is complete or
absent.

Each shard records the identity of its source files (`pack_shards.source_identity`: name, size,
mtime, ctime and inode of each; any rewrite of a file changes its ctime, even one that restores
its mtime). A resume writes again the committed shards whose source files changed since (a
resume used to mix 280 old and 206 new images of one city); a finished pack whose source files
changed is refused ("already packed" would have hidden the change). A stat per image, no read.

Writing, checking and committing each shard, and the worker processes, are
`salad_jax.data.pack_shards`'s (unreadable and damaged source images: stored as the reference
reads them, flagged, counted and named in a message here).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import time

import numpy as np

from salad_jax.data import gsv_cities, images, pack_records, pack_shards
from salad_jax.errors import UserError
from salad_jax.files import atomic, paths
from salad_jax.files.destinations import check_dir

JOB_FILE = "job.json"
LOCK_FILE = "pack.lock"


@dataclasses.dataclass
class Staged:
  shards: list[str]
  lengths: list[int]
  metadata: dict


def cities_in(root: str, cities=None) -> tuple[str, ...]:
  """The requested cities, or every CSV in Dataframes/ (the training cities first, in order)."""
  if cities:
    return tuple(cities)
  frames = os.path.join(root, "Dataframes")
  if not os.path.isdir(frames):
    raise FileNotFoundError(
      f"GSV-Cities not found at {root!r}: no Dataframes/ folder. {gsv_cities.HOW_TO_GET}"
    )
  present = {os.path.splitext(f)[0] for f in os.listdir(frames) if f.endswith(".csv")}
  ordered = [c for c in gsv_cities.TRAIN_CITIES if c in present]
  return tuple(ordered + sorted(present - set(ordered)))


def _lock(staging: str) -> str:
  """One pack per staging directory; a lock left by a dead process is taken over."""
  path = os.path.join(staging, LOCK_FILE)
  me = f"{socket.gethostname()} {os.getpid()}"
  for _ in range(2):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      os.write(fd, me.encode())
      os.close(fd)
      return path
    except FileExistsError:
      try:
        host, pid = open(path).read().split()
      except (OSError, ValueError):
        host, pid = "", "0"
      alive = host != socket.gethostname()  # another host: assume it lives
      if not alive:
        try:
          os.kill(int(pid), 0)
          alive = True
        except (ProcessLookupError, ValueError):
          alive = False
        except PermissionError:
          alive = True
      if alive:
        raise UserError(
          f"another pack ({host} pid {pid}) is writing {staging}",
          f"wait for it to finish, or delete {path} if it is gone",
        ) from None
      print(f"taking over the lock of a finished pack ({host} pid {pid}) in {staging}")
      os.remove(path)
  raise UserError(f"cannot lock {staging}")


def pack(
  manual_dir: str,
  data_dir: str,
  cities=None,
  image_size=None,
  num_workers: int = 0,
  images_per_shard: int = 1000,
  compression: str = "none",
  progress: bool = True,
) -> str:
  """Writes the pack; returns its directory. See the module docstring."""
  import tensorflow_datasets as tfds

  if paths.is_url(data_dir):  # gs://...: the ArrayRecord writer writes local files only
    raise UserError(
      f"--data_dir {data_dir}: a pack is written to local disk (the ArrayRecord writer cannot "
      "write to object stores)",
      "pack into a local --data_dir, then upload it (gsutil -m cp -r <data_dir>/gsv_cities "
      "gs://...) and train with --config.data.tfds_data_dir=gs://...",
    )
  image_size = images.as_size(image_size) if image_size is not None else None
  if compression not in ("none", "zstd"):
    raise UserError(f"compression {compression!r}: use none or zstd")
  check_dir(data_dir, "--data_dir")
  final = pack_records.pack_dir(data_dir, image_size)
  cities = _packed_order(final, cities_in(manual_dir, cities))
  ds = gsv_cities.read_gsv_cities(manual_dir, cities, min_img_per_place=1)
  counts = np.diff(ds.place_start)
  metadata = {
    "format": pack_records.FORMAT,
    "image_size": list(image_size) if image_size else None,
    "cities": list(ds.cities),
    "place_ids": [int(x) for x in ds.place_ids],
    "place_city": [int(x) for x in ds.place_city],
    "num_images": [int(x) for x in counts],
  }
  order = ds.order  # records: images grouped by place, places in order, CSV order within
  n = len(order)
  num_shards = max(1, -(-n // images_per_shard))
  shard_files = [
    [
      (ds.image_path(int(i)), str(ds.paths[int(i)]), int(ds.image_place[int(i)]))
      for i in order[s * images_per_shard : (s + 1) * images_per_shard]
    ]
    for s in range(num_shards)
  ]
  sources = [pack_shards.source_identity(files) for files in shard_files]
  source = hashlib.sha256("".join(sources).encode()).hexdigest()  # not in the resume key
  if os.path.isfile(os.path.join(final, "dataset_info.json")):
    return _existing(final, {**metadata, "source": source})
  job = {
    "source": os.path.abspath(manual_dir),
    "images": n,
    "images_per_shard": images_per_shard,
    "compression": compression,
    "metadata": metadata,
  }
  staging = final + ".partial"
  _check_staging(staging)
  os.makedirs(staging, exist_ok=True)
  lock = _lock(staging)
  try:
    _reset_if_other_job(staging, job)
    names = tfds.core.ShardedFileTemplate(
      data_dir=staging,
      dataset_name=pack_records.NAME,
      split="train",
      filetype_suffix="array_record",
    ).sharded_filepaths(num_shards)
    tasks, summaries, changed = [], {}, 0
    for s in range(num_shards):
      path = os.fspath(names[s])
      done = pack_shards.committed(path, len(shard_files[s]), sources[s])
      if done is not None:
        summaries[s] = done
        continue
      was = pack_shards.source_of(path)  # None: missing, or written before sources were recorded
      changed += (
        was is not None and pack_shards.committed(path, len(shard_files[s]), was) is not None
      )
      tasks.append(
        {
          "shard": s,
          "path": path,
          "files": shard_files[s],
          "source": sources[s],
          "image_size": image_size,
          "compression": compression,
        }
      )
    if image_size:  # raw images: the size is known before writing (+3 % record overhead)
      need = sum(len(t["files"]) for t in tasks) * image_size[0] * image_size[1] * 3 * 1.03
      free = shutil.disk_usage(staging).free
      if need > free:
        raise UserError(
          f"packing needs ~{need / 2**30:.1f} GiB more in {data_dir}, "
          f"{free / 2**30:.1f} GiB are free",
          "free space or choose another --data_dir",
        )
    what = "resized to {}x{} (raw uint8)".format(*image_size) if image_size else "as JPEG bytes"
    if summaries:
      print(f"resuming: {len(summaries)} of {num_shards} shards already written in {staging}")
    if changed:
      print(
        f"{changed} shard(s) already written are written again: their source images changed "
        "since (a rewritten, replaced or deleted file)"
      )
    print(f"packing {n} images of {len(counts)} places {what} into {final}")
    t0 = time.time()
    pack_shards.run(
      tasks, summaries, num_workers, progress, n - sum(len(t["files"]) for t in tasks)
    )
    lengths = [summaries[s]["records"] for s in range(num_shards)]
    if sum(lengths) != n:
      raise RuntimeError(f"{staging}: {sum(lengths)} records in the shards, expected {n}")
    damaged = [x for s in range(num_shards) for x in summaries[s]["damaged"]]
    unreadable = [x for s in range(num_shards) for x in summaries[s]["unreadable"]]
    metadata.update(damaged=len(damaged), unreadable=len(unreadable), source=source)
    builder = pack_records.GsvCities(
      data_dir=data_dir,
      image_size=image_size,
      staged=Staged([os.fspath(p) for p in names], lengths, metadata),
    )
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )
  finally:
    if os.path.exists(lock):
      os.remove(lock)
  _remove_staging(staging, names)
  size = sum(os.path.getsize(os.path.join(final, f)) for f in os.listdir(final))
  print(
    f"packed {n} images in {time.time() - t0:.0f} s: {size / 2**30:.2f} GiB, "
    f"{size / n * 1000 / 2**20:.1f} MiB per 1,000 images, in {final}"
  )
  for label, items in (
    ("unreadable source images (stored as black images)", unreadable),
    ("damaged JPEGs (stored decoded with grey fill, as the reference)", damaged),
  ):
    if items:
      print(f"{len(items)} {label}: " + "; ".join(items[:10]) + (" ..." if len(items) > 10 else ""))
  return final


def _packed_order(final: str, cities: tuple[str, ...]) -> tuple[str, ...]:
  """`cities` in the order of the pack already in `final` when it holds the same cities: the
  order of a list of cities does not make another pack (it numbers the places)."""
  try:
    with open(os.path.join(final, "metadata.json")) as f:
      have = tuple(json.load(f).get("cities") or ())
  except (OSError, ValueError, AttributeError):
    return cities
  return have if sorted(have) == sorted(cities) else cities


def _existing(final: str, metadata: dict) -> str:
  with open(os.path.join(final, "metadata.json")) as f:
    have = json.load(f)
  diff = [
    k
    for k in ("format", "image_size", "cities", "place_ids", "num_images")
    if have.get(k) != metadata[k]
  ]
  if "cities" in diff:  # the lists themselves (their order does not count: `_packed_order`)
    diff = [
      f"cities: it holds {','.join(have.get('cities') or [])}, you asked for "
      f"{','.join(metadata['cities'])}"
    ]
  if diff:
    raise UserError(
      f"{final} already holds a different pack (differs in {'; '.join(diff)})",
      "use another --data_dir, or delete that directory to replace it",
    )
  if have.get("source") not in (None, metadata["source"]):  # packs made before: not recorded
    raise UserError(
      f"{final} was packed from other source files: images under the GSV-Cities root were "
      "rewritten, replaced or deleted since",
      f"delete {final} and pack again (or use another --data_dir) to pack the files as they "
      "are now",
    )
  print(f"already packed: {final}")
  return final


def _check_staging(staging: str) -> None:
  """The staging directory has a fixed name (a rerun resumes it): an entry of that name that a
  pack did not make (a file, a link, a directory without our job file) is refused, never used."""
  if not os.path.lexists(staging):
    return
  ours = (
    not os.path.islink(staging)
    and os.path.isdir(staging)
    and (
      not os.listdir(staging)
      or os.path.isfile(os.path.join(staging, JOB_FILE))
      or os.path.isfile(os.path.join(staging, LOCK_FILE))
    )
  )
  if not ours:
    raise UserError(
      f"{staging} exists and is not an unfinished pack (no {JOB_FILE}); salad_jax "
      "writes its staging files there and will not use a folder of yours",
      "move it away, or choose another --data_dir",
    )


def _pack_file(staging: str, name: str) -> bool:
  """A name the pack writes in its staging folder: the job and lock files, its shards (and
  their summaries and temporaries), each a regular file."""
  path = os.path.join(staging, name)
  if os.path.islink(path) or not os.path.isfile(path):
    return False
  return name in (JOB_FILE, LOCK_FILE) or name.startswith(
    f"{pack_records.NAME}-train.array_record-"
  )


def _reset_if_other_job(staging: str, job: dict) -> None:
  path = os.path.join(staging, JOB_FILE)
  if os.path.isfile(path):
    try:
      with open(path) as f:
        same = json.load(f) == job
    except (OSError, ValueError):
      same = False
    foreign = [f for f in os.listdir(staging) if not _pack_file(staging, f)]
    if not same and foreign:  # only files a pack writes are ever deleted
      raise UserError(
        f"{staging} holds an unfinished pack of another job and {foreign[0]}, which "
        "a pack does not write",
        "move that file away (or the whole folder), then rerun",
      )
    if not same:
      print(f"{staging} holds an unfinished pack of another job: starting from scratch")
      for f in os.listdir(staging):
        if f != LOCK_FILE:
          os.remove(os.path.join(staging, f))
  for f in os.listdir(staging):  # temporary files of killed writers
    if ".tmp-" in f and _pack_file(staging, f):
      os.remove(os.path.join(staging, f))
  with atomic.new_file(path) as tmp, open(tmp, "w") as f:
    json.dump(job, f)


def _remove_staging(staging: str, shards) -> None:
  """Removes what the pack wrote in its staging directory (shards now linked into the pack)."""
  for p in shards:
    for f in (os.fspath(p), f"{os.fspath(p)}.json"):
      if os.path.exists(f):
        os.remove(f)
  os.remove(os.path.join(staging, JOB_FILE))
  try:
    os.rmdir(staging)
  except OSError:  # something else is in there: not ours to delete
    print(f"left {staging}: it holds files the pack did not write")
