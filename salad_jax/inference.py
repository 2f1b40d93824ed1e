"""The public inference API: `load`, `SaladModel.describe/features`, `preprocess`, converted dirs."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from PIL import Image

from salad_jax import convert, integrity, weights
from salad_jax.data.images import (IMAGENET_MEAN, IMAGENET_STD, as_size, load_image, normalize,
                                   resize, to_rgb)
from salad_jax.errors import UserError
from salad_jax.models import vit
from salad_jax.models.vpr import ModelConfig, VPRModel, init_params

CONFIG_FILE = "salad_config.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1
SHAPE_FIELDS = {"variant", "registers", "num_clusters", "cluster_dim", "token_dim", "hidden_dim"}
# The values an ImageNet-normalised image can hold ([0, 1] -> [-2.118, 2.640]), with a margin for
# resampling after normalisation (bilinear cannot overshoot; bicubic a little).
NORMALISED_RANGE = (float(np.min(-IMAGENET_MEAN / IMAGENET_STD)),
                    float(np.max((1 - IMAGENET_MEAN) / IMAGENET_STD)))
RANGE_MARGIN = 0.1


def preprocess(image_or_path, size=(322, 322)) -> np.ndarray:
  """Image (path, PIL image or uint8 HWC array) -> float32 [H, W, 3], the reference eval transform.

  PIL bilinear resize to `size` (h, w) on the uint8 image, /255, ImageNet mean/std. A list of
  images gives a batch [B, H, W, 3]. `size=None` keeps the image's size.
  """
  if isinstance(image_or_path, (list, tuple)):
    if not image_or_path:
      raise UserError("preprocess: empty list of images",
                      "give at least one image path, PIL image or uint8 [H, W, 3] array")
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
    # each call also returns the input's min, max and finiteness (fused: no extra round trip)
    self._describe = jax.jit(lambda p, x: (self.module.apply({"params": p}, x), _min_max(x)))
    self._features = jax.jit(lambda p, x: (
        self.module.apply({"params": p}, x, method=VPRModel.features), _min_max(x)))

  @property
  def descriptor_dim(self) -> int:
    return self.config.descriptor_dim

  def _check(self, images, min_patches: int) -> jax.Array:
    """Shape and dtype of a batch -> float32 array. Its values are checked by `_check_values`
    on the min and max that the jitted call returns with its result."""
    if isinstance(images, (list, tuple)):
      images = np.stack(images)
    shape = np.shape(images)
    vit.check_image_shape(shape, min_patches=min_patches)
    if shape[0] == 0:
      raise ValueError("empty batch: images has batch size 0")
    dtype = images.dtype if hasattr(images, "dtype") else np.asarray(images).dtype
    if not jnp.issubdtype(dtype, jnp.floating):
      raise UserError(f"images are {dtype}; the model takes float images normalised with the "
                      "ImageNet mean and std",
                      "salad_jax.preprocess(path, PIL image or uint8 array) makes them")
    return jnp.asarray(images, jnp.float32)

  @staticmethod
  def _check_values(min_max) -> None:
    """Finite, and within the range an ImageNet-normalised image can have."""
    lo, hi, finite = (float(v) for v in np.asarray(min_max))
    if not (finite and np.isfinite(lo) and np.isfinite(hi)):
      raise UserError("images contain NaN or Inf values")
    (a, b), m = NORMALISED_RANGE, RANGE_MARGIN
    if lo < a - m or hi > b + m:
      raise UserError(f"images hold values in [{lo:.4g}, {hi:.4g}], outside [{a:.3f}, {b:.3f}], the "
                      "range of ImageNet-normalised images (uint8 or [0, 255] pixels?)",
                      "salad_jax.preprocess(path, PIL image or uint8 array) normalises images")

  def describe(self, images) -> np.ndarray:
    """float32 NHWC ImageNet-normalised images -> descriptors [B, D] (L2-normalised)."""
    x = self._check(images, self.config.num_clusters)
    desc, min_max = self._describe(self.params, x)
    self._check_values(min_max)
    return np.asarray(desc)

  def features(self, images) -> tuple[np.ndarray, np.ndarray]:
    """Backbone outputs after the final norm: [B, H/14, W/14, C] and the cls token [B, C]."""
    x = self._check(images, 0)
    (f, t), min_max = self._features(self.params, x)
    self._check_values(min_max)
    return np.asarray(f), np.asarray(t)

  def to_torch(self, path: str, overwrite: bool = False) -> None:
    """Writes the params as an official-layout PyTorch state_dict (.pth/.ckpt or .safetensors).

    An existing file is replaced only with `overwrite`, and only if salad_jax wrote it.
    """
    convert.write_torch_checkpoint(path, self.params, self.config, overwrite=overwrite)

  def save(self, directory: str, overwrite: bool = False) -> None:
    save_converted(directory, self.params, self.config, self.source, overwrite=overwrite)

  def assignment(self, images) -> np.ndarray:
    """Sinkhorn assignment [B, m+1, H/14, W/14] of normalised images; row m is the dustbin."""
    from salad_jax.models.vpr import assignment
    x = self._check(images, self.config.num_clusters)
    if not hasattr(self, "_assignment"):
      self._assignment = jax.jit(lambda p, x: (assignment(self.module, p, x), _min_max(x)))
    out, min_max = self._assignment(self.params, x)
    self._check_values(min_max)
    return np.asarray(out)


@jax.jit
def _min_max(x):
  """[min, max, all finite] of a batch (XLA's min/max may skip NaN: finiteness is its own flag)."""
  return jnp.stack([jnp.min(x), jnp.max(x), jnp.all(jnp.isfinite(x))]).astype(jnp.float32)


# ------------------------------------------------------------------------------ converted dirs
FILES_KEY = "files"  # in salad_config.json: {path under the dir: size} of every params file
# What Orbax's StandardCheckpointer writes (dirs saved before FILES_KEY was recorded are
# replaced only if their params/ holds nothing else)
_ORBAX_FILES = re.compile(r"(_CHECKPOINT_METADATA|_METADATA|_sharding|commit_success\.txt|"
                          r"(ocdbt\.process_\d+/)?(manifest\.ocdbt|d/[0-9a-f]{32}))")
_ORBAX_DIRS = re.compile(r"(ocdbt\.process_\d+/)?d|ocdbt\.process_\d+")


def check_destination(dst: str, overwrite: bool) -> None:
  """An output of `convert_weights.py` / `save` / `to_torch`, checked before any work.

  A directory is replaced only if it is a salad_jax converted dir holding only what salad_jax
  wrote; a weight file (suffix in any case) only if salad_jax wrote it (`weights`).
  """
  if weights.file_kind(dst):
    weights.check_file_destination(os.fspath(dst), overwrite)
  else:
    _check_dir_destination(os.fspath(dst), overwrite)


def _check_dir_destination(dst: str, overwrite: bool) -> None:
  from salad_jax import atomic, workdir
  if not dst.strip():
    raise UserError("the destination is an empty path",
                    "give a directory (-> Orbax checkpoint) or a .pth/.ckpt/.safetensors file")
  directory = os.path.realpath(dst)
  workdir.check_location(directory, "--dst")
  if os.path.isdir(directory) and os.listdir(directory):
    if not _is_converted_dir(directory):
      raise UserError(f"refusing to write into {dst}: it exists and is not a salad_jax checkpoint "
                      f"(no {CONFIG_FILE}); salad_jax only ever replaces its own checkpoints",
                      "choose a new or empty --dst directory")
    extra = sorted(set(os.listdir(directory)) - {CONFIG_FILE, PARAMS_DIR})
    foreign = ", ".join(extra[:5]) if extra else _foreign_file(directory)
    if foreign:
      raise UserError(f"refusing to replace {dst}: besides a salad_jax checkpoint it holds files "
                      f"salad_jax did not write ({foreign})",
                      "move them out, or choose another --dst")
    if not overwrite:
      raise FileExistsError(f"{dst} exists (a salad_jax checkpoint); pass --overwrite "
                            "(overwrite=True) to replace it")
  atomic.probe(directory)


def _foreign_file(directory: str) -> str | None:
  """The first entry of a converted dir's params/ that salad_jax did not write, or None.

  Checked against the `files` record of salad_config.json (path and size); a dir saved before
  that record existed may hold only Orbax's own file names."""
  with open(os.path.join(directory, CONFIG_FILE)) as f:
    files = json.load(f).get(FILES_KEY)
  params_dir = os.path.join(directory, PARAMS_DIR)
  if os.path.islink(params_dir) or not os.path.isdir(params_dir):
    return f"{PARAMS_DIR} (not a directory)"
  if isinstance(files, dict):
    recorded_dirs = {os.path.dirname(p) for p in files}
    recorded_dirs |= {d for p in recorded_dirs for d in _parents(p)}
  for root, dirs, names in os.walk(params_dir):
    for name in sorted(dirs) + sorted(names):
      full = os.path.join(root, name)
      rel = os.path.relpath(full, directory).replace(os.sep, "/")
      sub = rel[len(PARAMS_DIR) + 1:]
      if os.path.islink(full):
        return f"{rel}, a symbolic link"
      if name in dirs:
        ok = rel in recorded_dirs if isinstance(files, dict) else _ORBAX_DIRS.fullmatch(sub)
      elif isinstance(files, dict):
        ok = files.get(rel) == os.path.getsize(full)
      else:
        ok = _ORBAX_FILES.fullmatch(sub)
      if not ok:
        return rel
  return None


def _parents(path: str) -> list[str]:
  out = []
  while "/" in path:
    path = path.rsplit("/", 1)[0]
    out.append(path)
  return out


def _is_converted_dir(directory: str) -> bool:
  try:
    with open(os.path.join(directory, CONFIG_FILE)) as f:
      meta = json.load(f)
    return isinstance(meta, dict) and "format_version" in meta and "model" in meta
  except (OSError, ValueError):
    return False


def save_converted(directory: str, params: Mapping, config: ModelConfig,
                   source: Mapping | None = None, overwrite: bool = False) -> None:
  """Writes an Orbax params checkpoint + `salad_config.json` into `directory` (atomically).

  The params are checked (`weights.check_params`) and their checksum recorded, with the path and
  size of every file written (so `overwrite` can tell them from a user's). An existing
  `directory` is replaced only if it is a salad_jax checkpoint (`check_destination`). It is
  written in a fresh temporary directory beside it (`atomic.new_dir`), then renamed.
  """
  import orbax.checkpoint as ocp

  from salad_jax import atomic
  _check_dir_destination(os.fspath(directory), overwrite)
  directory = os.path.realpath(directory)
  params = weights.check_params(jax.tree.map(np.asarray, dict(params)), "params to save")
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  atomic.remove_leftovers(directory)
  atomic.check_space(directory, sum(x.nbytes for x in jax.tree.leaves(params)))
  with atomic.new_dir(directory) as tmp:
    ckptr = ocp.StandardCheckpointer()
    try:
      ckptr.save(os.path.join(tmp, PARAMS_DIR), params)
      ckptr.wait_until_finished()
    finally:
      ckptr.close()
    files = {os.path.relpath(os.path.join(r, n), tmp).replace(os.sep, "/"):
             os.path.getsize(os.path.join(r, n))
             for r, _, names in os.walk(os.path.join(tmp, PARAMS_DIR)) for n in names}
    meta = {"format_version": FORMAT_VERSION, "model": config.to_dict(), "source": dict(source or {}),
            "params_checksum": integrity.params_checksum(params), FILES_KEY: dict(sorted(files.items()))}
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump(meta, f, indent=2)
    atomic.unmark(tmp)
    if os.path.exists(directory):
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.salad_old_", dir=parent)
      os.replace(directory, os.path.join(old, "previous"))
      os.replace(tmp, directory)
      shutil.rmtree(old)
    else:
      os.replace(tmp, directory)


def restore_params(path: str) -> dict:
  """Restores an Orbax params tree saved with StandardSave, as numpy arrays on the host."""
  import orbax.checkpoint as ocp
  ckptr = ocp.StandardCheckpointer()
  try:
    meta = ckptr.metadata(path)
    tree = getattr(meta, "item_metadata", meta)
    target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), tree.tree if hasattr(tree, "tree") else tree)
    return ckptr.restore(path, target)
  finally:
    ckptr.close()


def load_converted(directory: str) -> tuple[dict, ModelConfig, dict]:
  """Params, model config and source of a converted dir, every step checked (file named)."""
  directory = os.path.abspath(directory)
  cfg_path = os.path.join(directory, CONFIG_FILE)
  try:
    with open(cfg_path) as f:
      meta = json.load(f)
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
      raise ValueError("no 'model' entry")
    config = ModelConfig.from_dict(meta["model"])
  except (ValueError, TypeError, UnicodeDecodeError) as e:
    raise UserError(f"{cfg_path} is corrupt ({e})",
                    "convert the weights again (convert_weights.py), or restore the file") from None
  params_dir = os.path.join(directory, PARAMS_DIR)
  from salad_jax import checkpoint
  checkpoint.quiet_orphaned_reads()
  try:
    params = restore_params(params_dir)
  except Exception as e:  # Orbax/tensorstore errors of a damaged or missing params dir
    first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    raise UserError(f"{params_dir} cannot be read ({first[:200]}): the checkpoint is damaged",
                    "convert the weights again (convert_weights.py)") from e
  if "params_checksum" in meta:
    if integrity.params_checksum(params) != meta["params_checksum"]:
      raise UserError(f"{params_dir} is corrupt: its contents do not match the params_checksum "
                      f"recorded in {cfg_path}", "convert the weights again (convert_weights.py)")
  params = weights.check_params(params, params_dir)
  want = convert.param_shapes(config)
  got = {k: np.shape(v) for k, v in traverse_util.flatten_dict(dict(params)).items()}
  bad = [f"{'/'.join(k)}: checkpoint {got.get(k, 'absent')}, model {want.get(k, 'absent')}"
         for k in sorted(set(want) | set(got)) if got.get(k) != want.get(k)]
  if bad:
    raise UserError(f"{params_dir} does not match the model in {cfg_path} ({len(bad)}): "
                    + "; ".join(bad[:5]))
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
