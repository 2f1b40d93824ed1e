"""Orbax checkpoints of a training run: params, optimizer state, step, rng and the grain iterator.

Layout: `<workdir>/checkpoints/<step>/{params, train_state, data, meta}`. `params` alone is
what inference needs (`salad_jax.load(workdir)`), so it is its own item. Keeps the last N
checkpoints and the best M by a validation metric; saves are atomic (Orbax writes to a tmp dir
and renames), so an interrupted save never damages an earlier checkpoint.

Each checkpoint's meta holds `params_checksum` (salad_jax.integrity), verified on every restore.
Resuming takes the newest checkpoint that restores and verifies; newer damaged ones are moved to
`<workdir>/damaged_checkpoints/` (out of Orbax's sight: never resumed from, never deleted).
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import logging as std_logging
import os
import re
import shutil
import sys
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint.checkpoint_managers import AnyPreservationPolicy, BestN, LatestN

from salad_jax import integrity
from salad_jax.errors import UserError
from salad_jax.models.vpr import ModelConfig
from salad_jax.workdir import CHECKPOINTS, DAMAGED  # the workdir's layout


class CorruptCheckpointError(UserError):
  """A checkpoint's params do not match the checksum recorded when it was written."""


def params_checksum(params) -> str:
  """On the host when one process holds all of the params (no compile), else on the devices."""
  if all(getattr(x, "is_fully_addressable", True) for x in jax.tree.leaves(params)):
    return integrity.params_checksum(jax.tree.map(np.asarray, jax.device_get(params)))
  return integrity.params_checksum(params)


def verify(params, meta: dict, where: str) -> None:
  """Raises CorruptCheckpointError if `params` do not match `meta["params_checksum"]`."""
  want = meta.get("params_checksum")
  if want is None:
    logging.info("%s has no params checksum (written before salad_jax recorded one)", where)
    return
  got = params_checksum(params)
  if got != want:
    raise CorruptCheckpointError(
        f"{where} is corrupt: its params do not match the checksum recorded when it was saved "
        f"({got[:16]}... != {want[:16]}...)", "use another checkpoint, or restore it from a backup")


def quiet_orphaned_reads() -> None:
  """Called before restoring. When an Orbax restore fails, its other pending reads are orphaned,
  and each one reports again, after the restore's own error was raised and reported: it finishes
  on the closed event loop ("RuntimeError: Event loop is closed"), or is collected holding its
  read error ("Exception ignored in <coroutine ...>", via sys.unraisablehook), or its task is
  collected unretrieved ("Task exception was never retrieved", via the asyncio logger). With the
  TensorStore spec each is ~2 KB: one removed data file made up to 135 KB of stderr, enough to
  fill a pipe and block the process. Exactly those are dropped; anything else gets through."""
  previous = sys.unraisablehook
  if getattr(previous, "salad_jax", False):
    return
  orbax_dir = os.path.dirname(ocp.__file__) + os.sep

  def hook(unraisable):
    e, obj = unraisable.exc_value, unraisable.object
    closed_loop = isinstance(e, RuntimeError) and str(e) == "Event loop is closed"
    orbax_orphan = (inspect.iscoroutine(obj) and isinstance(e, Exception)
                    and obj.cr_code.co_filename.startswith(orbax_dir))
    if not (closed_loop or orbax_orphan):
      previous(unraisable)

  def unretrieved_orbax_task(record) -> bool:  # a logging filter: False drops the record
    msg = str(record.msg)
    return not (msg.startswith("Task exception was never retrieved")
                and f"defined at {orbax_dir}" in msg)

  sys.unraisablehook = hook
  std_logging.getLogger("asyncio").addFilter(unretrieved_orbax_task)


def _everywhere(ok: bool) -> bool:
  """True iff `ok` on every process (a collective when there are several)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _reason(e: BaseException) -> str:
  """One short line: the message's first line, without TensorStore's pointer to more details."""
  text = e.message if isinstance(e, UserError) else str(e)
  text = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
  text = text.split(" See full TensorStore details")[0]
  text = text if len(text) <= 160 else text[:157] + "..."
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _shape_diffs(saved, abstract) -> list[str]:
  """Params whose saved shape differs from the model's (a config change, not damage)."""
  flat = lambda t: {jax.tree_util.keystr(k): tuple(v.shape)
                    for k, v in jax.tree_util.tree_flatten_with_path(t)[0]}
  a, b = flat(saved), flat(abstract)
  out = [f"{k}: checkpoint {a.get(k, 'absent')}, model {b.get(k, 'absent')}"
         for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
  return out


class _NoUntrackedMetricNotice:
  """Saves between validations carry no metrics; Orbax warns about each one (nothing to act on)."""

  def filter(self, record) -> bool:
    return "did not provide metrics" not in str(record.getMessage())


logging.get_absl_logger().addFilter(_NoUntrackedMetricNotice())


class TrainCheckpointer:
  """One CheckpointManager for the train state and the data iterator state together."""

  def __init__(self, workdir: str, keep_last: int = 3, keep_best: int = 1,
               best_metric: str = "R@1", read_only: bool = False):
    self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINTS)
    self.best_metric = best_metric
    policy = AnyPreservationPolicy([
        LatestN(keep_last),
        BestN(get_metric_fn=lambda m: m[best_metric], n=keep_best,
              keep_checkpoints_without_metrics=False)])
    # best_fn makes Orbax write each save's metrics to disk: without it BestN only sees the
    # metrics of this process's saves, and a resumed run could delete the best checkpoint.
    options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=not read_only,
                                           read_only=read_only, enable_async_checkpointing=True,
                                           best_fn=lambda m: m[best_metric], best_mode="max")
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"params": ocp.StandardCheckpointHandler(),
                       "train_state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    """The kept checkpoint with the highest `best_metric` (ties: the later), as
    `salad_jax.load(workdir)` picks it; None when no checkpoint has the metric (Orbax's own
    `best_step()` falls back to the latest step)."""
    scored = [(m[self.best_metric], s) for s in self.manager.all_steps()
              for m in [self.manager.metrics(s) or {}] if self.best_metric in m]
    return max(scored)[1] if scored else None

  def metric_of(self, step: int) -> float | None:
    """The `best_metric` saved with `step` (also for checkpoints of an earlier run), or None."""
    m = self.manager.metrics(step) if step in self.manager.all_steps() else None
    return (m or {}).get(self.best_metric)

  def save(self, step: int, state: dict, meta: dict, data_iter=None,
           metrics: dict | None = None) -> None:
    meta = {**meta, "params_checksum": params_checksum(state["params"])}
    items = {"params": ocp.args.StandardSave(state["params"]),
             "train_state": ocp.args.StandardSave({k: v for k, v in state.items() if k != "params"}),
             "meta": ocp.args.JsonSave(meta)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

  def restore(self, step: int, abstract_state: dict, data_iter=None,
              model: dict | None = None) -> tuple[dict, dict]:
    """Restores onto the shardings of `abstract_state` (a tree of jax.ShapeDtypeStruct).

    Any saved layout restores onto any target layout (replicated or fsdp, other device counts).
    A checkpoint of another model (other shapes or trainable set) is a UserError naming the
    differing `config.model` fields (`model`: this run's ModelConfig dict), raised before
    anything is read or written.
    """
    self.check_compatible(step, abstract_state, model)
    if data_iter is not None:
      self.check_processes(step)
    items = {"params": ocp.args.StandardRestore(abstract_state["params"]),
             "train_state": ocp.args.StandardRestore(
                 {k: v for k, v in abstract_state.items() if k != "params"}),
             "meta": ocp.args.JsonRestore()}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    state = dict(out["train_state"])
    state["params"] = out["params"]
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
          self._set_aside(failed, step)
          return step, state, meta
        except CorruptCheckpointError as e:
          error = e
      failed.append((step, error or RuntimeError("it failed to restore on another process")))
    if failed:
      listed = "; ".join(f"step {s}: {_reason(e)}" for s, e in failed)
      raise UserError(f"no checkpoint in {self.directory} can be restored ({listed})",
                      "restore the checkpoints from a backup, or move them aside to start afresh "
                      "(nothing was moved or deleted)") from failed[0][1]
    return None

  def _set_aside(self, failed: list, good: int) -> None:
    if not failed:
      return
    if jax.process_index() == 0:
      stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
      aside = os.path.join(os.path.dirname(self.directory), DAMAGED)
      os.makedirs(aside, exist_ok=True)
      for step, e in failed:
        dest = os.path.join(aside, f"{step}-{stamp}")
        shutil.move(os.path.join(self.directory, str(step)), dest)
        print(f"checkpoint step {step} cannot be restored ({_reason(e)}); moved it to {dest}; "
              f"resuming from step {good}", flush=True)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("salad_jax: damaged checkpoints moved")
    self.manager.reload()

  def check_processes(self, step: int) -> None:
    """The input pipeline's position is saved per process (data/process_<i>-of-<n>.json): a
    checkpoint of another process count is a UserError (a launch change, not damage)."""
    try:
      names = os.listdir(os.path.join(self.directory, str(step), "data"))
    except OSError:  # no data state: the restore says why
      return
    counts = {int(m.group(1)) for n in names if (m := re.fullmatch(r"process_\d+-of-(\d+)\.json", n))}
    if counts and jax.process_count() not in counts:
      n = max(counts)
      raise UserError(
          f"checkpoint step {step} in {self.directory} was saved by {n} process(es) and this run "
          f"has {jax.process_count()}: the input pipeline's position is saved per process",
          f"resume it with {n} processes (JAX_NUM_PROCESSES={n}), or start a new run from its "
          f"params (--config.init={os.path.dirname(self.directory)} and another --workdir)")

  def check_compatible(self, step: int, abstract_state: dict, model: dict | None = None) -> None:
    """A checkpoint of another model (other param shapes, or another trainable set) is a
    UserError naming the differing `config.model` fields (`model`: this run's ModelConfig dict)
    and shapes; a config change, not damage: nothing is read, moved or written."""
    meta = self.manager.item_metadata(step)
    diffs = _shape_diffs(meta["params"], abstract_state["params"])
    rest = lambda t: sorted(_shapes({k: v for k, v in t.items() if k != "params"}).values())  # noqa: E731
    if not diffs and rest(meta["train_state"]) == rest(abstract_state):
      return
    saved_model = self.manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"].get("model", {})
    fields = [f"config.model.{k}={model[k]!r} (checkpoint: {saved_model[k]!r})"
              for k in sorted(SHAPE_FIELDS) if model and k in saved_model and saved_model[k] != model[k]]
    what = "; ".join(fields + [f"other shapes than the model ({len(diffs)}): " + "; ".join(diffs[:5])]
                     if diffs else fields + ["the trainable params differ (config.optim.freeze?)"])
    raise UserError(f"checkpoint step {step} in {self.directory} was saved for another model: {what}",
                    "resume with the settings it was trained with (its meta/ holds them), or start "
                    "a fresh run with another --workdir; the checkpoint is left as it is")

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


# ModelConfig fields that change the params or the optimizer state (dtype, remat, attention do not)
SHAPE_FIELDS = ("variant", "registers", "num_trainable_blocks", "num_clusters", "cluster_dim",
                "token_dim", "hidden_dim")


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'a/b/c': shape} of a tree of arrays, ShapeDtypeStructs or Orbax array metadata."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path):
          tuple(getattr(leaf, "shape", ())) for path, leaf in flat}


def abstract_like(tree: Any) -> Any:
  """jax.ShapeDtypeStruct tree with the same shardings (restore target)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


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
      raise UserError(f"{os.path.dirname(path)} is a train.py workdir without a checkpoint yet",
                      "train.py saves one every --config.checkpoint.every_steps steps, at every "
                      "epoch end and at stop_after_steps")
    raise FileNotFoundError(f"{path} holds no salad_jax checkpoint: expected a converted directory "
                            "(with salad_config.json), a train.py workdir or a checkpoint step dir")
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
  step_given = os.path.basename(os.path.normpath(path)).isdigit()
  quiet_orphaned_reads()
  with _quiet():
    return _load(directory, step, step_given, which)


def _damaged(directory: str, step: int, error: Exception, steps) -> UserError:
  others = [s for s in sorted(steps, reverse=True) if s != step]
  return UserError(f"checkpoint {directory}/{step} cannot be read ({_reason(error)}): it is damaged",
                   f"load another step, e.g. {directory}/{others[0]}" if others else
                   "restore it from a backup")


def _load(directory: str, step: int, step_given: bool, which: str):
  from salad_jax import weights
  mngr = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True),
      item_handlers={"params": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
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
      params = mngr.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(target)))["params"]
    except Exception as e:
      raise _damaged(directory, step, e, steps) from e
  finally:
    mngr.close()
  where = os.path.join(directory, str(step))
  verify(params, meta, f"checkpoint {where}")
  params = weights.check_params(params, os.path.join(where, "params"))
  try:
    config = ModelConfig.from_dict(meta["model"])
  except (KeyError, TypeError, ValueError) as e:
    raise UserError(f"checkpoint {where}: its meta holds no valid model config ({_reason(e)})") from e
  source = {"checkpoint": where, "step": step, "eval": meta.get("eval", {})}
  return params, config, source
