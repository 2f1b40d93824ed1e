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
from salad_jax.models.config import ModelConfig
from salad_jax.models.vpr import (
  VPRModel,
  as_variables,
  assignment,
  init_variables,
  weights_of,
)
from salad_jax.weights import convert, converted, infer, run_checkpoints

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
  """A place-recognition model (any backbone x head) with its weights; `describe` and
  `features` are jitted per input shape. `batch_stats`: a ResNet's BatchNorm running
  statistics (eval mode uses them), None for DINOv2."""

  def __init__(
    self,
    params: Mapping,
    config: ModelConfig,
    source: Mapping | None = None,
    batch_stats: Mapping | None = None,
  ):
    if config.has_batch_stats and not batch_stats:
      raise UserError(
        f"{config.describe()} needs its BatchNorm statistics (batch_stats) beside the params"
      )
    self.params = params
    self.batch_stats = batch_stats if config.has_batch_stats else None
    self.config = config
    self.source = dict(source or {})
    self.module = VPRModel(config)
    # each call also returns the input's min, max and finiteness (fused: no extra round trip)
    self._describe = jax.jit(lambda w, x: (self.module.apply(as_variables(w), x), _min_max(x)))
    self._features = jax.jit(
      lambda w, x: (
        self.module.apply(as_variables(w), x, method=VPRModel.features),
        _min_max(x),
      )
    )

  @property
  def weights(self):
    """The params, or {"params", "batch_stats"} for a ResNet (what `vpr.as_variables` takes)."""
    return weights_of(self.params, self.batch_stats)

  @property
  def descriptor_dim(self) -> int:
    return self.config.descriptor_dim

  def _check(self, images, for_features: bool = False) -> tuple[jax.Array, bool]:
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
    # features need only what the backbone needs (small images too); describe, the head's too
    cfg = self.config.replace(aggregator="gem") if for_features else self.config
    cfg.check_image_shape(shape)
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
    x, single = self._check(images)
    desc, min_max = self._describe(self.weights, x)
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

  def features(self, images) -> tuple[np.ndarray, np.ndarray | None]:
    """Backbone outputs: the feature map [B, h, w, C] and the cls token [B, C] (DINOv2: after
    the final norm if the model applies it, `norm_layer`); a ResNet has no token (None). One
    image [H, W, 3]: [h, w, C] and [C]."""
    x, single = self._check(images, for_features=True)
    (f, t), min_max = self._features(self.weights, x)
    self._check_values(min_max)
    f, t = np.asarray(f), None if t is None else np.asarray(t)
    if single:
      return f[0], None if t is None else t[0]
    return f, t

  def to_torch(self, path: str, overwrite: bool = False) -> None:
    """Writes the weights as an official-layout PyTorch state_dict (.pth/.ckpt or .safetensors)
    that the official VPRModel loads with strict=True (a ResNet's BatchNorm buffers included).

    An existing file is replaced only with `overwrite`, and only if salad_jax wrote it.
    """
    convert.write_torch_checkpoint(
      path, self.params, self.config, overwrite=overwrite, batch_stats=self.batch_stats
    )

  def save(self, directory: str, overwrite: bool = False) -> None:
    """Writes a converted directory (`salad_jax.weights.converted`), loadable by `load`."""
    converted.save_converted(
      directory,
      self.params,
      self.config,
      self.source,
      overwrite=overwrite,
      batch_stats=self.batch_stats,
    )

  def assignment(self, images) -> np.ndarray:
    """SALAD's assignment [B, m+1, h, w] of normalised images; row m is the dustbin (one image
    [H, W, 3]: [m+1, h, w])."""
    x, single = self._check(images)
    if not hasattr(self, "_assignment"):
      self._assignment = jax.jit(lambda w, x: (assignment(self.module, w, x), _min_max(x)))
    out, min_max = self._assignment(self.weights, x)
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
  fly): an official VPRModel of any backbone x head (`infer.infer_config`), or a plain DINOv2
  hub / torchvision ResNet file, which gives the backbone with a freshly initialised head (from
  `rng`; the head named by `config_overrides`). `config_overrides` (e.g. dtype="bfloat16")
  replace fields of a saved model config that change neither its parameters nor its function;
  for a torch file they also decide what its keys leave open (e.g. salad_assignment="softmax").
  """
  path = os.fspath(path)  # local, or a URL (gs://...: salad_jax.files.paths)
  if paths.isdir(path):
    if paths.isfile(paths.join(path, converted.CONFIG_FILE)):
      params, batch_stats, config, source = converted.load_converted_weights(path)
    else:  # a train.py workdir
      params, batch_stats, config, source = run_checkpoints.load_weights(path)
    if config_overrides:
      fixed = {
        k
        for k, v in config_overrides.items()
        if k in ModelConfig.MODEL_FIELDS and v != getattr(config, k)
      }
      if fixed:
        raise ValueError(
          f"cannot override {sorted(fixed)} of a saved model: they fix the parameters or the "
          f"function it computes; overridable: dtype, attention, micro_batch, train_micro_batch, "
          f"dropout"
        )
      config = config.replace(**config_overrides)
    return SaladModel(params, config, source, batch_stats)
  if not paths.exists(path):
    raise FileNotFoundError(f"no checkpoint at {path}")
  variables, config, backbone_only, source = infer.read_checkpoint_variables(
    path, **config_overrides
  )
  if backbone_only:  # the head starts fresh; a ResNet's own BatchNorm statistics are the file's
    fresh = init_variables(config, rng if rng is not None else jax.random.key(0))
    for coll, tree in variables.items():
      fresh[coll] = {**jax.tree.map(np.asarray, fresh[coll]), "backbone": tree["backbone"]}
    variables = fresh
  return SaladModel(variables["params"], config, source, variables.get("batch_stats"))
