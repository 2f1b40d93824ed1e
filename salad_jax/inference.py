"""The public inference API: `load`, `SaladModel.describe/features`, `preprocess`, converted dirs."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from salad_jax import convert
from salad_jax.data.images import load_image, normalize, resize
from salad_jax.models import vit
from salad_jax.models.vpr import ModelConfig, VPRModel, init_params

CONFIG_FILE = "salad_config.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1
SHAPE_FIELDS = {"variant", "registers", "num_clusters", "cluster_dim", "token_dim", "hidden_dim"}


def preprocess(image_or_path, size=(322, 322)) -> np.ndarray:
  """Image (path, PIL image or uint8 HWC array) -> float32 [H, W, 3], the reference eval transform.

  PIL bilinear resize to `size` (h, w) on the uint8 image, /255, ImageNet mean/std. A list of
  images gives a batch [B, H, W, 3]. `size=None` keeps the image's size.
  """
  if isinstance(image_or_path, (list, tuple)):
    return np.stack([preprocess(x, size) for x in image_or_path])
  if isinstance(image_or_path, (str, os.PathLike)):
    image = load_image(os.fspath(image_or_path))
  elif isinstance(image_or_path, Image.Image):
    image = image_or_path.convert("RGB")
  else:
    arr = np.asarray(image_or_path)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
      raise ValueError(f"expected an image path, a PIL image or a uint8 [H, W, 3] array; got "
                       f"{arr.dtype} array of shape {arr.shape}")
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
    self._describe = jax.jit(lambda p, x: self.module.apply({"params": p}, x))
    self._features = jax.jit(lambda p, x: self.module.apply({"params": p}, x, method=VPRModel.features))

  @property
  def descriptor_dim(self) -> int:
    return self.config.descriptor_dim

  def _check(self, images, min_patches: int) -> jax.Array:
    if isinstance(images, (list, tuple)):
      images = np.stack(images)
    shape = np.shape(images)
    vit.check_image_shape(shape, min_patches=min_patches)
    if shape[0] == 0:
      raise ValueError("empty batch: images has batch size 0")
    x = jnp.asarray(images, jnp.float32)
    return x

  def describe(self, images) -> np.ndarray:
    """float32 NHWC ImageNet-normalised images -> descriptors [B, D] (L2-normalised)."""
    x = self._check(images, self.config.num_clusters)
    if not bool(jnp.isfinite(x).all()):
      raise ValueError("images contain NaN or Inf values")
    return np.asarray(self._describe(self.params, x))

  def features(self, images) -> tuple[np.ndarray, np.ndarray]:
    """Backbone outputs after the final norm: [B, H/14, W/14, C] and the cls token [B, C]."""
    x = self._check(images, 0)
    f, t = self._features(self.params, x)
    return np.asarray(f), np.asarray(t)

  def to_torch(self, path: str) -> None:
    """Writes the params as an official-layout PyTorch state_dict (.pth/.ckpt or .safetensors)."""
    convert.write_torch_checkpoint(path, self.params, self.config)

  def save(self, directory: str, overwrite: bool = False) -> None:
    save_converted(directory, self.params, self.config, self.source, overwrite=overwrite)

  def assignment(self, images) -> np.ndarray:
    """Sinkhorn assignment [B, m+1, H/14, W/14] of normalised images; row m is the dustbin."""
    from salad_jax.models.vpr import assignment
    x = self._check(images, self.config.num_clusters)
    if not hasattr(self, "_assignment"):
      self._assignment = jax.jit(lambda p, x: assignment(self.module, p, x))
    return np.asarray(self._assignment(self.params, x))


# ------------------------------------------------------------------------------ converted dirs
def save_converted(directory: str, params: Mapping, config: ModelConfig,
                   source: Mapping | None = None, overwrite: bool = False) -> None:
  """Writes an Orbax params checkpoint + `salad_config.json` into `directory` (atomically)."""
  import orbax.checkpoint as ocp
  directory = os.path.abspath(directory)
  if os.path.exists(directory) and os.listdir(directory) and not overwrite:
    raise FileExistsError(f"{directory} exists and is not empty; pass overwrite=True "
                          "(--overwrite) to replace it")
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".salad_tmp_", dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)
  try:
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(tmp, PARAMS_DIR), jax.tree.map(np.asarray, dict(params)))
    ckptr.wait_until_finished()
    meta = {"format_version": FORMAT_VERSION, "model": config.to_dict(), "source": dict(source or {})}
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump(meta, f, indent=2)
    if os.path.exists(directory):
      old = directory + ".old"
      os.replace(directory, old)
      os.replace(tmp, directory)
      shutil.rmtree(old)
    else:
      os.replace(tmp, directory)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)


def restore_params(path: str) -> dict:
  """Restores an Orbax params tree saved with StandardSave, as numpy arrays on the host."""
  import orbax.checkpoint as ocp
  ckptr = ocp.StandardCheckpointer()
  meta = ckptr.metadata(path)
  tree = getattr(meta, "item_metadata", meta)
  target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), tree.tree if hasattr(tree, "tree") else tree)
  return ckptr.restore(path, target)


def load_converted(directory: str) -> tuple[dict, ModelConfig, dict]:
  with open(os.path.join(directory, CONFIG_FILE)) as f:
    meta = json.load(f)
  config = ModelConfig.from_dict(meta["model"])
  params = restore_params(os.path.join(os.path.abspath(directory), PARAMS_DIR))
  return params, config, meta.get("source", {})


def load(path: str, rng: jax.Array | None = None, **config_overrides: Any) -> SaladModel:
  """Loads a model for inference.

  `path`: a converted directory (`convert_weights.py`), a training workdir or one of its
  checkpoints (`train.py`), or a PyTorch `.ckpt/.pth` / `.safetensors` file (converted on the
  fly). A plain DINOv2 hub file gives the backbone with a freshly initialised head (from `rng`).
  `config_overrides` (e.g. dtype="bfloat16") replace fields of the stored model config that do not
  change parameter shapes.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(path, CONFIG_FILE)):
      params, config, source = load_converted(path)
    else:
      from salad_jax import checkpoint  # trainer checkpoints
      params, config, source = checkpoint.load_for_inference(path)
    if config_overrides:
      fixed = set(config_overrides) & SHAPE_FIELDS
      if fixed:
        raise ValueError(f"cannot override {sorted(fixed)} of a saved model: they fix the "
                         f"parameter shapes; overridable: dtype, attention, micro_batch, train_micro_batch, dropout")
      config = config.replace(**config_overrides)
    return SaladModel(params, config, source)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no checkpoint at {path}")
  params, config, backbone_only, source = convert.read_checkpoint(path, **config_overrides)
  if backbone_only:
    fresh = init_params(config, rng if rng is not None else jax.random.key(0))
    params = {"backbone": params["backbone"], "aggregator": jax.tree.map(np.asarray, fresh["aggregator"])}
  return SaladModel(params, config, source)
