"""The shards of the GSV-Cities pack (`salad_jax.data.pack`): each written, checked and committed
whole, by worker processes.

A shard is written under a temporary name, its record count read back, its summary (`.json`:
record count, damaged and unreadable images, the `source_identity` of its files) written, and
then renamed; that rename commits it. `committed` recognises a committed shard of the same
source files (a resume skips it). An unreadable source image is stored as the reference's black
image (as the file reader does), named in the summary and flagged in its record; a damaged JPEG
is stored as the reference decodes it (grey fill) and flagged too. `run` writes the shards in a
forkserver process pool (or in this process), with a progress bar.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from PIL import Image

from salad_jax.data import images, pack_records
from salad_jax.data.workers import die_with_parent


def encode_image(path: str, image_size) -> tuple[bytes, int, str]:
  """(record bytes, status, message) for one source file: resized raw uint8, or the file."""
  if image_size is None:
    try:
      return images.read_file(path), images.OK, ""
    except OSError as e:  # stored empty: training reads it as unreadable, like the file
      return b"", images.UNREADABLE, str(e)
  h, w = image_size
  try:
    im, status = images.decode(images.read_file(path), path, damaged="allow")
    im = images.resize(im, (h, w))
    msg = "" if status == images.OK else f"damaged JPEG {path}: decoded with grey fill"
  except (OSError, images.UnreadableImage) as e:
    im, status, msg = Image.new("RGB", (w, h)), images.UNREADABLE, str(e)
  return im.tobytes(), status, msg


def source_identity(files) -> str:
  """A digest of the source files of a shard: their names and what the file system says of
  each (size, mtime, ctime, inode); a missing file counts as such. Any rewrite changes it."""
  h = hashlib.sha256()
  for path, name, _ in files:
    try:
      st = os.stat(path)
      ident = f"{st.st_size} {st.st_mtime_ns} {st.st_ctime_ns} {st.st_ino}"
    except OSError as e:
      ident = f"unreadable {e.errno}"
    h.update(f"{name}\t{ident}\n".encode())
  return h.hexdigest()


def write_shard(task: dict) -> dict:
  """Writes one shard (runs in a worker process); returns its summary."""
  from array_record.python import array_record_module

  feats = pack_records.features()
  final, n = task["path"], len(task["files"])
  tmp = f"{final}.tmp-{os.getpid()}"
  options = "group_size:1" + (",uncompressed" if task["compression"] == "none" else "")
  writer = array_record_module.ArrayRecordWriter(tmp, options)
  damaged, unreadable = [], []
  for path, name, place in task["files"]:
    data, status, msg = encode_image(path, task["image_size"])
    if status == images.DAMAGED:
      damaged.append(name)
    elif status == images.UNREADABLE:
      unreadable.append(f"{name}: {msg}")
    writer.write(
      feats.serialize_example({"image": data, "status": status, "name": name, "place": place})
    )
  writer.close()
  with open(tmp, "rb") as f:  # on disk before the rename commits it
    os.fsync(f.fileno())
  got = array_record_module.ArrayRecordReader(tmp).num_records()
  if got != n:
    raise RuntimeError(f"{tmp}: wrote {n} records, read back {got}")
  summary = {
    "records": n,
    "damaged": damaged,
    "unreadable": unreadable,
    "source": task["source"],  # the files as they were when the shard was started
  }
  with open(f"{final}.json.tmp-{os.getpid()}", "w") as f:
    json.dump(summary, f)
  os.replace(f"{final}.json.tmp-{os.getpid()}", f"{final}.json")
  os.replace(tmp, final)  # the commit
  return summary


def committed(path: str, n: int, source: str) -> dict | None:
  """The summary of a committed shard of n records written from the `source` files (their
  `source_identity` now), or None."""
  from array_record.python import array_record_module

  if not (os.path.isfile(path) and os.path.isfile(f"{path}.json")):
    return None
  try:
    with open(f"{path}.json") as f:
      summary = json.load(f)
    if (
      summary["records"] == n
      and summary.get("source") == source
      and array_record_module.ArrayRecordReader(path).num_records() == n
    ):
      return summary
  except (OSError, ValueError, KeyError, RuntimeError):
    pass
  return None


def source_of(path: str) -> str | None:
  """The source identity a committed shard's summary records, if any."""
  try:
    with open(f"{path}.json") as f:
      return json.load(f).get("source")
  except (OSError, ValueError, AttributeError):
    return None


def run(tasks: list, summaries: dict, num_workers: int, progress: bool, initial: int) -> None:
  from tqdm import tqdm

  total = initial + sum(len(t["files"]) for t in tasks)
  bar = tqdm(
    total=total, initial=initial, unit="img", desc="pack", disable=not progress, mininterval=2.0
  )
  workers = min(num_workers or os.cpu_count() or 1, max(1, len(tasks)))
  try:
    if workers <= 1:
      for t in tasks:
        summaries[t["shard"]] = write_shard(t)
        bar.update(len(t["files"]))
      return
    # forkserver: workers fork from a clean server process that imported this module once
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["salad_jax.data.pack_shards", "salad_jax.data.tfds_gsv"])
    # each writer exits when this process is gone (kill -9 left them writing)
    with ProcessPoolExecutor(
      workers, mp_context=ctx, initializer=die_with_parent, initargs=(os.getpid(),)
    ) as pool:
      try:
        for t, summary in zip(tasks, pool.map(write_shard, tasks)):
          summaries[t["shard"]] = summary
          bar.update(len(t["files"]))
      except BrokenProcessPool:
        raise RuntimeError(
          "a pack worker process died (killed, or out of memory?); the shards "
          "written so far are kept: run the same command again to resume"
        ) from None
  finally:
    bar.close()
