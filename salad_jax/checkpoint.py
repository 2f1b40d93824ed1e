"""Orbax checkpoints of a training run: params, optimizer state, step, rng and the grain iterator.

Layout: `<workdir>/checkpoints/<step>/{params, train_state, data, meta}`. `params` alone is
what inference needs (`salad_jax.load(workdir)`), so it is its own item. Keeps the last N
checkpoints and the best M by a validation metric; saves are atomic (Orbax writes to a tmp dir
and renames), so an interrupted save never damages an earlier checkpoint.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint.checkpoint_managers import AnyPreservationPolicy, BestN, LatestN

from salad_jax.errors import UserError
from salad_jax.models.vpr import ModelConfig

CHECKPOINTS = "checkpoints"


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
    options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=not read_only,
                                           read_only=read_only, enable_async_checkpointing=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"params": ocp.StandardCheckpointHandler(),
                       "train_state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    return self.manager.best_step()

  def save(self, step: int, state: dict, meta: dict, data_iter=None,
           metrics: dict | None = None) -> None:
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

  def check_compatible(self, step: int, abstract_state: dict, model: dict | None = None) -> None:
    meta = self.manager.item_metadata(step)
    saved = {"params": _shapes(meta["params"]), "train_state": sorted(_shapes(meta["train_state"]).values())}
    want = {"params": _shapes(abstract_state["params"]),
            "train_state": sorted(_shapes({k: v for k, v in abstract_state.items() if k != "params"}).values())}
    if saved == want:
      return
    saved_model = self.manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"].get("model", {})
    fields = [f"config.model.{k}={model[k]!r} (checkpoint: {saved_model[k]!r})"
              for k in sorted(SHAPE_FIELDS) if model and k in saved_model and saved_model[k] != model[k]]
    diff = sorted(set(saved["params"].items()) ^ set(want["params"].items()))[:3]
    what = ("; ".join(fields) if fields else
            "param shapes differ: " + ", ".join(f"{k} {v}" for k, v in diff) if diff else
            "the trainable params differ (config.optim.freeze?)")
    raise UserError(f"checkpoint step {step} in {self.directory} was saved for another model: {what}",
                    "resume with the settings it was trained with (its meta/ holds them), or start "
                    "a new run with another --workdir; the checkpoint is left as it is")

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
  with _quiet():
    return _load(directory, step, step_given, which)


def _load(directory: str, step: int, step_given: bool, which: str):
  import numpy as np
  mngr = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True),
      item_handlers={"params": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
  try:
    def meta_of(s):
      return mngr.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    meta = meta_of(step)
    if which == "best" and not step_given:
      scored = [(m["eval"]["R@1"], s) for s in mngr.all_steps()
                for m in [meta_of(s)] if m.get("eval", {}).get("R@1") is not None]
      if scored:
        step = max(scored)[1]
        meta = meta_of(step)
    tree = mngr.item_metadata(step)["params"]
    target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), tree)
    params = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(target)))["params"]
  finally:
    mngr.close()
  source = {"checkpoint": os.path.join(directory, str(step)), "step": step,
            "eval": meta.get("eval", {})}
  return params, ModelConfig.from_dict(meta["model"]), source
