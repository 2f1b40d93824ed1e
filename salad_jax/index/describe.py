"""`describe_folder`: the descriptors of every image under a folder, read as evaluation reads
them (`SaladModel.describe_folder` calls it)."""

from __future__ import annotations

import os
import sys

import numpy as np

from salad_jax.errors import UserError


def describe_folder(
  model, folder: str, image_size=(322, 322), batch_size: int = 32, progress: bool = True
) -> tuple[np.ndarray, list[str]]:
  """(descriptors [N, D] float32, paths) of the images under `folder`, found as evaluation finds
  them (recursive, sorted, .jpg/.jpeg/.png; `eval_sets.read_image_paths`).

  Loaded and resized as evaluation does (PIL bilinear, in threads while the model runs), in
  batches of one shape, min(batch_size, N), the last padded: one compilation per call.
  """
  from tqdm import tqdm

  from salad_jax.data import eval_sets, images, pipeline

  size = images.as_size(image_size)
  if batch_size < 1:
    raise UserError(f"batch_size {batch_size}: must be >= 1")
  model.config.check_image_shape((1,) + size + (3,))
  paths = eval_sets.read_image_paths(os.fspath(folder))
  batch = min(batch_size, len(paths))
  images.check_batch_memory(size, batch, "image_size")
  out = np.empty((len(paths), model.descriptor_dim), np.float32)
  data = pipeline.eval_dataset(paths, image_size=size, batch_size=batch)
  with tqdm(
    total=len(paths), desc="describe", unit="img", disable=not progress, file=sys.stderr
  ) as bar:
    for b in data:
      x = images.normalize(b["images"])  # padding rows are black images: valid inputs
      d = model.describe(x)
      keep = b["index"] >= 0
      out[b["index"][keep]] = d[keep]
      bar.update(int(keep.sum()))
  return out, paths
