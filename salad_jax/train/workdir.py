"""A training workdir: its lock, and the record of the settings each run used.

`train_and_evaluate` runs inside `hold(workdir)`; once the data is found, `start(config)`:
  1. takes `<workdir>/.lock` (host, pid, start time; a second run on the workdir is refused while
     the holder lives; the lock of a dead holder is taken over, with a message),
  2. compares `config` with the saved `config.json` before anything is written: when the workdir
     holds checkpoints, a setting that changes what is trained (`MAY_CHANGE` lists the others)
     is an error naming each difference; allowed changes are printed,
  3. writes `config.json` (this run) and `config_history/<n>-<utc time>.json` (every run).
The lock is released when `hold` exits, on errors too. The workdir may be a URL (gs://bucket/run:
`salad_jax.files.paths`); the lock is then an object (`salad_jax.files.lock.UrlLock`). In multi-process runs process 0 does
all of this and tells the others (`broadcast_one_to_all`), so every process stops together.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import time
from typing import Any, Iterator, Mapping

from absl import logging
from flax import traverse_util

from salad_jax.errors import UserError
from salad_jax.files import atomic, destinations, paths
from salad_jax.files.lock import make_lock, utc_stamp
from salad_jax.train.config import base_config
from salad_jax.weights.run_checkpoints import CHECKPOINTS

CONFIG = "config.json"
HISTORY = "config_history"
LOCK = ".lock"
DAMAGED = "damaged_checkpoints"  # checkpoints that failed to restore, moved aside (checkpoint.py)

# Settings that may change when a run resumes: logging, evaluation, checkpointing, data location,
# and settings that change speed or memory but not the numbers trained. Everything else (model
# shape, data and batch layout, optimizer, schedule, seed, init, ...) is fixed; a key added to the
# config after a run started is compared with its default; a key since removed is only reported.
# Patterns are fnmatch-style.
MAY_CHANGE = (
  "log_every_steps",
  "stop_after_steps",
  "num_epochs",
  "eval.*",
  "checkpoint.*",
  "data.root",
  "data.tfds_data_dir",
  "data.num_threads",
  "model.attention",
  "model.micro_batch",
  "model.train_micro_batch",
  "model.remat",
  "mesh.*",
  "compile_cache_dir",
)
# why a setting that looks harmless is fixed
WHY_FIXED = {
  "data.num_workers": "the saved data-loader position is per grain worker",
  "init": "the params come from the checkpoint, not from config.init",
}


# what a run writes into its workdir: directory or file
LAYOUT = {
  CHECKPOINTS: "dir",
  HISTORY: "dir",
  "tensorboard": "dir",
  DAMAGED: "dir",
  "compile_cache": "dir",  # config.compile_cache_dir=auto (train/compile_cache.py)
  CONFIG: "file",
  "metrics.jsonl": "file",
  LOCK: "file",
}
CONFIG_KEYS = ("model", "data", "optim", "checkpoint")  # a config.json salad_jax wrote has these


def check_layout(workdir: str) -> None:
  """Each name salad_jax writes in `workdir` is absent or of the kind it writes, and an existing
  config.json is one salad_jax wrote (it is replaced at every start)."""
  for name, kind in LAYOUT.items():
    path = paths.join(workdir, name)
    if paths.lexists(path) and (paths.isdir(path) if kind == "file" else not paths.isdir(path)):
      what = "a directory" if kind == "dir" else "a file"
      raise UserError(
        f"{path} is in the way: train.py writes {what} there", "move it, or use another --workdir"
      )
  lock = paths.join(workdir, LOCK)
  if paths.islink(lock) or (
    paths.isfile(lock)
    and paths.getsize(lock)
    and not ({"host", "pid"} <= set(make_lock(lock).read_file(lock)))
  ):
    raise UserError(
      f"{lock} is not a train.py lock (a link, or a file of yours); train.py takes "
      "over and deletes stale locks of its own only",
      "move it, or use another --workdir",
    )
  saved = read_saved_config(workdir)
  if saved is not None and not all(k in saved for k in CONFIG_KEYS):
    path = paths.join(workdir, CONFIG)
    raise UserError(
      f"{path} is not a salad_jax config (no {'/'.join(CONFIG_KEYS)} settings); "
      "train.py replaces the config.json of its own runs only",
      "move it, or use another --workdir",
    )


# ------------------------------------------------------------------------------ settings
def config_dict(config) -> dict[str, Any]:
  """A ConfigDict as plain JSON values (tuples become lists), as config.json stores it."""
  return json.loads(config.to_json_best_effort())


def _flat(d: Mapping[str, Any]) -> dict[str, Any]:
  return traverse_util.flatten_dict(dict(d), sep=".")


def may_change(key: str) -> bool:
  return any(fnmatch.fnmatchcase(key, p) for p in MAY_CHANGE)


_UNSET = object()


def differences(saved: Mapping, new: Mapping, defaults: Mapping) -> list[tuple[str, Any, Any]]:
  """(key, saved value, new value) for every setting that differs. A key the saved config lacks
  (added to salad_jax since) counts as its default; a key the new one lacks as unset."""
  a, b, d = _flat(saved), _flat(new), _flat(defaults)
  out = []
  for k in sorted(set(a) | set(b)):
    old = a.get(k, d.get(k, _UNSET))
    cur = b.get(k, _UNSET)
    if old != cur:
      out.append((k, old, cur))
  return out


def _show(v: Any) -> str:
  return "(not set)" if v is _UNSET else json.dumps(v)


def describe(diffs) -> str:
  return "; ".join(
    f"{k}: {_show(o)} -> {_show(n)}" + (f" ({WHY_FIXED[k]})" if k in WHY_FIXED else "")
    for k, o, n in diffs
  )


def has_checkpoints(workdir: str) -> bool:
  d = paths.join(workdir, CHECKPOINTS)
  return paths.isdir(d) and any(x.isdigit() for x in paths.listdir(d))


def read_saved_config(workdir: str) -> dict | None:
  path = paths.join(workdir, CONFIG)
  if not paths.exists(path):
    return None
  try:
    saved = json.loads(paths.read_text(path))
    if not isinstance(saved, dict):
      raise ValueError(f"a JSON {type(saved).__name__}, not an object")
  except (ValueError, UnicodeDecodeError) as e:
    history = paths.join(workdir, HISTORY)
    copies = f" (earlier copies are in {history})" if paths.isdir(history) else ""
    raise UserError(
      f"{path} is corrupt ({e}); it records the settings of the run in {workdir}",
      f"restore it{copies}, or start a fresh run with another --workdir",
    ) from None
  return saved


def record_config(config, workdir: str, defaults: Mapping | None = None) -> list[tuple]:
  """Compares `config` with the workdir's config.json, then writes it and its history entry.

  Raises a `UserError` naming every difference that cannot change across a resume (nothing is
  written then). Returns the allowed differences.
  """
  new = config_dict(config)
  saved = read_saved_config(workdir)
  diffs = []
  if saved is not None:
    diffs = differences(saved, new, config_dict(base_config()) if defaults is None else defaults)
    # a key salad_jax no longer has cannot be set: reported, not an error
    fixed = [x for x in diffs if not may_change(x[0]) and x[2] is not _UNSET]
    if fixed and has_checkpoints(workdir):
      raise UserError(
        f"{workdir} holds checkpoints of a run with other settings, which cannot change when "
        f"resuming: {describe(fixed)}",
        f"resume with the settings in {paths.join(workdir, CONFIG)} (logging, evaluation, "
        "checkpointing and speed settings may change), or start a fresh run with another "
        "--workdir",
      )
    if diffs:
      when = "resuming with" if has_checkpoints(workdir) else "no checkpoint yet; starting with"
      print(f"{workdir}: {when} changed settings: {describe(diffs)}", flush=True)
      logging.info("changed settings in %s: %s", workdir, describe(diffs))
  history = paths.join(workdir, HISTORY)
  paths.makedirs(history)
  entries = sorted(
    x
    for x in (paths.listdir(history) if paths.isdir(history) else [])
    if x[:3].isdigit() and x.endswith(".json")
  )
  if not entries and saved is not None:  # a workdir from before the history: keep its config
    cfg = paths.join(workdir, CONFIG)
    mtime = time.time() if paths.is_url(cfg) else os.path.getmtime(cfg)
    _write_json(paths.join(history, f"000-{utc_stamp(mtime)}.json"), saved)
    entries = ["000"]
  n = int(entries[-1][:3]) + 1 if entries else 1
  _write_json(paths.join(history, f"{n:03d}-{utc_stamp(time.time())}.json"), new)
  _write_json(paths.join(workdir, CONFIG), new)
  return diffs


def _write_json(path: str, obj: Any) -> None:
  with atomic.new_file(path) as tmp, open(tmp, "w") as f:
    json.dump(obj, f, indent=2)


# ------------------------------------------------------------------------------ a run's hold
class Workdir:
  """What `hold` yields: `start(config)` locks the workdir and records the config."""

  def __init__(self, workdir: str):
    self.workdir = paths.absolute(workdir)
    self.lock = make_lock(paths.join(self.workdir, LOCK))

  def start(self, config) -> None:
    import jax
    import numpy as np

    error = None
    if jax.process_index() == 0:
      try:
        destinations.check_dir(self.workdir, "--workdir", create=False)
        check_layout(self.workdir)
        paths.makedirs(self.workdir)
        self.lock.acquire()
        record_config(config, self.workdir)
      except BaseException as e:  # the other processes must hear of it, whatever it is
        self.lock.release()
        error = e
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      failed = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
      if failed and error is None:
        raise UserError(f"process 0 could not start the run in {self.workdir} (see its error)")
    if error is not None:
      raise error


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[Workdir]:
  """Checks `workdir` can be written (creating nothing); releases the lock on exit (errors
  included), if `start` took it."""
  if not str(workdir).strip():
    raise UserError("--workdir is empty", "give the directory of the run, e.g. --workdir runs/gsv")
  destinations.check_dir(workdir, "--workdir", create=False)
  run = Workdir(workdir)
  try:
    yield run
  finally:
    run.lock.release()
