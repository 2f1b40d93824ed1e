"""grain input pipelines: GSV-Cities place batches for training, padded image batches for eval.

Everything image-related (decode, resize, RandAugment) runs in numpy/PIL inside grain workers; the
pipelines emit uint8 images and the jitted steps normalise them (`normalize_images`), so 4x fewer
bytes cross process and host->device boundaries. Each JAX process reads only its share of every
global batch; `jax.make_array_from_process_local_data` assembles the global arrays.

Read-ahead is bounded in batches: a grain element is a whole (local) batch, so that the batches
do not depend on the number of worker processes; its places (or images) are computed on a
per-process pool of `num_threads` threads, and at most `PREFETCH_BATCHES` batches are read ahead
per process (plus one in each worker's output buffer).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import grain
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from PIL import Image

from salad_jax.data import augment, workers
from salad_jax.data.gsv_cities import GSVCities, epoch_place_order, sample_place_images
from salad_jax.data.images import (
  DAMAGED,
  IMAGENET_MEAN,
  IMAGENET_STD,
  OK,
  UNREADABLE,
  UnreadableImage,
  load_image,
  resize,
)

PREFETCH_BATCHES = 2


def normalize_images(images_u8):
  """uint8 NHWC -> float32: ToTensor (/255) then Normalize(ImageNet mean, std)."""
  x = images_u8.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)


@dataclasses.dataclass(frozen=True)
class TrainSpec:
  """Static shape and schedule of the training stream (global and per process).

  Each process loads whole places: `local_places` = ceil(P / processes), process i the places
  i * local_places ... of every step's P. Where P does not divide, the last process's extra
  slots are padding places (valid False), so every process's local batch has the same shape
  (`jax.make_array_from_process_local_data` needs that).
  """

  num_places: int
  places_per_batch: int  # P (global)
  img_per_place: int  # K
  process_index: int = 0
  process_count: int = 1

  @property
  def steps_per_epoch(self) -> int:  # the reference keeps the last, smaller batch (drop_last=False)
    return math.ceil(self.num_places / self.places_per_batch)

  @property
  def local_places(self) -> int:
    return -(-self.places_per_batch // self.process_count)

  @property
  def padding_places(self) -> int:
    """Place slots per step that no process fills (all processes together)."""
    return self.local_places * self.process_count - self.places_per_batch

  def global_position(self, local_index: int) -> tuple[int, int, int]:
    """(epoch, position in the epoch's place order, position in the step) of a local record
    index; the positions are -1 for a padding slot (past P, or past the epoch's last place)."""
    per_epoch = self.steps_per_epoch * self.local_places
    epoch, rem = divmod(local_index, per_epoch)
    step, j = divmod(rem, self.local_places)
    q = self.process_index * self.local_places + j
    pos = step * self.places_per_batch + q
    if q >= self.places_per_batch or pos >= self.num_places:
      return epoch, -1, -1
    return epoch, pos, q


# ------------------------------------------------------------------------------ threads
_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(num_threads: int) -> ThreadPoolExecutor:
  """This process's pool of `num_threads` threads (worker processes get their own)."""
  key = (os.getpid(), num_threads)
  with _POOLS_LOCK:
    if key not in _POOLS:
      _POOLS[key] = ThreadPoolExecutor(num_threads, thread_name_prefix="salad-data")
    return _POOLS[key]


class Batches:
  """Batch b of n items in one preallocated image array: item(i, images) fills its images in
  place (no copy to assemble the batch) and returns its other fields; items run on the thread
  pool. `finish` adds fields computed over the batch."""

  def __init__(
    self,
    item: Callable[[int, np.ndarray], dict],
    n: int,
    shape: tuple[int, ...],
    num_threads: int,
    finish: Callable[[dict], dict] | None = None,
  ):
    self.item, self.n, self.shape, self.num_threads = item, n, tuple(shape), num_threads
    self.finish = finish

  def __call__(self, b: int) -> dict[str, np.ndarray]:
    b = int(b)
    images = np.empty((self.n,) + self.shape, np.uint8)
    fill = lambda j: self.item(b * self.n + j, images[j])  # noqa: E731
    if self.num_threads > 1:
      parts = list(_pool(self.num_threads).map(fill, range(self.n)))
    else:
      parts = [fill(j) for j in range(self.n)]
    out = {k: np.concatenate([np.atleast_1d(p[k]) for p in parts]) for k in parts[0]}
    out["images"] = images.reshape((-1,) + self.shape[-3:])  # place-major for training
    return self.finish(out) if self.finish else out


def _iter(num_batches: int, batches: Batches, num_workers: int) -> grain.IterDataset:
  """Batch indices -> batches, at most PREFETCH_BATCHES ahead per process (computed two at a
  time, so the thread pool has the next batch's places while the last ones of a batch finish)."""
  it = (
    grain.MapDataset.range(num_batches)
    .map(batches)
    .to_iter_dataset(
      grain.ReadOptions(num_threads=PREFETCH_BATCHES, prefetch_buffer_size=PREFETCH_BATCHES)
    )
  )
  return _with_workers(it, num_workers)


# ------------------------------------------------------------------------------ training
class PlaceRecords:
  """Record i -> K augmented images of one place (uint8), its labels, and a validity mask.

  Positions past the end of an epoch, and a process's slots past P (`TrainSpec`), are padding
  places (valid=False) that keep every batch's shape static.
  """

  def __init__(
    self,
    ds: GSVCities,
    spec: TrainSpec,
    image_size: tuple[int, int],
    seed: int,
    randaugment: bool = True,
    num_ops: int = 3,
    magnitude: int = 9,
    fast_augment: bool = True,
  ):
    self.ds, self.spec, self.image_size, self.seed = ds, spec, tuple(image_size), seed
    self.randaugment, self.num_ops, self.magnitude = randaugment, num_ops, magnitude
    self.fast_augment = fast_augment
    self._order: tuple[int, np.ndarray] | None = None

  def order(self, epoch: int) -> np.ndarray:
    order = self._order  # one read: threads may replace it
    if order is None or order[0] != epoch:
      order = self._order = (epoch, epoch_place_order(self.ds, self.seed, epoch))
    return order[1]

  def load(self, i: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Image i resized (and augmented), and its status (images.OK / DAMAGED / UNREADABLE).

    An unreadable file becomes a black image, as in the reference (which replaces undecodable
    images by black 224x224 ones); a damaged JPEG decodes as the reference decodes it."""
    h, w = self.image_size
    if not self.randaugment and getattr(self.ds, "image_size", None) == (h, w):
      return self.ds.read_array(i)  # a resized pack: the stored bytes are the image
    try:
      im, status = self.ds.read_image(i)
      im = resize(im, (h, w))
    except (OSError, UnreadableImage) as e:
      logging.info("unreadable training image %s: %s", self.ds.image_path(i), e)
      im, status = Image.new("RGB", (w, h)), UNREADABLE
    if self.randaugment:
      im = augment.rand_augment(im, rng, self.num_ops, self.magnitude, fast=self.fast_augment)
    return np.asarray(im, np.uint8), status

  def __call__(self, index: int, out: np.ndarray) -> dict[str, np.ndarray]:
    """Fills out [K, H, W, 3] with the place's images; returns labels, valid, ids, status,
    image. `ids`: the example's identity in its step (place position in the step x K + k, the
    same on any number of processes and devices; -1 for padding), which keys its dropout."""
    epoch, pos, q = self.spec.global_position(int(index))
    k = self.spec.img_per_place
    if pos < 0:
      out[:] = 0
      return {
        "labels": np.full((k,), -1, np.int32),
        "valid": np.zeros((k,), bool),
        "ids": np.full((k,), -1, np.int32),
        "status": np.zeros((k,), np.int8),
        "image": np.full((k,), -1, np.int64),
      }
    place = int(self.order(epoch)[pos])
    rng = np.random.default_rng([self.seed, epoch, pos, 1])
    ids = sample_place_images(self.ds, place, k, rng)
    status = np.zeros((k,), np.int8)
    for j, i in enumerate(ids):
      out[j], status[j] = self.load(int(i), rng)
    label = int(self.ds.place_ids[place])
    return {
      "labels": np.full((k,), label, np.int32),
      "valid": np.ones((k,), bool),
      "ids": np.arange(q * k, (q + 1) * k, dtype=np.int32),
      "status": status,
      "image": np.asarray(ids, np.int64),
    }


class ReportDamaged:
  """Runs where the batch is consumed: logs each damaged or unreadable image of the batch and
  replaces the per-image status by their count, `corrupt`, so the count and the warnings agree
  at every step however far the workers read ahead."""

  def __init__(self, ds: GSVCities):
    self.ds = ds

  def __call__(self, batch: dict) -> dict:
    status, ids = batch.pop("status"), batch.pop("image")
    for s, i in zip(status[status != OK], ids[status != OK]):
      name = self.ds.image_name(int(i))
      if s == DAMAGED:
        logging.warning(
          "damaged training image %s: decoded with grey fill, as the reference "
          "does (PIL LOAD_TRUNCATED_IMAGES)",
          name,
        )
      else:
        logging.warning("unreadable training image %s: using a black image", name)
    batch["corrupt"] = np.int32(np.count_nonzero(status != OK))
    return batch


def _with_workers(it: grain.IterDataset, num_workers: int, buffer: int = 1) -> grain.IterDataset:
  """Worker processes via mp_prefetch, each dying with this process (`workers.die_with_parent`:
  `kill -9` left them running) and surviving a process group's SIGTERM, which is the trainer's
  to act on (`workers.start_data_worker`). grain reads absl flags in the workers, so outside `app.run`
  (notebooks, tests) the flags are marked parsed first."""
  if num_workers <= 0:
    return it
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return it.mp_prefetch(
    grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=buffer),
    worker_init_fn=functools.partial(workers.start_data_worker, os.getpid()),
  )


def train_dataset(
  ds: GSVCities,
  *,
  places_per_batch: int,
  img_per_place: int,
  image_size: Sequence[int],
  num_epochs: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  num_workers: int = 0,
  num_threads: int = 8,
  randaugment: bool = True,
  fast_augment: bool = True,
) -> tuple[grain.IterDataset, TrainSpec]:
  """Per-process stream of local batches {images uint8 [p*K,H,W,3], labels, valid, ids,
  corrupt}, p = ceil(P / processes) (`TrainSpec`).

  `fast_augment=False` runs RandAugment with the PIL reference ops: the same images, slower (for
  benchmarks).
  `corrupt` counts the batch's damaged and unreadable images, each logged as a warning when
  the batch is consumed."""
  spec = TrainSpec(ds.num_places, places_per_batch, img_per_place, process_index, process_count)
  records = PlaceRecords(ds, spec, tuple(image_size), seed, randaugment, fast_augment=fast_augment)
  num_batches = num_epochs * spec.steps_per_epoch
  k, (h, w) = img_per_place, tuple(image_size)
  batches = Batches(records, spec.local_places, (k, h, w, 3), num_threads)
  return _iter(num_batches, batches, num_workers).map(ReportDamaged(ds)), spec


# ------------------------------------------------------------------------------ evaluation
class EvalRecords:
  """Index -> resized uint8 image of `paths[index]` (the reference eval transform, before /255)."""

  def __init__(self, paths: Sequence[str], image_size: tuple[int, int]):
    self.paths = list(paths)
    self.image_size = image_size

  def __call__(self, index: int, out: np.ndarray) -> dict[str, Any]:
    out[:] = np.asarray(resize(load_image(self.paths[index]), self.image_size), np.uint8)
    return {"index": np.int64(index)}


def eval_dataset(
  paths: Sequence[str],
  *,
  image_size: tuple[int, int],
  batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
  num_workers: int = 0,
  num_threads: int = 8,
) -> grain.IterDataset:
  """Fixed-shape local batches {images uint8 [b,H,W,3], index [b] (-1 = padding), valid [b]}.

  Global batch g holds images g*batch_size ...; this process loads its contiguous share of it.
  The last batch is padded, so every batch has the same shape and nothing recompiles.
  """
  if batch_size % process_count:
    raise ValueError(f"batch_size {batch_size} must be a multiple of the {process_count} processes")
  h, w = image_size
  local = batch_size // process_count
  n = len(paths)
  num_batches = math.ceil(n / batch_size)
  records = EvalRecords(paths, (h, w))

  def load(i, out):
    g, j = divmod(int(i), local)
    gi = g * batch_size + process_index * local + j
    if gi >= n:
      out[:] = 0
      return {"index": np.int64(-1)}
    return records(gi, out)

  def finish(batch):
    batch["valid"] = batch["index"] >= 0
    return batch

  return _iter(num_batches, Batches(load, local, (h, w, 3), num_threads, finish), num_workers)
