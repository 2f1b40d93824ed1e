"""grain input pipelines: GSV-Cities place batches for training, padded image batches for eval.

Everything image-related (decode, resize, RandAugment) runs in numpy/PIL inside grain workers; the
pipelines emit uint8 images and the jitted steps normalise them (`normalize_images`), so 4x fewer
bytes cross process and host->device boundaries. Each JAX process reads only its share of every
global batch; `jax.make_array_from_process_local_data` assembles the global arrays.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import grain
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from PIL import Image, ImageFile

from salad_jax.data import augment
from salad_jax.data.gsv_cities import GSVCities, epoch_place_order, sample_place_images
from salad_jax.data.images import IMAGENET_MEAN, IMAGENET_STD, load_image, resize

ImageFile.LOAD_TRUNCATED_IMAGES = True  # as the reference: truncated JPEGs decode with grey fill

def normalize_images(images_u8):
  """uint8 NHWC -> float32: ToTensor (/255) then Normalize(ImageNet mean, std)."""
  x = images_u8.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)


@dataclasses.dataclass(frozen=True)
class TrainSpec:
  """Static shape and schedule of the training stream (global and per process)."""
  num_places: int
  places_per_batch: int  # P (global)
  img_per_place: int  # K
  process_index: int = 0
  process_count: int = 1

  def __post_init__(self):
    if self.places_per_batch % self.process_count:
      raise ValueError(f"{self.places_per_batch} places per batch cannot be split over "
                       f"{self.process_count} processes; use a multiple of {self.process_count}")

  @property
  def steps_per_epoch(self) -> int:  # the reference keeps the last, smaller batch (drop_last=False)
    return math.ceil(self.num_places / self.places_per_batch)

  @property
  def local_places(self) -> int:
    return self.places_per_batch // self.process_count

  def global_position(self, local_index: int) -> tuple[int, int]:
    """(epoch, position in the epoch's place order) of a local record index."""
    per_epoch = self.steps_per_epoch * self.local_places
    epoch, rem = divmod(local_index, per_epoch)
    step, j = divmod(rem, self.local_places)
    return epoch, step * self.places_per_batch + self.process_index * self.local_places + j


class PlaceRecords:
  """Record i -> K augmented images of one place (uint8), its labels, and a validity mask.

  Positions past the end of an epoch pad the last batch to a static shape (valid=False).
  """

  def __init__(self, ds: GSVCities, spec: TrainSpec, image_size: tuple[int, int], seed: int,
               randaugment: bool = True, num_ops: int = 3, magnitude: int = 9):
    self.ds, self.spec, self.image_size, self.seed = ds, spec, tuple(image_size), seed
    self.randaugment, self.num_ops, self.magnitude = randaugment, num_ops, magnitude
    self._order: tuple[int, np.ndarray] | None = None

  def order(self, epoch: int) -> np.ndarray:
    if self._order is None or self._order[0] != epoch:
      self._order = (epoch, epoch_place_order(self.ds, self.seed, epoch))
    return self._order[1]

  def load(self, i: int, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """Image i resized (and augmented); an unreadable file becomes a black image, as in the
    reference (which replaces undecodable images by black 224x224 ones), and is counted."""
    h, w = self.image_size
    try:
      im = resize(self.ds.open_image(i), (h, w))
      bad = False
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
      logging.warning("unreadable training image %s (%s): using a black image", self.ds.image_path(i), e)
      im, bad = Image.new("RGB", (w, h)), True
    if self.randaugment:
      im = augment.rand_augment(im, rng, self.num_ops, self.magnitude)
    return np.asarray(im, np.uint8), bad

  def __call__(self, index: int) -> dict[str, Any]:
    epoch, pos = self.spec.global_position(int(index))
    k, (h, w) = self.spec.img_per_place, self.image_size
    if pos >= self.spec.num_places:
      return {"images": np.zeros((k, h, w, 3), np.uint8), "labels": np.full((k,), -1, np.int32),
              "valid": np.zeros((k,), bool), "corrupt": np.int32(0)}
    place = int(self.order(epoch)[pos])
    rng = np.random.default_rng([self.seed, epoch, pos, 1])
    images, corrupt = [], 0
    for i in sample_place_images(self.ds, place, k, rng):
      img, bad = self.load(int(i), rng)
      images.append(img)
      corrupt += bad
    label = int(self.ds.place_ids[place])
    return {"images": np.stack(images), "labels": np.full((k,), label, np.int32),
            "valid": np.ones((k,), bool), "corrupt": np.int32(corrupt)}


def _flatten_places(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """[P, K, ...] -> [P*K, ...] place-major (p0i0, p0i1, ..., p1i0, ...); corrupt summed."""
  out = {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items() if k != "corrupt"}
  out["corrupt"] = np.int32(batch["corrupt"].sum())
  return out


def _with_workers(it: grain.IterDataset, num_workers: int, buffer: int = 2) -> grain.IterDataset:
  """Worker processes via mp_prefetch. grain reads absl flags in the workers, so outside
  `app.run` (notebooks, tests) the flags are marked parsed first."""
  if num_workers <= 0:
    return it
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                     per_worker_buffer_size=buffer))


def train_dataset(ds: GSVCities, *, places_per_batch: int, img_per_place: int,
                  image_size: Sequence[int], num_epochs: int, seed: int, process_index: int = 0,
                  process_count: int = 1, num_workers: int = 0, num_threads: int = 8,
                  randaugment: bool = True) -> tuple[grain.IterDataset, TrainSpec]:
  """Per-process stream of local batches {images uint8 [p*K,H,W,3], labels, valid, corrupt}."""
  spec = TrainSpec(ds.num_places, places_per_batch, img_per_place, process_index, process_count)
  records = PlaceRecords(ds, spec, tuple(image_size), seed, randaugment)
  total = num_epochs * spec.steps_per_epoch * spec.local_places
  dataset = (grain.MapDataset.range(total).map(records)
             .batch(spec.local_places, batch_fn=lambda xs: _flatten_places(
                 {k: np.stack([x[k] for x in xs]) for k in xs[0]})))
  it = dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=max(2 * spec.local_places, num_threads)))
  return _with_workers(it, num_workers), spec


# ------------------------------------------------------------------------------ evaluation
class EvalRecords:
  """Index -> resized uint8 image of `paths[index]` (the reference eval transform, before /255)."""

  def __init__(self, paths: Sequence[str], image_size: tuple[int, int]):
    self.paths = list(paths)
    self.image_size = image_size

  def __call__(self, index: int) -> dict[str, Any]:
    im = resize(load_image(self.paths[index]), self.image_size)
    return {"images": np.asarray(im, np.uint8), "index": np.int64(index)}


def eval_dataset(paths: Sequence[str], *, image_size: tuple[int, int], batch_size: int,
                 process_index: int = 0, process_count: int = 1, num_workers: int = 0,
                 num_threads: int = 8) -> grain.IterDataset:
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

  def load(i):
    g, j = divmod(int(i), local)
    gi = g * batch_size + process_index * local + j
    if gi >= n:
      return {"images": np.zeros((h, w, 3), np.uint8), "index": np.int64(-1)}
    return records(gi)

  def stack(xs):
    index = np.array([x["index"] for x in xs], np.int64)
    return {"images": np.stack([x["images"] for x in xs]), "index": index, "valid": index >= 0}

  ds = grain.MapDataset.range(num_batches * local).map(load).batch(local, batch_fn=stack)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                            prefetch_buffer_size=max(2 * local, num_threads)))
  return _with_workers(it, num_workers)
