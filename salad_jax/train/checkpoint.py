"""Orbax checkpoints of a training run: params, optimizer state, step, rng and the grain iterator.

Layout: `<workdir>/checkpoints/<step>/{params, train_state, data, meta}`, and `batch_stats` for
a ResNet (its BatchNorm statistics). `params` (+ `batch_stats`) is what inference needs
(`salad_jax.load(workdir)`), so each is its own item. Keeps the last N checkpoints and the best M
by a validation metric under each eval settings (a checkpoint's metrics record the settings they
were measured under; recalls under other settings are never compared:
`salad_jax.weights.run_checkpoints.rank`); saves are atomic (Orbax writes to a tmp dir
and renames), so an interrupted save never damages an earlier checkpoint.

Each checkpoint's meta holds `params_checksum` (salad_jax.weights.checksum), verified on every restore.
Resuming takes the newest checkpoint that restores and verifies; newer damaged ones are moved to
`<workdir>/damaged_checkpoints/` (out of Orbax's sight: never resumed from, never deleted).
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import AnyPreservationPolicy, LatestN

from salad_jax.errors import UserError
from salad_jax.files import atomic, paths
from salad_jax.files.lock import utc_stamp
from salad_jax.models.config import ModelConfig
from salad_jax.train.orbax_logs import write_failure  # importing it quiets Orbax's logs
from salad_jax.train.workdir import DAMAGED
from salad_jax.weights.checksum import CorruptCheckpointError, params_checksum, verify
from salad_jax.weights.orbax_reads import quiet_orphaned_reads, short_reason
from salad_jax.weights.run_checkpoints import (  # the workdir's layout, and what "best" means
  CHECKPOINTS,
  STATS,
  Scored,
  best_per_settings,
  rank,
  scored,
  verify_batch_stats,
)


def _everywhere(ok: bool) -> bool:
  """True iff `ok` on every process (a collective when there are several)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils

  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _shape_diffs(saved, abstract) -> list[str]:
  """Params whose saved shape differs from the model's (a config change, not damage)."""
  flat = lambda t: {
    jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_flatten_with_path(t)[0]
  }
  a, b = flat(saved), flat(abstract)
  out = [
    f"{k}: checkpoint {a.get(k, 'absent')}, model {b.get(k, 'absent')}"
    for k in sorted(set(a) | set(b))
    if a.get(k) != b.get(k)
  ]
  return out


class BestNPerSettings:
  """Orbax preservation policy: the `n` best checkpoints by `metric` under each eval settings
  (Orbax's BestN ranked R@1 at 5000 m against R@1 at 25 m and deleted the best)."""

  def __init__(self, metric: str, n: int):
    self.metric, self.n = metric, n

  def should_preserve(self, checkpoints, *, context) -> list[bool]:
    found = [c for info in checkpoints if (c := scored(info.step, info.metrics, self.metric))]
    keep = best_per_settings(found, self.n)
    return [info.step in keep for info in checkpoints]


class IteratorPosition:
  """A data iterator's state taken now, saved later (after the next batch was already taken).

  grain's checkpoint handler writes `get_state()`; it JSON-encodes a dataset iterator's dict
  itself and expects bytes from anything else, so the dict is encoded here the same way.
  """

  def __init__(self, data_iter):
    s = data_iter.get_state()
    self._state = s if isinstance(s, bytes) else json.dumps(s, indent=4).encode()

  def get_state(self) -> bytes:
    return self._state


class TrainCheckpointer:
  """One CheckpointManager for the train state and the data iterator state together."""

  def __init__(
    self,
    workdir: str,
    keep_last: int = 3,
    keep_best: int = 1,
    best_metric: str = "R@1",
    read_only: bool = False,
  ):
    self.directory = paths.join(paths.absolute(workdir), CHECKPOINTS)
    self.best_metric = best_metric
    policy = AnyPreservationPolicy([LatestN(keep_last), BestNPerSettings(best_metric, keep_best)])
    # best_fn makes Orbax write each save's metrics to disk: without it BestN only sees the
    # metrics of this process's saves, and a resumed run could delete the best checkpoint.
    options = ocp.CheckpointManagerOptions(
      preservation_policy=policy,
      create=not read_only,
      read_only=read_only,
      enable_async_checkpointing=True,
      best_fn=lambda m: m[best_metric],
      best_mode="max",
    )
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=options,
      item_handlers={
        "params": ocp.StandardCheckpointHandler(),
        STATS: ocp.StandardCheckpointHandler(),
        "train_state": ocp.StandardCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
      },
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def say_if_settings_changed(self, settings: dict) -> None:
    """R@1 under other eval settings is not comparable: says that the best checkpoints measured
    under earlier settings than `settings` (fingerprint, text) are kept and ranked apart."""
    earlier = [c for c in self.scored() if c.settings != settings["fingerprint"]]
    if not earlier:
      return
    best, others = rank(earlier)
    kept = sorted([best, *others], key=lambda c: c.step)
    print(
      f"note: the eval settings changed ({settings['text']}): the checkpoints "
      "measured under earlier settings are ranked apart and their best kept ("
      + "; ".join(f"step {c.step}: {c.text}, R@1 {c.r1:.2f}" for c in kept)
      + ")",
      flush=True,
    )

  def scored(self) -> list[Scored]:
    """Each kept checkpoint's `best_metric` and the eval settings it was measured under."""
    return [
      c
      for s in self.manager.all_steps()
      if (c := scored(s, self.manager.metrics(s), self.best_metric))
    ]

  def best(self) -> tuple[Scored | None, list[Scored]]:
    """(the best checkpoint, the best under each other eval settings), as
    `salad_jax.load(workdir)` picks it (`run_checkpoints.rank`)."""
    return rank(self.scored())

  def best_step(self) -> int | None:
    """The best kept checkpoint (`best`), as `salad_jax.load(workdir)` picks it; None when no
    checkpoint has the metric (Orbax's own `best_step()` falls back to the latest step)."""
    best, _ = self.best()
    return best.step if best else None

  def metric_of(self, step: int) -> float | None:
    """The `best_metric` saved with `step` (also for checkpoints of an earlier run), or None."""
    m = self.manager.metrics(step) if step in self.manager.all_steps() else None
    return (m or {}).get(self.best_metric)

  def save(
    self, step: int, state: dict, meta: dict, data_iter=None, metrics: dict | None = None
  ) -> None:
    meta = {**meta, "params_checksum": params_checksum(state["params"])}
    items = {
      "params": ocp.args.StandardSave(state["params"]),
      "train_state": ocp.args.StandardSave(_train_state(state)),
    }
    if STATS in state:
      meta["batch_stats_checksum"] = params_checksum(state[STATS])
      items[STATS] = ocp.args.StandardSave(state[STATS])
    items["meta"] = ocp.args.JsonSave(meta)
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    try:  # an earlier asynchronous save's failure surfaces here
      self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
    except Exception as e:
      raise self._save_error(e) from e
    self._saving = step

  def _save_error(self, e: Exception) -> Exception:
    """A save that failed on the file system: one line naming the step and the reason."""
    if not write_failure(e):
      return e
    code = atomic.os_errno(e)
    reason = (atomic.DISK_ERRNOS.get(code) or os.strerror(code).lower()) if code else str(e)
    step = getattr(self, "_saving", None)
    return UserError(
      f"cannot save the checkpoint{f' of step {step}' if step is not None else ''} in "
      f"{self.directory}: {reason}; the checkpoints saved before it are intact",
      "free some space there (or lower --config.checkpoint.keep_last), then rerun the same "
      "command: it resumes from the last checkpoint",
    )

  def restore(
    self, step: int, abstract_state: dict, data_iter=None, model: dict | None = None
  ) -> tuple[dict, dict]:
    """Restores onto the shardings of `abstract_state` (a tree of jax.ShapeDtypeStruct).

    Any saved layout restores onto any target layout (replicated or fsdp, other device counts).
    A checkpoint of another model (other shapes or trainable set) is a UserError naming the
    differing `config.model` fields (`model`: this run's ModelConfig dict), raised before
    anything is read or written.
    """
    self.check_compatible(step, abstract_state, model)
    if data_iter is not None:
      self.check_processes(step)
    items = {
      "params": ocp.args.StandardRestore(abstract_state["params"]),
      "train_state": ocp.args.StandardRestore(_train_state(abstract_state)),
      "meta": ocp.args.JsonRestore(),
    }
    if STATS in abstract_state:
      items[STATS] = ocp.args.StandardRestore(abstract_state[STATS])
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    state = dict(out["train_state"])
    state["params"] = out["params"]
    if STATS in abstract_state:
      state[STATS] = out[STATS]
    return state, out["meta"]

  def restore_latest(self, abstract_state: dict, data_iter=None, model: dict | None = None):
    """The newest checkpoint that restores and matches its checksum: (step, state, meta), or
    None without checkpoints.

    Newer checkpoints that fail are moved to `<workdir>/damaged_checkpoints/` (one line each)
    once an older one has restored, so a failure that is not damage moves nothing. Params of
    other shapes than the model's are a `UserError` (the config changed), not damage.
    """
    quiet_orphaned_reads()
    steps = sorted(self.manager.all_steps(), reverse=True)
    failed = []
    for step in steps:
      error = None
      try:
        state, meta = self.restore(step, abstract_state, data_iter, model)
      except UserError:  # saved for another model or process count: a config change, not damage
        raise
      except Exception as e:  # damaged (unreadable metadata included): try the next older one
        error = e
      if _everywhere(error is None):  # all processes restored this step, or none goes on with it
        try:  # the same verdict on every process: same meta, same (replicated) checksum
          verify(state["params"], meta, f"checkpoint {self.directory}/{step}")
          if STATS in state:
            verify_batch_stats(state[STATS], meta, f"checkpoint {self.directory}/{step}")
          self._set_aside(failed, step)
          return step, state, meta
        except CorruptCheckpointError as e:
          error = e
      failed.append((step, error or RuntimeError("it failed to restore on another process")))
    if failed:
      listed = "; ".join(f"step {s}: {short_reason(e)}" for s, e in failed)
      raise UserError(
        f"no checkpoint in {self.directory} can be restored ({listed})",
        "restore the checkpoints from a backup, or move them aside to start afresh "
        "(nothing was moved or deleted)",
      ) from failed[0][1]
    return None

  def _set_aside(self, failed: list, good: int) -> None:
    if not failed:
      return
    if jax.process_index() == 0:
      stamp = utc_stamp(time.time())
      aside = paths.join(paths.parent(self.directory), DAMAGED)
      paths.makedirs(aside)
      for step, e in failed:
        dest = paths.join(aside, f"{step}-{stamp}")
        paths.move_tree(paths.join(self.directory, str(step)), dest)  # GCS: copy, then delete
        print(
          f"checkpoint step {step} cannot be restored ({short_reason(e)}); moved it to {dest}; "
          f"resuming from step {good}",
          flush=True,
        )
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("salad_jax: damaged checkpoints moved")
    self.manager.reload()

  def check_processes(self, step: int) -> None:
    """The input pipeline's position is saved per process (data/process_<i>-of-<n>.json): a
    checkpoint of another process count is a UserError (a launch change, not damage)."""
    try:
      names = paths.listdir(paths.join(self.directory, str(step), "data"))
    except OSError:  # no data state: the restore says why
      return
    counts = {
      int(m.group(1)) for n in names if (m := re.fullmatch(r"process_\d+-of-(\d+)\.json", n))
    }
    if counts and jax.process_count() not in counts:
      n = max(counts)
      raise UserError(
        f"checkpoint step {step} in {self.directory} was saved by {n} process(es) and this run "
        f"has {jax.process_count()}: the input pipeline's position is saved per process",
        f"resume it with {n} processes (JAX_NUM_PROCESSES={n}), or start a new run from its "
        f"params (--config.init={paths.parent(self.directory)} and another --workdir)",
      )

  def check_compatible(self, step: int, abstract_state: dict, model: dict | None = None) -> None:
    """A checkpoint of another model (other param shapes, or another trainable set) is a
    UserError naming the differing `config.model` fields (`model`: this run's ModelConfig dict)
    and shapes; a config change, not damage: nothing is read, moved or written."""
    meta = self.manager.item_metadata(step)
    diffs = _shape_diffs(meta["params"], abstract_state["params"])
    if STATS in abstract_state:
      saved_stats = (
        meta[STATS] if os.path.isdir(os.path.join(self.directory, str(step), STATS)) else {}
      )
      diffs += _shape_diffs(saved_stats, abstract_state[STATS])
    rest = lambda t: sorted(_shapes(_train_state(t)).values())  # noqa: E731
    if not diffs and rest(meta["train_state"]) == rest(abstract_state):
      return
    saved_model = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
      "meta"
    ].get("model", {})
    fields = [
      f"config.model.{k}={model[k]!r} (checkpoint: {saved_model[k]!r})"
      for k in sorted(ModelConfig.TRAIN_STATE_FIELDS)
      if model and k in saved_model and _json(saved_model[k]) != _json(model[k])
    ]
    what = "; ".join(
      fields + [f"other shapes than the model ({len(diffs)}): " + "; ".join(diffs[:5])]
      if diffs
      else fields + ["the trainable params differ (config.optim.freeze?)"]
    )
    raise UserError(
      f"checkpoint step {step} in {self.directory} was saved for another model: {what}",
      "resume with the settings it was trained with (its meta/ holds them), or start "
      "a fresh run with another --workdir; the checkpoint is left as it is",
    )

  def wait(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise self._save_error(e) from e

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()


def _train_state(state: dict) -> dict:
  """The `train_state` item: everything but the params and the BatchNorm statistics."""
  return {k: v for k, v in state.items() if k not in ("params", STATS)}


def _json(value: Any) -> Any:
  """A config value as its JSON form (tuples saved as lists compare equal)."""
  return json.loads(json.dumps(value))


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'a/b/c': shape} of a tree of arrays, ShapeDtypeStructs or Orbax array metadata."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {
    "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path): tuple(
      getattr(leaf, "shape", ())
    )
    for path, leaf in flat
  }


def abstract_like(tree: Any) -> Any:
  """jax.ShapeDtypeStruct tree with the same shardings (restore target)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
