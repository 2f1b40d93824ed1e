"""GSV-Cities on disk (`Dataframes/<City>.csv` + `Images/<city_id>/<name>.jpg`) and the
reference's place sampler (places shuffled within each city, cities in list order, P x K).

CSV columns: place_id, year, month, northdeg, city_id, lat, lon, panoid (one row per image).
Image name: {city_id}_{place_id % 1e5 :07d}_{year:04d}_{month:02d}_{northdeg:03d}_{lat}_{lon}_{panoid}.jpg
with lat/lon as Python's shortest float repr. The city at list index i gets place_id + i * 10**5.
"""

from __future__ import annotations

import csv
import dataclasses
import os

import numpy as np
from PIL import Image

from salad_jax.data import images
from salad_jax.errors import UserError

# The 23 training cities of the SALAD / GSV-Cities recipe, in the reference's order.
TRAIN_CITIES = (
  "Bangkok",
  "BuenosAires",
  "LosAngeles",
  "MexicoCity",
  "OSL",
  "Rome",
  "Barcelona",
  "Chicago",
  "Madrid",
  "Miami",
  "Phoenix",
  "TRT",
  "Boston",
  "Lisbon",
  "Medellin",
  "Minneapolis",
  "PRG",
  "WashingtonDC",
  "Brussels",
  "London",
  "Melbourne",
  "Osaka",
  "PRS",
)
CITY_STRIDE = 10**5
COLUMNS = ("place_id", "year", "month", "northdeg", "city_id", "lat", "lon", "panoid")
HOW_TO_GET = (
  "GSV-Cities is at https://www.kaggle.com/datasets/amaralibey/gsv-cities (see "
  "github.com/amaralibey/gsv-cities); unpack it so that <root>/Dataframes/<City>.csv and "
  "<root>/Images/<city>/ exist, and pass --config.data.root=<root>"
)


def city_names(cities) -> tuple[str, ...]:
  """`config.data.cities`: a comma-separated string or a sequence -> tuple of names."""
  return tuple(c.strip() for c in cities.split(",")) if isinstance(cities, str) else tuple(cities)


def image_name(
  city_id: str,
  place_id: int,
  year: int,
  month: int,
  northdeg: int,
  lat: float,
  lon: float,
  panoid: str,
) -> str:
  return (
    f"{city_id}_{str(place_id % CITY_STRIDE).zfill(7)}_{str(year).zfill(4)}_"
    f"{str(month).zfill(2)}_{str(northdeg).zfill(3)}_{lat!r}_{lon!r}_{panoid}.jpg"
  )


@dataclasses.dataclass
class GSVCities:
  """Images of the kept places (>= min_img_per_place images), grouped by place."""

  root: str
  cities: tuple[str, ...]
  paths: np.ndarray  # [num_images] str, relative to root
  image_place: np.ndarray  # [num_images] position of the image's place in `place_ids`
  place_ids: np.ndarray  # [num_places] city-prefixed ids, CSV order within each city
  place_city: np.ndarray  # [num_places] index into `cities`
  place_start: (
    np.ndarray
  )  # [num_places + 1] images of place p: order[place_start[p]:place_start[p+1]]
  order: np.ndarray  # image indices grouped by place
  min_img_per_place: int

  @property
  def num_places(self) -> int:
    return len(self.place_ids)

  def place_images(self, p: int) -> np.ndarray:
    return self.order[self.place_start[p] : self.place_start[p + 1]]

  def image_path(self, i: int) -> str:
    return os.path.join(self.root, str(self.paths[i]))

  def image_name(self, i: int) -> str:
    """Image i for messages."""
    return self.image_path(i)

  def read_image(self, i: int) -> tuple[Image.Image, int]:
    """Image number i as training decodes it: (RGB image, images.OK or images.DAMAGED).

    A truncated or damaged JPEG decodes as the reference decodes it (PIL's
    LOAD_TRUNCATED_IMAGES, without the global); an unreadable file raises OSError or
    images.UnreadableImage, naming it.
    """
    path = self.image_path(i)
    return images.decode(images.read_file(path), path, damaged="allow")


def _read_city(path: str, city_index: int):
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
      raise ValueError(f"{path}: missing CSV columns {missing} (expected {list(COLUMNS)})")
    rows = list(reader)
  ids, names = [], []
  for r in rows:
    pid = int(r["place_id"])
    ids.append(pid + city_index * CITY_STRIDE)
    name = image_name(
      r["city_id"],
      pid,
      int(r["year"]),
      int(r["month"]),
      int(r["northdeg"]),
      float(r["lat"]),
      float(r["lon"]),
      r["panoid"],
    )
    names.append(os.path.join("Images", r["city_id"], name))
  return ids, names


class MissingCityError(UserError, FileNotFoundError):
  """A city's dataframe that is not there (one line, and which cities are)."""


def read_gsv_cities(root: str, cities=TRAIN_CITIES, min_img_per_place: int = 4) -> GSVCities:
  """Reads the dataframes of `cities` (in order) and keeps places with >= min_img_per_place images."""
  if not os.path.isdir(os.path.join(root, "Dataframes")):
    raise FileNotFoundError(
      f"GSV-Cities not found at {root!r}: no Dataframes/ folder. {HOW_TO_GET}"
    )
  cities = tuple(cities)
  if not cities:
    raise ValueError("no cities selected")
  all_ids, all_paths, all_city = [], [], []
  for i, city in enumerate(cities):
    path = os.path.join(root, "Dataframes", f"{city}.csv")
    if not os.path.isfile(path):
      have = sorted(
        f[:-4] for f in os.listdir(os.path.join(root, "Dataframes")) if f.endswith(".csv")
      )
      raise MissingCityError(
        f"city {city!r}: {path} not found (Dataframes/ has {len(have)} cities: "
        f"{', '.join(have[:8])}{', ...' if len(have) > 8 else ''})",
        "choose cities that are there: train.py --config.data.cities="
        + ",".join(have[:2] or ["City"])
        + ",... (the pack: --cities), or add the missing dataframe",
      )
    ids, names = _read_city(path, i)
    if max(ids, default=0) - i * CITY_STRIDE >= CITY_STRIDE:
      raise ValueError(f"{path}: place_id >= {CITY_STRIDE}; ids would collide across cities")
    all_ids += ids
    all_paths += names
    all_city += [i] * len(ids)
  ids = np.asarray(all_ids, np.int64)
  uniq, first, inverse, counts = np.unique(
    ids, return_index=True, return_inverse=True, return_counts=True
  )
  keep = counts >= min_img_per_place
  if not keep.any():
    raise ValueError(f"no place in {root} ({', '.join(cities)}) has >= {min_img_per_place} images")
  # places in order of first appearance (CSV order), kept ones only
  kept = np.flatnonzero(keep)
  kept = kept[np.argsort(first[kept], kind="stable")]
  pos_of = np.full(len(uniq), -1, np.int64)
  pos_of[kept] = np.arange(len(kept))
  image_place = pos_of[inverse]
  images = np.flatnonzero(image_place >= 0)
  order = images[np.argsort(image_place[images], kind="stable")]
  start = np.concatenate([[0], np.cumsum(counts[kept])])
  return GSVCities(
    root=root,
    cities=cities,
    paths=np.asarray(all_paths),
    image_place=image_place,
    place_ids=uniq[kept],
    place_city=np.asarray(all_city, np.int64)[first[kept]],
    place_start=start,
    order=order,
    min_img_per_place=min_img_per_place,
  )


def epoch_place_order(ds: GSVCities, seed: int, epoch: int) -> np.ndarray:
  """Place positions for one epoch, as the reference orders them.

  Per city (cities in list order) the image rows are shuffled and places are taken in order of
  their first appearance (pandas `sample(frac=1)` + `unique`), so places with more images tend
  to come earlier; the cities are concatenated. Rows are enumerated grouped by place before the
  shuffle, which gives the same distribution as the CSV order and makes the order independent of
  how the files list their rows (folder and TFDS readers agree).
  """
  out = []
  for c in range(len(ds.cities)):
    rows = ds.image_place[ds.order]
    rows = rows[ds.place_city[rows] == c]
    rng = np.random.default_rng([seed, epoch, c])
    shuffled = rows[rng.permutation(len(rows))]
    _, first = np.unique(shuffled, return_index=True)
    out.append(shuffled[np.sort(first)])
  return np.concatenate(out) if out else np.zeros(0, np.int64)


def sample_place_images(ds: GSVCities, place: int, k: int, rng: np.random.Generator) -> np.ndarray:
  """k distinct images of a place (without replacement), as image indices."""
  imgs = ds.place_images(place)
  return imgs[rng.choice(len(imgs), size=k, replace=False)]
