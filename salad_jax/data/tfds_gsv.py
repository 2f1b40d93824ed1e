"""A tensorflow-datasets builder that packs GSV-Cities into ArrayRecord files, one record per place.

  python -m salad_jax.data.tfds_gsv --manual_dir /data/GSVCities --data_dir /data/tfds

Then train with `--config.data.source=tfds --config.data.tfds_data_dir=/data/tfds`: the same
sampler, augmentation and batches as the folder reader, read through `tfds.data_source` (random
access, grain-friendly, no tensorflow needed). Each record holds one place's encoded JPEGs, so a
place batch is P record reads; records keep the generation order (cities in list order, places
in CSV order), and the place index is stored in the dataset's metadata.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from salad_jax.data import gsv_cities

NAME = "gsv_cities"
VERSION = "1.0.0"


class GsvCities(tfds.core.GeneratorBasedBuilder):
  """GSV-Cities (Ali-bey et al.), one example per place: its images as encoded bytes."""

  VERSION = tfds.core.Version(VERSION)
  MANUAL_DOWNLOAD_INSTRUCTIONS = gsv_cities.HOW_TO_GET

  def __init__(self, *args, cities=None, **kwargs):
    self._cities = tuple(cities) if cities else None
    super().__init__(*args, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="GSV-Cities place records for SALAD training (salad_jax).",
        features=tfds.features.FeaturesDict({
            "place_id": np.int64,  # city-prefixed, as the reference: city index * 1e5 + id
            "city": tfds.features.Text(),
            "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
            "names": tfds.features.Sequence(tfds.features.Text()),
        }),
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,  # keep place order: the sampler reproduces the reference's
    )

  def _cities_in(self, root: str) -> tuple[str, ...]:
    if self._cities:
      return self._cities
    present = {os.path.splitext(f)[0] for f in os.listdir(os.path.join(root, "Dataframes"))
               if f.endswith(".csv")}
    ordered = [c for c in gsv_cities.TRAIN_CITIES if c in present]
    return tuple(ordered + sorted(present - set(ordered)))

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    ds = gsv_cities.read_gsv_cities(root, self._cities_in(root), min_img_per_place=1)
    counts = np.diff(ds.place_start)
    self.info.metadata.update({
        "cities": list(ds.cities), "place_ids": [int(x) for x in ds.place_ids],
        "place_city": [int(x) for x in ds.place_city], "num_images": [int(x) for x in counts]})
    return {"train": self._generate_examples(ds)}

  def _generate_examples(self, ds: gsv_cities.GSVCities):
    for p in range(ds.num_places):
      idx = ds.place_images(p)
      images = []
      for i in idx:
        with open(ds.image_path(i), "rb") as f:
          images.append(f.read())
      yield p, {"place_id": int(ds.place_ids[p]), "city": ds.cities[int(ds.place_city[p])],
                "images": images, "names": [os.path.basename(str(ds.paths[i])) for i in idx]}


def build(manual_dir: str, data_dir: str, cities=None) -> str:
  builder = GsvCities(data_dir=data_dir, file_format="array_record", cities=cities)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder.data_dir


class TfdsGSVCities(gsv_cities.GSVCities):
  """The GSV-Cities interface over a `tfds.data_source` of place records."""

  source = None

  def image_path(self, i: int) -> str:
    return f"tfds:{NAME}[{self.image_place[i]}]/{self.paths[i]}"

  def open_image(self, i: int) -> Image.Image:
    import io
    place = int(self.image_place[i])
    if getattr(self, "_last", (None,))[0] != place:
      self._last = (place, self.source[place]["images"])
    j = int(i - self.place_start[place])
    with Image.open(io.BytesIO(self._last[1][j])) as im:
      return im.convert("RGB")


def open_gsv_cities(data_dir: str, min_img_per_place: int = 4) -> TfdsGSVCities:
  """Opens a built dataset (data_dir as passed to `build`) with the reader's interface."""
  path = os.path.join(data_dir, NAME, VERSION)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no {NAME} TFDS build in {data_dir}; build it with `python -m "
                            f"salad_jax.data.tfds_gsv --manual_dir <GSVCities> --data_dir {data_dir}`")
  builder = tfds.builder_from_directory(path)
  meta = builder.info.metadata
  counts = np.asarray(meta["num_images"], np.int64)
  keep = counts >= min_img_per_place
  if not keep.any():
    raise ValueError(f"no place in {path} has >= {min_img_per_place} images")
  # image numbering: all images of record r are place_start[r] ... place_start[r+1] - 1; the
  # kept places are renumbered 0..P-1 and their records looked up through `record_of`.
  records = np.flatnonzero(keep)
  kept_counts = counts[records]
  start = np.concatenate([[0], np.cumsum(kept_counts)])
  image_place = np.repeat(np.arange(len(records)), kept_counts)
  ds = TfdsGSVCities(root=path, cities=tuple(meta["cities"]),
                     paths=np.asarray([f"{k}" for k in range(int(start[-1]))]),
                     image_place=image_place, place_ids=np.asarray(meta["place_ids"], np.int64)[records],
                     place_city=np.asarray(meta["place_city"], np.int64)[records],
                     place_start=start, order=np.arange(int(start[-1])),
                     min_img_per_place=min_img_per_place)
  ds.source = _RecordView(builder.as_data_source(split="train"), records)
  return ds


class _RecordView:
  """Kept place k -> record records[k] of the data source (picklable for grain workers)."""

  def __init__(self, source, records):
    self.source, self.records = source, records

  def __getitem__(self, k):
    return self.source[int(self.records[k])]


if __name__ == "__main__":
  import argparse
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--manual_dir", required=True, help="GSV-Cities root (Dataframes/, Images/)")
  ap.add_argument("--data_dir", required=True, help="TFDS data dir to write")
  ap.add_argument("--cities", default="", help="comma-separated subset (default: all CSVs present)")
  a = ap.parse_args()
  print(build(a.manual_dir, a.data_dir, [c for c in a.cities.split(",") if c] or None))
