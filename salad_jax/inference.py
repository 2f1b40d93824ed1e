"""The public inference API: `load`, `SaladModel.describe/describe_folder/features/assignment`,
`preprocess`."""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from salad_jax.data.images import (
  IMAGENET_MEAN,
  IMAGENET_STD,
  as_size,
  load_image,
  normalize,
  resize,
  to_rgb,
)
from salad_jax.errors import UserError
from salad_jax.files import paths
from salad_jax.models import vit
from salad_jax.models.vpr import ModelConfig, VPRModel, assignment, init_params
from salad_jax.weights import convert, converted, run_checkpoints

# The values an ImageNet-normalised image can hold ([0, 1] -> [-2.118, 2.640]), with a margin for
# resampling after normalisation (bilinear cannot overshoot; bicubic a little).
NORMALISED_RANGE = (
  float(np.min(-IMAGENET_MEAN / IMAGENET_STD)),
  float(np.max((1 - IMAGENET_MEAN) / IMAGENET_STD)),
)
RANGE_MARGIN = 0.1


def preprocess(image_or_path, size=(322, 322)) -> np.ndarray:
  """Image (path, PIL image or uint8 HWC array) -> float32 [H, W, 3], the reference eval transform.

  PIL bilinear resize to `size` (h, w) on the uint8 image, /255, ImageNet mean/std. A list of
  images gives a batch [N, H, W, 3] (of one size: give `size`). `SaladModel.describe` takes
  either: one image [H, W, 3] gives one descriptor [D], a batch gives [N, D].
  """
  if isinstance(image_or_path, (list, tuple)):
    if not image_or_path:
      raise UserError(
        "preprocess: empty list of images",
        "give at least one image path, PIL image or uint8 [H, W, 3] array",
      )
    if size is not None:
      as_size(size)  # a bad size is an error before any image is read
    return np.stack([preprocess(x, size) for x in image_or_path])
  if isinstance(image_or_path, (str, os.PathLike)):
    image = load_image(os.fspath(image_or_path))
  elif isinstance(image_or_path, Image.Image):
    image = to_rgb(image_or_path, "the PIL image")
  else:
    arr = np.asarray(image_or_path)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
      raise ValueError(
        f"expected an image path, a PIL image or a uint8 [H, W, 3] array; got "
        f"{arr.dtype} array of shape {arr.shape}"
      )
    image = Image.fromarray(arr)
  if size is not None:
    image = resize(image, size)
  return normalize(image)


# ------------------------------------------------------------------------------ the model
class SaladModel:
  """A SALAD model with its params; `describe` and `features` are jitted per input shape."""

  def __init__(self, params: Mapping, config: ModelConfig, source: Mapping | None = None):
    self.params = params
    self.config = config
    self.source = dict(source or {})
    self.module = VPRModel(config)
    # each call also returns the input's min, max and finiteness (fused: no extra round trip)
    self._describe = jax.jit(lambda p, x: (self.module.apply({"params": p}, x), _min_max(x)))
    self._features = jax.jit(
      lambda p, x: (self.module.apply({"params": p}, x, method=VPRModel.features), _min_max(x))
    )

  @property
  def descriptor_dim(self) -> int:
    return self.config.descriptor_dim

  def _check(self, images, min_patches: int) -> tuple[jax.Array, bool]:
    """Shape and dtype of one image [H, W, 3] or a batch [B, H, W, 3] -> (float32 batch, whether
    it was one image). Its values are checked by `_check_values` on the min and max that the
    jitted call returns with its result."""
    if isinstance(images, (list, tuple)):
      images = np.stack(images)
    shape = np.shape(images)
    if len(shape) not in (3, 4):
      raise ValueError(
        f"images must be one image [H, W, 3] or a batch [B, H, W, 3] (NHWC), got shape {shape}"
      )
    single = len(shape) == 3
    if single:
      images, shape = images[None], (1,) + shape
    vit.check_image_shape(shape, min_patches=min_patches)
    if shape[0] == 0:
      raise ValueError("empty batch: images has batch size 0")
    dtype = images.dtype if hasattr(images, "dtype") else np.asarray(images).dtype
    if not jnp.issubdtype(dtype, jnp.floating):
      raise UserError(
        f"images are {dtype}; the model takes float images normalised with the "
        "ImageNet mean and std",
        "salad_jax.preprocess(path, PIL image or uint8 array) makes them",
      )
    return jnp.asarray(images, jnp.float32), single

  @staticmethod
  def _check_values(min_max) -> None:
    """Finite, and within the range an ImageNet-normalised image can have."""
    lo, hi, finite = (float(v) for v in np.asarray(min_max))
    if not (finite and np.isfinite(lo) and np.isfinite(hi)):
      raise UserError("images contain NaN or Inf values")
    (a, b), m = NORMALISED_RANGE, RANGE_MARGIN
    if lo < a - m or hi > b + m:
      raise UserError(
        f"images hold values in [{lo:.4g}, {hi:.4g}], outside [{a:.3f}, {b:.3f}], the "
        "range of ImageNet-normalised images (uint8 or [0, 255] pixels?)",
        "salad_jax.preprocess(path, PIL image or uint8 array) normalises images",
      )

  def describe(self, images) -> np.ndarray:
    """float32 ImageNet-normalised images (`preprocess`) -> L2-normalised descriptors: a batch
    [B, H, W, 3] gives [B, D], one image [H, W, 3] gives one descriptor [D]."""
    x, single = self._check(images, self.config.num_clusters)
    desc, min_max = self._describe(self.params, x)
    self._check_values(min_max)
    return np.asarray(desc[0] if single else desc)

  def describe_folder(
    self, folder: str, image_size=(322, 322), batch_size: int = 32, progress: bool = True
  ) -> tuple[np.ndarray, list[str]]:
    """(descriptors [N, D] float32, image paths) of every image under `folder` (recursive,
    sorted, .jpg/.jpeg/.png), read and resized as evaluation does, with a progress bar on
    stderr. For `salad_jax.Index(descriptors, paths)`; see `salad_jax.index.describe_folder`."""
    from salad_jax.index import describe_folder

    return describe_folder(self, folder, image_size, batch_size, progress)

  def features(self, images) -> tuple[np.ndarray, np.ndarray]:
    """Backbone outputs after the final norm: [B, H/14, W/14, C] and the cls token [B, C] (one
    image [H, W, 3]: [H/14, W/14, C] and [C])."""
    x, single = self._check(images, 0)
    (f, t), min_max = self._features(self.params, x)
    self._check_values(min_max)
    return (np.asarray(f[0]), np.asarray(t[0])) if single else (np.asarray(f), np.asarray(t))

  def to_torch(self, path: str, overwrite: bool = False) -> None:
    """Writes the params as an official-layout PyTorch state_dict (.pth/.ckpt or .safetensors).

    An existing file is replaced only with `overwrite`, and only if salad_jax wrote it.
    """
    convert.write_torch_checkpoint(path, self.params, self.config, overwrite=overwrite)

  def save(self, directory: str, overwrite: bool = False) -> None:
    """Writes a converted directory (`salad_jax.weights.converted`), loadable by `load`."""
    converted.save_converted(directory, self.params, self.config, self.source, overwrite=overwrite)

  def assignment(self, images) -> np.ndarray:
    """Sinkhorn assignment [B, m+1, H/14, W/14] of normalised images; row m is the dustbin (one
    image [H, W, 3]: [m+1, H/14, W/14])."""
    x, single = self._check(images, self.config.num_clusters)
    if not hasattr(self, "_assignment"):
      self._assignment = jax.jit(lambda p, x: (assignment(self.module, p, x), _min_max(x)))
    out, min_max = self._assignment(self.params, x)
    self._check_values(min_max)
    return np.asarray(out[0] if single else out)


@jax.jit
def _min_max(x):
  """[min, max, all finite] of a batch (XLA's min/max may skip NaN: finiteness is its own flag)."""
  return jnp.stack([jnp.min(x), jnp.max(x), jnp.all(jnp.isfinite(x))]).astype(jnp.float32)


def check_checkpoint_exists(path: str, flag: str = "--checkpoint") -> None:
  """A checkpoint argument that names nothing is one line saying what it may name."""
  if not paths.exists(path):
    raise UserError(
      f"{flag} {path} does not exist",
      "give a converted dir (convert_weights.py), "
      "a train.py workdir, or a .ckpt/.pth/.safetensors file",
    )


def load(path: str, rng: jax.Array | None = None, **config_overrides: Any) -> SaladModel:
  """Loads a model for inference.

  `path`: a converted directory (`convert_weights.py`), a training workdir or one of its
  checkpoints (`train.py`), or a PyTorch `.ckpt/.pth` / `.safetensors` file (converted on the
  fly). A plain DINOv2 hub file gives the backbone with a freshly initialised head (from `rng`).
  `config_overrides` (e.g. dtype="bfloat16") replace fields of the stored model config that do not
  change parameter shapes.
  """
  path = os.fspath(path)  # local, or a URL (gs://...: salad_jax.files.paths)
  if paths.isdir(path):
    if paths.isfile(paths.join(path, converted.CONFIG_FILE)):
      params, config, source = converted.load_converted(path)
    else:
      params, config, source = run_checkpoints.load_for_inference(path)  # a train.py workdir
    if config_overrides:
      fixed = set(config_overrides) & set(ModelConfig.SHAPE_FIELDS)
      if fixed:
        raise ValueError(
          f"cannot override {sorted(fixed)} of a saved model: they fix the "
          f"parameter shapes; overridable: dtype, attention, micro_batch, train_micro_batch, dropout"
        )
      config = config.replace(**config_overrides)
    return SaladModel(params, config, source)
  if not paths.exists(path):
    raise FileNotFoundError(f"no checkpoint at {path}")
  params, config, backbone_only, source = convert.read_checkpoint(path, **config_overrides)
  if backbone_only:
    fresh = init_params(config, rng if rng is not None else jax.random.key(0))
    params = {
      "backbone": params["backbone"],
      "aggregator": jax.tree.map(np.asarray, fresh["aggregator"]),
    }
  return SaladModel(params, config, source)
