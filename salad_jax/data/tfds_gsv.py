r"""GSV-Cities as a tensorflow-datasets ArrayRecord dataset, one record per image.

  python -m salad_jax.data.tfds_gsv --manual_dir /data/GSVCities --data_dir /data/tfds \
      --image_size 224,224

With `--image_size H,W` each image is stored already resized by the training resize (the same
decode and PIL call, `images.resize`), as raw uint8: training then skips the JPEG decode and the
resize, and its batches are bit-identical to those read from the files (same seed, same images,
labels and losses). Without it the records hold the original JPEG bytes. Train with
`--config.data.source=tfds --config.data.tfds_data_dir=/data/tfds`; `config.data.image_size` must
equal the packed size (or a JPEG pack is used).

Records are in place order (cities in list order, places and images in CSV order); the place
index and the pack's size are in the dataset's metadata. `tfds.builder_from_directory` and
`as_data_source` read it (random access, grain-friendly, no tensorflow needed). The parallel,
resumable writing is in `salad_jax.data.pack`, the format in `salad_jax.data.pack_records`.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from salad_jax.data import gsv_cities, images, pack
from salad_jax.data.pack_records import FORMAT, NAME, VERSION, pack_dir
from salad_jax.errors import UserError
from salad_jax.files import paths


# ------------------------------------------------------------------------------ reading
class CorruptRecordError(UserError):
  """A record of a pack that cannot be read back as the image it should hold."""


REBUILD = "the pack is damaged: delete its directory and pack the data again"


def check_shards(builder, path: str) -> None:
  """Each shard file holds the number of records the dataset info says (a cut or missing file
  reads as empty records otherwise)."""
  from array_record.python import array_record_module

  split = builder.info.splits["train"]
  for f, n in zip(split.filepaths, split.shard_lengths):
    try:
      got = array_record_module.ArrayRecordReader(os.fspath(f)).num_records()
    except Exception as e:  # noqa: BLE001
      raise CorruptRecordError(f"cannot read shard {f}: {e}", REBUILD) from e
    if got != n:
      raise CorruptRecordError(f"shard {f} holds {got} records, expected {n}", REBUILD)


def _parse(source, i: int) -> dict:
  """Record i of a tfds ArrayRecord data source. The tf.Example is parsed directly with the
  proto class tfds uses (~50 us less per 224x224 image than tfds's generic deserializer);
  `source[i]` is the fallback if that class moves."""
  if _EXAMPLE is None or not hasattr(source, "data_source"):
    rec = source[i]
    return {"image": rec["image"], "status": rec["status"], "name": rec["name"]}
  raw = source.data_source[i]
  if not raw:
    return {}
  f = _EXAMPLE.FromString(raw).features.feature
  return {
    "image": f["image"].bytes_list.value[0],
    "status": f["status"].int64_list.value[0],
    "name": f["name"].bytes_list.value[0],
  }


try:
  from tensorflow_datasets.core.example_parser import tf_example_pb2 as _pb2

  _EXAMPLE = _pb2.Example
except ImportError:  # pragma: no cover
  _EXAMPLE = None


def _text(x) -> str:
  return x.decode() if isinstance(x, bytes) else str(x)


class TfdsGSVCities(gsv_cities.GSVCities):
  """The GSV-Cities interface over a `tfds.data_source` of image records (image i = record i)."""

  source = None
  image_size: tuple[int, int] | None = None  # the packed size; None: JPEG bytes

  def image_path(self, i: int) -> str:
    return f"{self.root}[record {int(i)}]"

  def image_name(self, i: int) -> str:
    """The source file of record i, for messages (reads the record)."""
    try:
      return f"{self.image_path(i)} ({_text(_parse(self.source, int(i))['name'])})"
    except Exception:  # noqa: BLE001 - a message helper; the read error is reported elsewhere
      return self.image_path(i)

  def _record(self, i: int) -> dict:
    """Record i as {"image", "status", "name"}, or CorruptRecordError naming it."""
    try:
      rec = _parse(self.source, int(i))
    except Exception as e:  # noqa: BLE001 - any failure to read a record back is corruption
      raise CorruptRecordError(
        f"corrupt record {int(i)} in {self.root}: {type(e).__name__}: {e}", REBUILD
      ) from e
    data, name = rec.get("image"), rec.get("name")
    if name is None or not isinstance(data, bytes):  # array_record reads b"" past a cut file
      raise CorruptRecordError(f"corrupt record {int(i)} in {self.root}: empty", REBUILD)
    if self.image_size is not None and len(data) != self.image_size[0] * self.image_size[1] * 3:
      raise CorruptRecordError(
        f"corrupt record {int(i)} ({_text(name)}) in {self.root}: {len(data)} bytes, expected a "
        f"{self.image_size[0]}x{self.image_size[1]}x3 image",
        REBUILD,
      )
    return rec

  def read_array(self, i: int) -> tuple[np.ndarray, int]:
    """A resized pack's image i as a read-only uint8 [H, W, 3] view of its record, and status."""
    rec = self._record(i)
    return np.frombuffer(rec["image"], np.uint8).reshape(self.image_size + (3,)), int(rec["status"])

  def read_image(self, i: int) -> tuple[Image.Image, int]:
    rec = self._record(i)
    if self.image_size is None:  # JPEG bytes: decoded as the file would be
      return images.decode(
        rec["image"], f"{self.image_path(i)} ({_text(rec['name'])})", damaged="allow"
      )
    h, w = self.image_size
    return Image.frombuffer("RGB", (w, h), rec["image"], "raw", "RGB", 0, 1), int(rec["status"])


def find_pack(data_dir: str, image_size) -> str:
  """The pack for `image_size` under data_dir (or data_dir itself if it is one): the one resized
  to that size, else the JPEG one; a clear error when only other sizes exist."""
  if paths.isfile(paths.join(data_dir, "dataset_info.json")):  # local or gs://
    return data_dir
  for size in (image_size, None):
    path = pack_dir(data_dir, size)
    if paths.isfile(paths.join(path, "dataset_info.json")):
      return path
  root = paths.join(data_dir, NAME)
  found = sorted(
    d
    for d in (paths.listdir(root) if paths.isdir(root) else [])
    if paths.isfile(paths.join(root, d, VERSION, "dataset_info.json"))
  )
  build = (
    "python -m salad_jax.data.tfds_gsv --manual_dir <GSVCities> --data_dir "
    f"{data_dir} --image_size {image_size[0]},{image_size[1]}"
  )
  if found:
    raise UserError(
      f"{data_dir} holds GSV-Cities packs resized to {', '.join(found)}, but "
      f"config.data.image_size is {image_size[0]}x{image_size[1]}",
      f"set --config.data.image_size to a packed size, or pack it: {build}",
    )
  if paths.isfile(paths.join(root, "1.0.0", "dataset_info.json")):
    raise UserError(
      f"{root}/1.0.0 was built by an older salad_jax (one record per place)",
      f"build the current format: {build}",
    )
  raise FileNotFoundError(f"no {NAME} TFDS build in {data_dir}; build it with `{build}`")


def open_gsv_cities(data_dir: str, min_img_per_place: int = 4, image_size=None) -> TfdsGSVCities:
  """Opens a pack with the reader's interface. `image_size` (the training size) must equal the
  packed size of a resized pack; a JPEG pack fits any size."""
  path = find_pack(data_dir, images.as_size(image_size) if image_size is not None else None)
  builder = tfds.builder_from_directory(path)
  meta = builder.info.metadata
  if meta.get("format") != FORMAT:
    raise UserError(
      f"{path} is not a salad_jax GSV-Cities pack of format {FORMAT}",
      "build it again with `python -m salad_jax.data.tfds_gsv`",
    )
  packed = tuple(meta["image_size"]) if meta.get("image_size") else None
  if packed is not None and image_size is not None and packed != images.as_size(image_size):
    raise UserError(
      f"{path} holds images resized to {packed[0]}x{packed[1]}, but "
      f"config.data.image_size is {image_size[0]}x{image_size[1]}",
      "set --config.data.image_size to the packed size, or pack the data at this "
      "size (--image_size H,W)",
    )
  counts = np.asarray(meta["num_images"], np.int64)
  total = builder.info.splits["train"].num_examples
  if total != counts.sum():
    raise UserError(
      f"{path} is incomplete: {total} records, its metadata lists {counts.sum()}",
      "delete it and build it again",
    )
  check_shards(builder, path)
  keep = counts >= min_img_per_place
  if not keep.any():
    raise ValueError(f"no place in {path} has >= {min_img_per_place} images")
  records = np.flatnonzero(keep)  # kept places, renumbered 0..P-1 in record order
  first = np.concatenate([[0], np.cumsum(counts)])[:-1]
  order = np.concatenate([np.arange(first[r], first[r] + counts[r]) for r in records])
  image_place = np.full(int(total), -1, np.int64)
  image_place[order] = np.repeat(np.arange(len(records)), counts[records])
  ds = TfdsGSVCities(
    root=path,
    cities=tuple(meta["cities"]),
    paths=np.arange(int(total)),
    image_place=image_place,
    place_ids=np.asarray(meta["place_ids"], np.int64)[records],
    place_city=np.asarray(meta["place_city"], np.int64)[records],
    place_start=np.concatenate([[0], np.cumsum(counts[records])]),
    order=order,
    min_img_per_place=min_img_per_place,
  )
  ds.source = builder.as_data_source(split="train")
  ds.image_size = packed
  return ds


def build(manual_dir: str, data_dir: str, cities=None, image_size=None, **kwargs) -> str:
  """Packs GSV-Cities (see `salad_jax.data.pack.pack`); returns the pack's directory."""
  return pack.pack(manual_dir, data_dir, cities=cities, image_size=image_size, **kwargs)


def main(argv) -> None:
  from absl import flags

  from salad_jax import cli

  cli.quiet_logs()
  f = flags.FLAGS
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {argv[1:]}")
  size = None
  if f.image_size:
    try:
      size = tuple(int(x) for x in f.image_size.split(","))
      assert len(size) == 2 and min(size) > 0
    except (ValueError, AssertionError):
      raise UserError(f"--image_size {f.image_size!r}: expected H,W (e.g. 224,224)") from None
    from salad_jax.models import config as model_config

    try:  # train.py refuses other sizes: do not pack hours of images it cannot use
      model_config.ModelConfig(backbone=f.backbone, aggregator="gem").check_image_shape(
        (1,) + size + (3,)
      )
    except ValueError as e:
      raise UserError(
        f"--image_size {f.image_size}: {e}",
        "the paper trains at 224,224; a ResNet takes any size (e.g. --backbone=resnet50 for "
        "MixVPR's 320,320)",
      ) from None
  build(
    f.manual_dir,
    f.data_dir,
    [c for c in f.cities.split(",") if c] or None,
    size,
    num_workers=f.num_workers,
    compression=f.compression,
    images_per_shard=f.images_per_shard,
  )


if __name__ == "__main__":
  from absl import flags

  from salad_jax import cli

  flags.DEFINE_string("manual_dir", None, "GSV-Cities root (Dataframes/, Images/).")
  flags.DEFINE_string("data_dir", None, "TFDS data dir to write.")
  flags.DEFINE_string(
    "image_size",
    "",
    "H,W: store images resized to this size (the training "
    "size, e.g. 224,224); empty: store the JPEG files as they are.",
  )
  flags.DEFINE_string(
    "backbone",
    "dinov2",
    "The backbone the pack is for: dinov2 needs --image_size in multiples of 14, a ResNet "
    "(e.g. resnet50) takes any size.",
  )
  flags.DEFINE_string("cities", "", "Comma-separated subset (default: all CSVs present).")
  flags.DEFINE_integer("num_workers", 0, "Worker processes (0: one per CPU core).")
  flags.DEFINE_integer(
    "images_per_shard", 1000, "Images per shard file (the unit of resuming).", lower_bound=1
  )
  flags.DEFINE_enum(
    "compression",
    "none",
    ["none", "zstd"],
    "Record compression: none reads fastest; zstd is ~17% smaller on disk for raw images.",
  )
  flags.mark_flags_as_required(["manual_dir", "data_dir"])
  cli.run(main)
