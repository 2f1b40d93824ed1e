"""The train state: its model config, trainable set, initial weights, shapes and shardings.

state = {"params": full nested params, "opt": optax state of the trainable params only,
         "step": int32, "rng": uint32[2]}, and "batch_stats" (BatchNorm running statistics)
for a ResNet backbone. `create_state` puts it on the mesh (replicated, or params and optimizer
state sharded over its `fsdp` axis: `state_shardings`); `abstract_state` gives its shapes
without computing anything (the jitted step's shardings, checkpoint restore targets);
`initial_variables` reads `config.init` (random, a salad_jax dir or a torch file). The step and
the loop that update it are `salad_jax.train.trainer`'s.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from salad_jax import sharding
from salad_jax.files import paths
from salad_jax.inference import load
from salad_jax.models.config import ModelConfig
from salad_jax.models.vpr import VPRModel, init_variables, weights_of
from salad_jax.train import optim


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  cfg = dict(config.model)
  for key in ("micro_batch", "train_micro_batch"):
    if cfg.get(key, "auto") == "auto" and jax.device_count() > 1:
      cfg[key] = 0  # micro-batching is a single-device CPU optimisation
  return ModelConfig.from_dict(cfg)


def freeze_regex(config: ml_collections.ConfigDict, model_cfg: ModelConfig) -> str:
  r = config.optim.freeze
  return optim.default_freeze_regex(model_cfg) if r == "auto" else r


def initial_variables(
  config: ml_collections.ConfigDict, model_cfg: ModelConfig, rng: jax.Array
) -> tuple[dict, dict | None]:
  """(params, batch_stats or None) of config.init: '' (random), a converted/trained salad_jax
  dir, or a torch/safetensors file.

  A file is converted with config.model's fields (a mismatch lists the offending keys); a
  DINOv2 hub or torchvision ResNet file gives the backbone (a ResNet's BatchNorm statistics
  included) and the head starts from the official modules' init.
  """
  if not config.init:
    v = jax.tree.map(np.asarray, init_variables(model_cfg, rng))
    return v["params"], v.get("batch_stats")
  fields = model_cfg.fields(model_cfg.model_fields())
  if paths.isdir(config.init):  # a local folder or a URL (gs://...)
    loaded = load(config.init)
    diff = [
      f"{f}: checkpoint {v!r}, config {fields[f]!r}"
      for f, v in loaded.config.fields(model_cfg.model_fields()).items()
      if v != fields[f]
    ]
    if diff:
      raise ValueError(f"config.init={config.init} does not fit config.model: " + "; ".join(diff))
  else:
    fields["layers_to_crop"] = tuple(fields.get("layers_to_crop", ()))
    loaded = load(config.init, rng=rng, **fields)  # a torch file, converted on the fly
  stats = None if loaded.batch_stats is None else jax.tree.map(np.asarray, loaded.batch_stats)
  return jax.tree.map(np.asarray, dict(loaded.params)), stats


def initial_params(
  config: ml_collections.ConfigDict, model_cfg: ModelConfig, rng: jax.Array
) -> dict:
  """The params of `initial_variables`."""
  return initial_variables(config, model_cfg, rng)[0]


def abstract_state(model_cfg: ModelConfig, tx, freeze: str) -> dict:
  """The train state's shapes and dtypes (jax.ShapeDtypeStruct), without computing anything."""
  x = jnp.zeros((1, *model_cfg.example_image_size(), 3))
  variables = jax.eval_shape(lambda r: VPRModel(model_cfg).init(r, x), jax.random.key(0))
  params = variables["params"]
  train, _ = optim.split_trainable(params, freeze)
  state = {
    "params": dict(params),
    "opt": jax.eval_shape(tx.init, train),
    "step": jax.ShapeDtypeStruct((), jnp.int32),
    "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
  }
  if "batch_stats" in variables:
    state["batch_stats"] = dict(variables["batch_stats"])
  return state


def state_shardings(state: Any, mesh) -> dict:
  """Params and optimizer state by the sharding rules (fsdp); step, rng and BatchNorm
  statistics replicated."""
  out = {
    "params": sharding.tree_shardings(state["params"], mesh),
    "opt": sharding.tree_shardings(state["opt"], mesh),
    "step": sharding.replicated(mesh),
    "rng": sharding.replicated(mesh),
  }
  if "batch_stats" in state:
    out["batch_stats"] = jax.tree.map(lambda _: sharding.replicated(mesh), state["batch_stats"])
  return out


def create_state(
  params: Mapping, tx, freeze: str, mesh, rng: jax.Array, batch_stats: Mapping | None = None
) -> dict:
  """The train state on `mesh` (replicated, or sharded over its `fsdp` axis); optimizer state
  for the trainable params only; `batch_stats` for a ResNet."""
  train, _ = optim.split_trainable(params, freeze)
  state = {
    "params": jax.tree.map(np.asarray, dict(params)),
    "opt": tx.init(train),
    "step": np.int32(0),
    "rng": np.asarray(rng),
  }
  if batch_stats:
    state["batch_stats"] = jax.tree.map(np.asarray, dict(batch_stats))
  return sharding.put(state, state_shardings(state, mesh))


def eval_weights(state: Mapping):
  """What evaluation takes from the train state: the params, + a ResNet's batch_stats."""
  return weights_of(state["params"], state.get("batch_stats"))
