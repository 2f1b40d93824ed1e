"""The training data source named by `config.data`: GSV-Cities files, its TFDS ArrayRecord
build, or the embedded demo dataset (generated on first use)."""

from __future__ import annotations

import os

from salad_jax.data import demo, gsv_cities, pipeline
from salad_jax.errors import UserError
from salad_jax.files import paths


def open_source(config) -> gsv_cities.GSVCities:
  """Opens (and for the demo, first generates) the training set; clear errors before compiling."""
  d = config.data
  if d.source in ("folder", "demo") and paths.is_url(d.root):
    raise UserError(
      f"config.data.root={d.root}: GSV-Cities image folders (and the demo) are read from local "
      "disk",
      "pack them locally (python -m salad_jax.data.tfds_gsv), upload the pack and train with "
      "--config.data.source=tfds --config.data.tfds_data_dir=gs://...",
    )
  if d.source == "demo":
    demo.ensure(d.root, seed=d.demo_seed)
  if d.source in ("folder", "demo"):
    cities = gsv_cities.city_names(d.cities)
    if not os.path.isdir(d.root):
      raise FileNotFoundError(f"GSV-Cities root {d.root!r} does not exist. {gsv_cities.HOW_TO_GET}")
    return gsv_cities.read_gsv_cities(d.root, cities, d.min_img_per_place)
  if d.source == "tfds":
    from salad_jax.data import tfds_gsv  # defers tensorflow_datasets

    if not d.tfds_data_dir:
      raise UserError(
        "config.data.source=tfds needs config.data.tfds_data_dir",
        "pack the data with `python -m salad_jax.data.tfds_gsv --manual_dir "
        "<GSVCities> --data_dir <dir> --image_size 224,224` and pass "
        "--config.data.tfds_data_dir=<dir>",
      )
    ds = tfds_gsv.open_gsv_cities(d.tfds_data_dir, d.min_img_per_place, tuple(d.image_size))
    if sorted(ds.cities) != sorted(gsv_cities.city_names(d.cities)):  # the order: the pack's
      raise UserError(
        f"the pack {ds.root} holds the cities {','.join(ds.cities)}, but "
        f"config.data.cities lists {','.join(gsv_cities.city_names(d.cities))}",
        "set --config.data.cities to the packed cities, or pack the cities you train on (--cities)",
      )
    return ds
  raise ValueError(f"config.data.source must be 'folder', 'tfds' or 'demo', got {d.source!r}")


def make_iterator(config, source, process_index: int, process_count: int):
  d = config.data
  ds, spec = pipeline.train_dataset(
    source,
    places_per_batch=d.places_per_batch,
    img_per_place=d.img_per_place,
    image_size=tuple(d.image_size),
    num_epochs=config.num_epochs,
    seed=config.seed,
    process_index=process_index,
    process_count=process_count,
    num_workers=d.num_workers,
    num_threads=d.num_threads,
    randaugment=d.randaugment,
  )
  return iter(ds), spec
