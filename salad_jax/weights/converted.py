"""The converted-checkpoint directory: an Orbax params checkpoint + `salad_config.json`.

`convert_weights.py` and `SaladModel.save` write it; `salad_jax.load` reads it. The JSON holds the
model config, the source file (path, sha256), a checksum of the params, and the path and size of
every file written under `params/`, so `--overwrite` can tell salad_jax's files from a user's.
A ResNet's BatchNorm statistics are a second Orbax item, `batch_stats/`, recorded the same way
(`batch_stats_checksum`, its files). Written in a fresh temporary directory beside the destination, then renamed into place. On an
object store (gs://, no rename there) it is written locally, then uploaded: a marker object
(`.salad_jax_replacing`) first, then the old checkpoint's files are deleted, the params uploaded
and `salad_config.json` last (what makes the directory loadable); then the marker goes. An
upload cut short leaves the marker, so the next `--overwrite` knows the leftover is salad_jax's.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from typing import Mapping

import jax
import numpy as np
from flax import traverse_util

from salad_jax.errors import UserError
from salad_jax.files import atomic, destinations, paths
from salad_jax.models.config import ModelConfig
from salad_jax.weights import checksum, convert, torch_files
from salad_jax.weights.orbax_reads import quiet_orphaned_reads, restore_params

CONFIG_FILE = "salad_config.json"
PARAMS_DIR = "params"
STATS_DIR = "batch_stats"  # a ResNet's BatchNorm statistics (absent for DINOv2)
FORMAT_VERSION = 1
REPLACING = ".salad_jax_replacing"  # on an object store: an upload of a converted dir under way
FILES_KEY = "files"  # in salad_config.json: {path under the dir: size} of every params file
# What Orbax's StandardCheckpointer writes (dirs saved before FILES_KEY was recorded are
# replaced only if their params/ holds nothing else)
_ORBAX_FILES = re.compile(
  r"(_CHECKPOINT_METADATA|_METADATA|_sharding|commit_success\.txt|"
  r"(ocdbt\.process_\d+/)?(manifest\.ocdbt|d/[0-9a-f]{32}))"
)
_ORBAX_DIRS = re.compile(r"(ocdbt\.process_\d+/)?d|ocdbt\.process_\d+")


def check_destination(dst: str, overwrite: bool) -> None:
  """An output of `convert_weights.py` / `save` / `to_torch`, checked before any work.

  A directory is replaced only if it is a salad_jax converted dir holding only what salad_jax
  wrote; a weight file (suffix in any case) only if salad_jax wrote it (`torch_files`).
  """
  if torch_files.file_kind(dst):
    torch_files.check_file_destination(os.fspath(dst), overwrite)
  else:
    destinations.check_replace_dir(os.fspath(dst), overwrite, _refusal)


def _refusal(dst: str) -> UserError | None:
  """Why the non-empty directory `dst` may not be replaced (None: salad_jax wrote all of it)."""
  if not _is_converted_dir(dst) and not _interrupted_upload(dst):
    return UserError(
      f"refusing to write into {dst}: it exists and is not a salad_jax checkpoint "
      f"(no {CONFIG_FILE}); salad_jax only ever replaces its own checkpoints",
      "choose a new or empty --dst directory",
    )
  extra = sorted(set(paths.listdir(dst)) - {CONFIG_FILE, PARAMS_DIR, STATS_DIR, REPLACING})
  foreign = ", ".join(extra[:5]) if extra else _foreign_file(dst)
  if foreign:
    return UserError(
      f"refusing to replace {dst}: besides a salad_jax checkpoint it holds files "
      f"salad_jax did not write ({foreign})",
      "move them out, or choose another --dst",
    )
  return None


def _foreign_file(directory: str) -> str | None:
  """The first entry of a converted dir's params/ that salad_jax did not write, or None.

  Checked against the `files` record of salad_config.json (path and size); a dir saved before
  that record existed may hold only Orbax's own file names."""
  try:
    files = json.loads(paths.read_text(paths.join(directory, CONFIG_FILE))).get(FILES_KEY)
  except FileNotFoundError:  # an interrupted upload (checked by the caller): Orbax's names only
    files = None
  params_dir = paths.join(directory, PARAMS_DIR)
  if paths.is_url(directory):  # no links, no empty folders on an object store
    for item in (PARAMS_DIR, STATS_DIR):
      for sub in paths.walk_files(paths.join(directory, item)):
        rel = f"{item}/{sub}"
        if isinstance(files, dict):
          ok = files.get(rel) == paths.getsize(paths.join(directory, rel))
        else:
          ok = item == PARAMS_DIR and _ORBAX_FILES.fullmatch(sub)
        if not ok:
          return rel
    return None
  if os.path.islink(params_dir) or not os.path.isdir(params_dir):
    return f"{PARAMS_DIR} (not a directory)"
  if isinstance(files, dict):
    recorded_dirs = {os.path.dirname(p) for p in files}
    recorded_dirs |= {d for p in recorded_dirs for d in _parents(p)}
  for item in (PARAMS_DIR, STATS_DIR):
    item_dir = os.path.join(directory, item)
    if item == STATS_DIR and not os.path.lexists(item_dir):
      continue
    if item == STATS_DIR and (os.path.islink(item_dir) or not isinstance(files, dict)):
      return STATS_DIR  # written only with the files record
    for root, dirs, names in os.walk(item_dir):
      for name in sorted(dirs) + sorted(names):
        full = os.path.join(root, name)
        rel = os.path.relpath(full, directory).replace(os.sep, "/")
        sub = rel[len(item) + 1 :]
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


def _interrupted_upload(directory: str) -> bool:
  """A converted dir whose upload to an object store was cut short (its marker is there)."""
  return paths.is_url(directory) and paths.isfile(paths.join(directory, REPLACING))


def _is_converted_dir(directory: str) -> bool:
  try:
    meta = json.loads(paths.read_text(paths.join(directory, CONFIG_FILE)))
    return isinstance(meta, dict) and "format_version" in meta and "model" in meta
  except (OSError, ValueError):
    return False


def save_converted(
  directory: str,
  params: Mapping,
  config: ModelConfig,
  source: Mapping | None = None,
  overwrite: bool = False,
  batch_stats: Mapping | None = None,
) -> None:
  """Writes an Orbax params checkpoint + `salad_config.json` into `directory` (atomically);
  a ResNet's `batch_stats` as a second item beside the params.

  The params are checked (`torch_files.check_params`) and their checksum recorded, with the path and
  size of every file written (so `overwrite` can tell them from a user's). An existing
  `directory` is replaced only if it is a salad_jax checkpoint (`check_destination`). It is
  written in a fresh temporary directory beside it (`atomic.new_dir`), then renamed (on an
  object store: written locally, then uploaded, `_upload`).
  """
  directory = destinations.check_replace_dir(os.fspath(directory), overwrite, _refusal)
  params = torch_files.check_params(jax.tree.map(np.asarray, dict(params)), "params to save")
  items = {PARAMS_DIR: params}
  if batch_stats:
    items[STATS_DIR] = torch_files.check_params(
      jax.tree.map(np.asarray, dict(batch_stats)), "batch_stats to save"
    )
  if paths.is_url(directory):
    with tempfile.TemporaryDirectory(prefix="salad_jax_save_") as tmp:
      _write(tmp, items, config, source)
      _upload(tmp, directory)
    return
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  atomic.remove_leftovers(directory)
  atomic.check_space(directory, sum(x.nbytes for x in jax.tree.leaves(items)))
  with atomic.new_dir(directory) as tmp:
    _write(tmp, items, config, source)
    atomic.unmark(tmp)
    if os.path.exists(directory):
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.salad_old_", dir=parent)
      os.replace(directory, os.path.join(old, "previous"))
      os.replace(tmp, directory)
      shutil.rmtree(old)
    else:
      os.replace(tmp, directory)


def _upload(local: str, directory: str) -> None:
  """A converted dir written in `local` -> the object store (see the module docstring)."""
  marker = paths.join(directory, REPLACING)
  with atomic.new_file(marker) as tmp, open(tmp, "w") as f:
    f.write("salad_jax: a converted checkpoint is being uploaded here\n")
  with contextlib.suppress(FileNotFoundError):
    paths.remove(paths.join(directory, CONFIG_FILE))
  paths.rmtree(paths.join(directory, PARAMS_DIR))
  paths.rmtree(paths.join(directory, STATS_DIR))
  paths.upload_tree(  # salad_config.json last: what makes the directory loadable
    local, directory, order=lambda rels: sorted(rels, key=lambda r: (r == CONFIG_FILE, r))
  )
  paths.remove(marker)


def _write(tmp: str, items: Mapping, config: ModelConfig, source) -> None:
  """The params (and a ResNet's batch_stats) as Orbax items, and salad_config.json, written into
  the local folder `tmp`."""
  import orbax.checkpoint as ocp

  ckptr = ocp.StandardCheckpointer()
  try:
    for name, tree in items.items():
      ckptr.save(os.path.join(tmp, name), tree)
      ckptr.wait_until_finished()
  finally:
    ckptr.close()
  files = {
    rel: os.path.getsize(os.path.join(tmp, *rel.split("/")))
    for name in items
    for rel in (f"{name}/{r}" for r in paths.walk_files(os.path.join(tmp, name)))
  }
  meta = {
    "format_version": FORMAT_VERSION,
    "model": config.to_dict(),
    "source": dict(source or {}),
    "params_checksum": checksum.params_checksum(items[PARAMS_DIR]),
    FILES_KEY: dict(sorted(files.items())),
  }
  if STATS_DIR in items:
    meta["batch_stats_checksum"] = checksum.params_checksum(items[STATS_DIR])
  with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
    json.dump(meta, f, indent=2)


def load_converted(directory: str) -> tuple[dict, ModelConfig, dict]:
  """Params, model config and source of a converted dir (`load_converted_weights` also gives a
  ResNet's BatchNorm statistics)."""
  params, _, config, source = load_converted_weights(directory)
  return params, config, source


def _restore(path: str, cfg_path: str, checksum_key: str, meta: Mapping) -> dict:
  quiet_orphaned_reads()
  try:
    tree = restore_params(path)
  except Exception as e:  # Orbax/tensorstore errors of a damaged or missing params dir
    first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    raise UserError(
      f"{path} cannot be read ({first[:200]}): the checkpoint is damaged",
      "convert the weights again (convert_weights.py)",
    ) from e
  if checksum_key in meta:
    if checksum.params_checksum(tree) != meta[checksum_key]:
      raise UserError(
        f"{path} is corrupt: its contents do not match the {checksum_key} recorded in {cfg_path}",
        "convert the weights again (convert_weights.py)",
      )
  return torch_files.check_params(tree, path)


def load_converted_weights(directory: str) -> tuple[dict, dict | None, ModelConfig, dict]:
  """Params, batch_stats (None without BatchNorm), model config and source of a converted dir,
  every step checked (file named)."""
  directory = paths.absolute(directory)
  cfg_path = paths.join(directory, CONFIG_FILE)
  try:
    meta = json.loads(paths.read_text(cfg_path))
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
      raise ValueError("no 'model' entry")
    config = ModelConfig.from_dict(meta["model"])
  except (ValueError, TypeError, UnicodeDecodeError) as e:
    raise UserError(
      f"{cfg_path} is corrupt ({e})",
      "convert the weights again (convert_weights.py), or restore the file",
    ) from None
  params_dir = paths.join(directory, PARAMS_DIR)
  params = _restore(params_dir, cfg_path, "params_checksum", meta)
  variables = {"params": params}
  if config.has_batch_stats:
    variables["batch_stats"] = _restore(
      paths.join(directory, STATS_DIR), cfg_path, "batch_stats_checksum", meta
    )
  want = convert.variable_shapes(config)
  got = {
    (c,) + k: np.shape(v)
    for c, tree in variables.items()
    for k, v in traverse_util.flatten_dict(dict(tree)).items()
  }
  bad = [
    f"{'/'.join(k[1:] if k[0] == 'params' else k)}: checkpoint {got.get(k, 'absent')}, "
    f"model {want.get(k, 'absent')}"
    for k in sorted(set(want) | set(got))
    if got.get(k) != want.get(k)
  ]
  if bad:
    raise UserError(
      f"{params_dir} does not match the model in {cfg_path} ({len(bad)}): " + "; ".join(bad[:5])
    )
  return params, variables.get("batch_stats"), config, meta.get("source", {})
