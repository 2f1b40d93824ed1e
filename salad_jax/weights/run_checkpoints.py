"""A training run's checkpoints read for inference: `salad_jax.load(<workdir>)`.

A workdir, its checkpoints/ dir, or one step dir -> the params (numpy, on the host, checked
against their recorded checksum) and the model config saved in the checkpoint's meta. From a
workdir the checkpoint with the highest validation R@1 is taken, else the latest.

"Best" has one meaning for `load`, train.py's last line and the checkpoint retention (`rank`):
recalls measured under other eval settings (another set, threshold or image size) are not
comparable, so each checkpoint records the settings its R@1 was measured under (a fingerprint,
`eval_settings`), checkpoints are ranked only against those of the same settings, and the best
is the best under the settings of the newest checkpoint that has an R@1.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from salad_jax.errors import UserError
from salad_jax.files import paths
from salad_jax.models.config import ModelConfig
from salad_jax.weights import torch_files
from salad_jax.weights.checksum import CorruptCheckpointError, params_checksum, verify
from salad_jax.weights.orbax_reads import quiet_orphaned_reads, short_reason

CHECKPOINTS = "checkpoints"  # a train.py workdir's folder of Orbax checkpoints
STATS = "batch_stats"  # the checkpoint item of a ResNet's BatchNorm statistics
SETTINGS = "eval_settings"  # the fingerprint of the eval settings, in a checkpoint's metrics
SETTINGS_TEXT = "eval_settings_text"  # the same in words, e.g. "R@1 on eval, 25 m, 112x112"
UNRECORDED = "eval settings not recorded (saved by an older salad_jax)"


@dataclasses.dataclass(frozen=True)
class Scored:
  """A checkpoint's R@1 and the eval settings it was measured under."""

  step: int
  r1: float
  settings: str | None  # fingerprint; None: saved before settings were recorded
  text: str = ""


def scored(step: int, metrics: dict | None, metric: str = "R@1") -> Scored | None:
  """A Scored from a checkpoint's metrics (Orbax's) or meta["eval"] + meta["eval_settings"]."""
  if not metrics or metrics.get(metric) is None:
    return None
  return Scored(
    step,
    float(metrics[metric]),
    metrics.get(SETTINGS),
    metrics.get(SETTINGS_TEXT) or ("" if metrics.get(SETTINGS) else UNRECORDED),
  )


def rank(checkpoints: Iterable[Scored]) -> tuple[Scored | None, list[Scored]]:
  """(the best, the best under each other eval settings, oldest first).

  The best is the highest R@1 (ties: the later step) among the checkpoints measured under the
  settings of the newest checkpoint with an R@1; R@1 under other settings is never compared
  with it (R@1 at 5000 m "beat" the best at 25 m and deleted it).
  """
  groups: dict[str | None, list[Scored]] = {}
  for c in checkpoints:
    groups.setdefault(c.settings, []).append(c)
  if not groups:
    return None, []
  bests = {k: max(v, key=lambda c: (c.r1, c.step)) for k, v in groups.items()}
  newest = max((c for v in groups.values() for c in v), key=lambda c: c.step).settings
  others = sorted((b for k, b in bests.items() if k != newest), key=lambda c: c.step)
  return bests[newest], others


def best_per_settings(checkpoints: Iterable[Scored], n: int) -> set[int]:
  """The steps of the n best checkpoints under each eval settings (the retention's BestN)."""
  groups: dict[str | None, list[Scored]] = {}
  for c in checkpoints:
    groups.setdefault(c.settings, []).append(c)
  keep: set[int] = set()
  for v in groups.values():
    keep.update(c.step for c in sorted(v, key=lambda c: (c.r1, c.step))[-n:] if n > 0)
  return keep


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
  """Params + model config of a training checkpoint, as numpy arrays on the host (`load_weights`
  also gives a ResNet's BatchNorm statistics).

  `path`: a workdir, its checkpoints/ dir, or one step dir. For a workdir, `which="best"` takes
  the best by validation R@1 (recorded in its meta) under the newest eval settings (`rank`),
  else the latest.
  """
  params, _, config, source = load_weights(path, which)
  return params, config, source


def load_weights(path: str, which: str = "best") -> tuple[dict, dict | None, ModelConfig, dict]:
  """(params, batch_stats or None, model config, source) of a training checkpoint, as
  `load_for_inference` picks it; a ResNet's BatchNorm statistics are the checkpoint's
  `batch_stats` item."""
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
      found = []
      for s in steps:
        try:
          m = meta_of(s)
        except UserError as e:
          logging.warning("skipping %s", e)
          continue
        settings = m.get(SETTINGS) or {}
        c = scored(
          s,
          {
            **m.get("eval", {}),
            SETTINGS: settings.get("fingerprint"),
            SETTINGS_TEXT: settings.get("text"),
          },
        )
        if c is not None:
          found.append(c)
      best, _ = rank(found)
      if best is not None:
        step = best.step
    meta = meta_of(step)
    where = paths.join(directory, str(step))
    names = ["params"] + ([STATS] if paths.isdir(paths.join(where, STATS)) else [])
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
  params = torch_files.check_params(params, paths.join(where, "params"))
  batch_stats = None
  if STATS in names:
    batch_stats = restored[STATS]
    verify_batch_stats(batch_stats, meta, f"checkpoint {where}")
    batch_stats = torch_files.check_params(batch_stats, paths.join(where, STATS))
  try:
    config = ModelConfig.from_dict(meta["model"])
  except (KeyError, TypeError, ValueError) as e:
    raise UserError(
      f"checkpoint {where}: its meta holds no valid model config ({short_reason(e)})"
    ) from e
  if config.has_batch_stats and batch_stats is None:
    raise UserError(f"checkpoint {where} has no {STATS}: the {config.backbone} needs them")
  source = {
    "checkpoint": where,
    "step": step,
    "eval": meta.get("eval", {}),
    SETTINGS: meta.get(SETTINGS, {}),
  }
  return params, batch_stats, config, source


def verify_batch_stats(batch_stats, meta, where: str) -> None:
  """BatchNorm statistics against the `batch_stats_checksum` recorded when they were saved."""
  want = meta.get("batch_stats_checksum")
  if want is not None and params_checksum(batch_stats) != want:
    raise CorruptCheckpointError(
      f"{where} is corrupt: its batch_stats do not match the checksum recorded when it was saved",
      "use another checkpoint, or restore it from a backup",
    )
