"""A training run's checkpoints read for inference: `salad_jax.load(<workdir>)`.

A workdir, its checkpoints/ dir, or one step dir -> the params (numpy, on the host, checked
against their recorded checksum) and the model config saved in the checkpoint's meta. From a
workdir the checkpoint with the highest validation R@1 is taken, else the latest.
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from salad_jax.errors import UserError
from salad_jax.files import paths
from salad_jax.models.vpr import ModelConfig
from salad_jax.weights import torch_files
from salad_jax.weights.checksum import verify
from salad_jax.weights.orbax_reads import quiet_orphaned_reads, short_reason

CHECKPOINTS = "checkpoints"  # a train.py workdir's folder of Orbax checkpoints


def _resolve(path: str) -> tuple[str, int]:
  """A workdir, its checkpoints/ dir, or one step dir -> (manager dir, step)."""
  path = paths.absolute(path)
  if paths.isdir(paths.join(path, "params")) and paths.name(path).isdigit():
    return paths.parent(path), int(paths.name(path))
  if paths.isdir(paths.join(path, CHECKPOINTS)):
    path = paths.join(path, CHECKPOINTS)
  steps = sorted(int(d) for d in paths.listdir(path) if d.isdigit()) if paths.isdir(path) else []
  if not steps:
    if paths.name(path) == CHECKPOINTS:
      raise UserError(
        f"{paths.parent(path)} is a train.py workdir without a checkpoint yet",
        "train.py saves one every --config.checkpoint.every_steps steps, at every "
        "epoch end and at stop_after_steps",
      )
    raise FileNotFoundError(
      f"{path} holds no salad_jax checkpoint: expected a converted directory "
      "(with salad_config.json), a train.py workdir or a checkpoint step dir"
    )
  return path, steps[-1]


@contextlib.contextmanager
def _quiet():
  """Orbax warns about read-only managers; nothing to act on when only reading."""
  level = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(level)


def load_for_inference(path: str, which: str = "best") -> tuple[dict, ModelConfig, dict]:
  """Params + model config of a training checkpoint, as numpy arrays on the host.

  `path`: a workdir, its checkpoints/ dir, or one step dir. For a workdir, `which="best"` takes
  the checkpoint with the highest validation R@1 (recorded in its meta), else the latest.
  """
  directory, step = _resolve(path)
  step_given = paths.name(paths.absolute(path)).isdigit()
  quiet_orphaned_reads()
  with _quiet():
    return _load(directory, step, step_given, which)


def _damaged(directory: str, step: int, error: Exception, steps) -> UserError:
  others = [s for s in sorted(steps, reverse=True) if s != step]
  return UserError(
    f"checkpoint {directory}/{step} cannot be read ({short_reason(error)}): it is damaged",
    f"load another step, e.g. {directory}/{others[0]}" if others else "restore it from a backup",
  )


def _load(directory: str, step: int, step_given: bool, which: str):
  mngr = ocp.CheckpointManager(
    directory,
    options=ocp.CheckpointManagerOptions(read_only=True),
    item_handlers={"params": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
  )
  try:
    steps = mngr.all_steps()

    def meta_of(s):
      try:
        return mngr.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      except Exception as e:
        raise _damaged(directory, s, e, steps) from e

    if which == "best" and not step_given:
      scored = []
      for s in steps:
        try:
          r1 = meta_of(s).get("eval", {}).get("R@1")
        except UserError as e:
          logging.warning("skipping %s", e)
          continue
        if r1 is not None:
          scored.append((r1, s))
      if scored:
        step = max(scored)[1]
    meta = meta_of(step)
    try:
      tree = mngr.item_metadata(step)["params"]
      target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), tree)
      params = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))[
        "params"
      ]
    except Exception as e:
      raise _damaged(directory, step, e, steps) from e
  finally:
    mngr.close()
  where = paths.join(directory, str(step))
  verify(params, meta, f"checkpoint {where}")
  params = torch_files.check_params(params, paths.join(where, "params"))
  try:
    config = ModelConfig.from_dict(meta["model"])
  except (KeyError, TypeError, ValueError) as e:
    raise UserError(
      f"checkpoint {where}: its meta holds no valid model config ({short_reason(e)})"
    ) from e
  source = {"checkpoint": where, "step": step, "eval": meta.get("eval", {})}
  return params, config, source
