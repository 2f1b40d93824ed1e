"""SALAD training: one jitted, sharded train step over a plain state, and the train loop.

state = {"params": full nested params, "opt": optax state of the trainable params only,
         "step": int32, "rng": uint32[2]}
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from salad_jax import losses, optim, sharding, train_loop
from salad_jax.data.pipeline import normalize_images
from salad_jax.errors import UserError, note
from salad_jax.models.vpr import ModelConfig, VPRModel, init_params
from salad_jax.train_loop import MetricsWriter, NonFiniteError  # noqa: F401 (re-exported)


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  cfg = dict(config.model)
  for key in ("micro_batch", "train_micro_batch"):
    if cfg.get(key, "auto") == "auto" and jax.device_count() > 1:
      cfg[key] = 0  # micro-batching is a single-device CPU optimisation
  return ModelConfig.from_dict(cfg)


def freeze_regex(config: ml_collections.ConfigDict, mc: ModelConfig) -> str:
  r = config.optim.freeze
  return optim.default_freeze_regex(mc) if r == "auto" else r


# ------------------------------------------------------------------------------ init
def initial_params(config: ml_collections.ConfigDict, mc: ModelConfig, rng: jax.Array) -> dict:
  """config.init: '' (random), a converted/trained salad_jax dir, or a torch/safetensors file.

  A file is converted with config.model's shapes (a mismatch lists the offending keys); a
  DINOv2 hub file gives the backbone and the head starts from torch's default init.
  """
  if not config.init:
    return jax.tree.map(np.asarray, init_params(mc, rng, image_size=224))
  import salad_jax  # loads any supported format, converting torch files on the fly
  shape = {f: getattr(mc, f) for f in sorted(salad_jax.inference.SHAPE_FIELDS)}
  if os.path.isdir(config.init):
    loaded = salad_jax.load(config.init)
    diff = [f"{f}: checkpoint {getattr(loaded.config, f)!r}, config {v!r}"
            for f, v in shape.items() if getattr(loaded.config, f) != v]
    if diff:
      raise ValueError(f"config.init={config.init} does not fit config.model: " + "; ".join(diff))
  else:
    loaded = salad_jax.load(config.init, rng=rng, **shape)
  return jax.tree.map(np.asarray, dict(loaded.params))


def abstract_state(mc: ModelConfig, tx, freeze: str) -> dict:
  """The train state's shapes and dtypes (jax.ShapeDtypeStruct), without computing anything."""
  params = jax.eval_shape(lambda r: VPRModel(mc).init(r, jnp.zeros((1, 224, 224, 3)))["params"],
                          jax.random.key(0))
  train, _ = optim.split_trainable(params, freeze)
  return {"params": dict(params), "opt": jax.eval_shape(tx.init, train),
          "step": jax.ShapeDtypeStruct((), jnp.int32), "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}


def state_shardings(state: Any, mesh) -> dict:
  """Params and optimizer state by the sharding rules (fsdp); step and rng replicated."""
  return {"params": sharding.tree_shardings(state["params"], mesh),
          "opt": sharding.tree_shardings(state["opt"], mesh),
          "step": sharding.replicated(mesh), "rng": sharding.replicated(mesh)}


def create_state(params: Mapping, tx, freeze: str, mesh, rng: jax.Array) -> dict:
  """The train state on `mesh` (replicated, or sharded over its `fsdp` axis); optimizer state
  for the trainable params only."""
  train, _ = optim.split_trainable(params, freeze)
  state = {"params": jax.tree.map(np.asarray, dict(params)), "opt": tx.init(train),
           "step": np.int32(0), "rng": np.asarray(rng)}
  return sharding.put(state, state_shardings(state, mesh))


# ------------------------------------------------------------------------------ the step
def make_loss_fn(mc: ModelConfig, loss_cfg: Mapping[str, float]):
  """loss_fn(train, frozen, images_u8, labels, valid, dropout_rng) -> (loss, (aux, descriptors))."""
  model = VPRModel(mc)

  def loss_fn(train, frozen, images, labels, valid, dropout_rng):
    params = optim.unflatten({**frozen, **train})
    desc = model.apply({"params": params}, normalize_images(images), train=True,
                       rngs={"dropout": dropout_rng}).astype(jnp.float32)
    loss, aux = losses.multi_similarity_loss(desc, labels, valid=valid, **loss_cfg)
    return loss, (aux, desc)
  return loss_fn


def make_train_step(mc: ModelConfig, tx, freeze: str, loss_cfg: Mapping[str, float],
                    schedule: Callable, mesh, donate: bool = True):
  """Returns jitted `step(state, batch) -> (state, metrics)`; batch {images u8, labels, valid}.

  The state keeps the layout of `state_shardings` (params and optimizer state sharded over the
  mesh's `fsdp` axis, if any); the batch is split over all devices.
  """
  loss_fn = make_loss_fn(mc, loss_cfg)

  def step(state, batch):
    # the model keeps activations batch-split under fsdp (vit.constrain_batch reads this mesh)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return _step(state, batch)

  def _step(state, batch):
    train, frozen = optim.split_trainable(state["params"], freeze)
    dropout_rng = jax.random.fold_in(state["rng"], state["step"])
    (loss, (aux, desc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        train, frozen, batch["images"], batch["labels"], batch["valid"], dropout_rng)
    updates, opt = tx.update(grads, state["opt"], train)
    train = optax.apply_updates(train, updates)
    # a non-finite loss, gradient, descriptor or updated param stops training (host side)
    finite = jnp.isfinite(loss) & jnp.all(jnp.isfinite(desc)) & jnp.all(jnp.stack(
        [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves((grads, train))]))
    new = {"params": optim.unflatten({**frozen, **train}), "opt": opt,
           "step": state["step"] + 1, "rng": state["rng"]}
    metrics = {"loss": loss, "b_acc": aux["b_acc"], "lr": schedule(state["step"]),
               "pos_pairs": aux["num_pos_pairs"], "neg_pairs": aux["num_neg_pairs"],
               "grad_norm": optax.tree.norm(grads), "finite": finite}
    return new, metrics

  repl, data = sharding.replicated(mesh), sharding.data_sharded(mesh)
  batch_sh = {"images": data, "labels": data, "valid": data}
  state_sh = state_shardings(abstract_state(mc, tx, freeze), mesh)
  return jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, repl),
                 donate_argnums=(0,) if donate else ())


# ------------------------------------------------------------------------------ the loop
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains per `config`, evaluating at every epoch end; resumes from `workdir` if it can.

  Holds the workdir's lock until it returns or raises (`salad_jax.workdir`).
  """
  from salad_jax import config_check
  from salad_jax import workdir as workdir_lib
  config_check.check(config)  # every setting, before anything is generated, written or compiled
  with workdir_lib.hold(workdir) as held:
    return _train_and_evaluate(config, workdir, held)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, held) -> dict[str, Any]:
  from salad_jax import checkpoint as ckpt_lib
  from salad_jax import train_data
  from salad_jax.evaluation import EpochEvaluator

  sharding.maybe_initialize_distributed()
  mesh = sharding.make_mesh(fsdp=config.mesh.fsdp)  # a bad fsdp is an error before anything runs
  mc = model_config(config)
  source = train_data.open_source(config)  # raises with instructions before anything compiles
  if config.data.places_per_batch > source.num_places:  # one batch, padded far past the data
    raise UserError(f"config.data.places_per_batch = {config.data.places_per_batch}: more than the "
                    f"{source.num_places} places of the training data",
                    f"use at most {source.num_places} (the paper: 60 of GSV-Cities' ~62,000)")
  evaluator = EpochEvaluator(config, mesh)  # checks eval sets exist before anything compiles
  held.start(config)  # lock; compare with the saved config.json before writing anything

  global_images = config.data.places_per_batch * config.data.img_per_place
  sharding.check_batch_layout(global_images, config.data.img_per_place, mesh)
  data_iter, spec = train_data.make_iterator(config, source, jax.process_index(), jax.process_count())
  steps_per_epoch = spec.steps_per_epoch
  total_steps = config.num_epochs * steps_per_epoch
  tx, schedule = optim.make_optimizer(config.optim, steps_per_epoch)
  freeze = freeze_regex(config, mc)
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  state = create_state(initial_params(config, mc, init_rng), tx, freeze, mesh, state_rng)
  checkpointer = ckpt_lib.TrainCheckpointer(workdir, config.checkpoint.keep_last,
                                            config.checkpoint.keep_best, evaluator.select_metric)
  start = None
  restored = checkpointer.restore_latest(ckpt_lib.abstract_like(state), data_iter,
                                         model=mc.to_dict())  # onto this run's layout
  if restored is not None:  # the newest checkpoint that restores; damaged newer ones set aside
    start, state, meta = restored
    logging.info("resumed from %s at step %d", checkpointer.directory, start)
    print(f"resumed from step {start} ({checkpointer.directory})")
  step_fn = make_train_step(mc, tx, freeze, dict(config.loss), schedule, mesh)
  writer = MetricsWriter(workdir)
  meta = {"model": mc.to_dict(), "steps_per_epoch": steps_per_epoch, "total_steps": total_steps}
  step = int(np.asarray(state["step"]))
  train, frozen = optim.split_trainable(state["params"], freeze)
  n_train = sum(x.size for x in train.values())
  if not train:
    raise UserError(f"config.optim.freeze={config.optim.freeze!r} freezes every parameter: "
                    "nothing would train", "use 'auto' (SALAD's frozen backbone part) or a regex "
                    "that leaves the head trainable")
  if config.optim.freeze != "auto" and freeze and not frozen:
    note(f"config.optim.freeze={freeze!r} matches no parameter: every parameter trains (use "
         "'auto' for SALAD's frozen backbone part)")
  print(f"training ViT-{mc.variant} SALAD: {spec.num_places} places, {steps_per_epoch} steps/epoch, "
        f"{config.num_epochs} epochs, {global_images} images/step, {n_train:,} trainable params, "
        f"{jax.device_count()} device(s)")
  results: dict[str, Any] = {"evals": {}}
  if step == 0 and config.eval.at_start and evaluator.enabled:
    results["evals"][0] = evaluator(state["params"], mc, step=0, writer=writer, label="untrained")
  return train_loop.run(config, state=state, step=step, step_fn=step_fn, data_iter=data_iter,
                        mesh=mesh, checkpointer=checkpointer, evaluator=evaluator, writer=writer,
                        mc=mc, meta=meta, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                        global_images=global_images, last_saved=start, results=results)
