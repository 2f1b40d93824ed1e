"""The GSV-Cities pack's format: its TFDS builder, record features, names and location.

Written by `salad_jax.data.pack` (the builder links the finished shards in and records the splits
and metadata); read by `salad_jax.data.tfds_gsv`.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from salad_jax.data import gsv_cities, images
from salad_jax.errors import UserError

NAME = "gsv_cities"
VERSION = "2.0.0"  # 1.0.0 held one record per place
FORMAT = 2


def config_name(image_size) -> str:
  return "jpeg" if image_size is None else "{}x{}".format(*images.as_size(image_size))


def features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict(
    {
      # raw uint8 [H, W, 3] bytes (a resized pack) or the file's bytes (a JPEG pack)
      "image": tfds.features.Tensor(shape=(), dtype=np.object_),
      "status": np.int64,  # images.OK / DAMAGED (decoded with grey fill) / UNREADABLE (black)
      "name": tfds.features.Text(),  # Images/<city>/<file>.jpg
      "place": np.int64,  # index of the image's place in the metadata lists
    }
  )


class GsvCities(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """GSV-Cities (Ali-bey et al.), one example per image. Written by `salad_jax.data.pack`:
  `_download_and_prepare` links its finished shards in and records the splits and metadata."""

  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {
    "2.0.0": "One record per image; optional pre-resized raw uint8 images.",
    "1.0.0": "One record per place (JPEG bytes).",
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = gsv_cities.HOW_TO_GET
  BUILDER_CONFIGS = [
    tfds.core.BuilderConfig(name="jpeg", description="original JPEG bytes"),
    tfds.core.BuilderConfig(name="224x224", description="images resized to 224x224 (raw uint8)"),
  ]

  def __init__(self, *, image_size=None, staged=None, **kwargs):
    self._staged = staged  # pack.Staged: finished shards, their lengths and the metadata
    name = config_name(image_size)
    config = (
      name
      if name in {c.name for c in self.BUILDER_CONFIGS}
      else tfds.core.BuilderConfig(
        name=name, description="images resized to {} (raw uint8)".format(name)
      )
    )
    super().__init__(config=config, file_format="array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="GSV-Cities image records for SALAD training (salad_jax).",
      features=features(),
      metadata=tfds.core.MetadataDict(),
      disable_shuffling=True,
    )  # keep place order: the sampler reproduces the reference's

  def _download_and_prepare(self, dl_manager, download_config=None) -> None:
    staged = self._staged
    if staged is None:
      raise UserError("build GSV-Cities records with `python -m salad_jax.data.tfds_gsv`")
    template = self._get_filename_template(split_name="train")
    targets = template.sharded_filepaths(len(staged.shards))
    for src, dst in zip(staged.shards, targets):
      try:  # a hard link keeps the staged shard until the dataset is complete
        os.link(src, dst)
      except OSError:
        os.replace(src, dst)
    self.info.metadata.update(staged.metadata)
    split = tfds.core.SplitInfo(
      name="train",
      shard_lengths=list(staged.lengths),
      num_bytes=int(sum(os.path.getsize(t) for t in targets)),
      filename_template=template,
    )
    self.info.set_splits(tfds.core.SplitDict([split]))

  def _split_generators(self, dl_manager):  # pragma: no cover - written by _download_and_prepare
    raise NotImplementedError

  def _generate_examples(self):  # pragma: no cover
    raise NotImplementedError


def pack_dir(data_dir: str, image_size=None) -> str:
  return os.path.join(data_dir, NAME, config_name(image_size), VERSION)
