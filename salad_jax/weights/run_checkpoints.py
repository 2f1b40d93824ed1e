"""A training run's checkpoints read for inference: `salad_jax.load(<workdir>)`.

A workdir, its checkpoints/ dir, or one step dir -> the params (numpy, on the host, checked
against their recorded checksum) and the model config saved in the checkpoint's meta. From a
workdir the checkpoint with the highest validation R@1 is taken, else the latest.
"""

from __future__ import annotations

import contextlib
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from salad_jax.errors import UserError
from salad_jax.models.vpr import ModelConfig
from salad_jax.weights import torch_files
from salad_jax.weights.checksum import CorruptCheckpointError, params_checksum, verify
from salad_jax.weights.orbax_reads import quiet_orphaned_reads, short_reason

CHECKPOINTS = "checkpoints"  # a train.py workdir's folder of Orbax checkpoints
STATS = "batch_stats"  # the checkpoint item of a ResNet's BatchNorm statistics


def _resolve(path: str) -> tuple[str, int]:
  """A workdir, its checkpoints/ dir, or one step dir -> (manager dir, step)."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "params")) and os.path.basename(path).isdigit():
    return os.path.dirname(path), int(os.path.basename(path))
  if os.path.isdir(os.path.join(path, CHECKPOINTS)):
    path = os.path.join(path, CHECKPOINTS)
  steps = sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []
  if not steps:
    if os.path.basename(path) == CHECKPOINTS:
      raise UserError(
        f"{os.path.dirname(path)} is a train.py workdir without a checkpoint yet",
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
  """Params + model config of a training checkpoint, as numpy arrays on the host (`load_weights`
  also gives a ResNet's BatchNorm statistics).

  `path`: a workdir, its checkpoints/ dir, or one step dir. For a workdir, `which="best"` takes
  the checkpoint with the highest validation R@1 (recorded in its meta), else the latest.
  """
  params, _, config, source = load_weights(path, which)
  return params, config, source


def load_weights(path: str, which: str = "best") -> tuple[dict, dict | None, ModelConfig, dict]:
  """(params, batch_stats or None, model config, source) of a training checkpoint, as
  `load_for_inference` picks it; a ResNet's BatchNorm statistics are the checkpoint's
  `batch_stats` item."""
  directory, step = _resolve(path)
  step_given = os.path.basename(os.path.normpath(path)).isdigit()
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
    item_handlers={
      "params": ocp.StandardCheckpointHandler(),
      STATS: ocp.StandardCheckpointHandler(),
      "meta": ocp.JsonCheckpointHandler(),
    },
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
    where = os.path.join(directory, str(step))
    names = ["params"] + ([STATS] if os.path.isdir(os.path.join(where, STATS)) else [])
    try:
      trees = mngr.item_metadata(step)
      targets = {
        n: ocp.args.StandardRestore(jax.tree.map(lambda m: np.empty(m.shape, m.dtype), trees[n]))
        for n in names
      }
      restored = mngr.restore(step, args=ocp.args.Composite(**targets))
    except Exception as e:
      raise _damaged(directory, step, e, steps) from e
  finally:
    mngr.close()
  params = restored["params"]
  verify(params, meta, f"checkpoint {where}")
  params = torch_files.check_params(params, os.path.join(where, "params"))
  batch_stats = None
  if STATS in names:
    batch_stats = restored[STATS]
    verify_batch_stats(batch_stats, meta, f"checkpoint {where}")
    batch_stats = torch_files.check_params(batch_stats, os.path.join(where, STATS))
  try:
    config = ModelConfig.from_dict(meta["model"])
  except (KeyError, TypeError, ValueError) as e:
    raise UserError(
      f"checkpoint {where}: its meta holds no valid model config ({short_reason(e)})"
    ) from e
  if config.has_batch_stats and batch_stats is None:
    raise UserError(f"checkpoint {where} has no {STATS}: the {config.backbone} needs them")
  source = {"checkpoint": where, "step": step, "eval": meta.get("eval", {})}
  return params, batch_stats, config, source


def verify_batch_stats(batch_stats, meta, where: str) -> None:
  """BatchNorm statistics against the `batch_stats_checksum` recorded when they were saved."""
  want = meta.get("batch_stats_checksum")
  if want is not None and params_checksum(batch_stats) != want:
    raise CorruptCheckpointError(
      f"{where} is corrupt: its batch_stats do not match the checksum recorded when it was saved",
      "use another checkpoint, or restore it from a backup",
    )
