"""SALAD training: one jitted, sharded train step over a plain state, and the train loop.

state = {"params": full nested params, "opt": optax state of the trainable params only,
         "step": int32, "rng": uint32[2]}
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from salad_jax import losses, optim, sharding
from salad_jax.data.pipeline import normalize_images
from salad_jax.models.vpr import ModelConfig, VPRModel, init_params


class NonFiniteError(FloatingPointError):
  """Raised when the loss or the gradients stop being finite."""


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
class MetricsWriter:
  """Process 0 writes TensorBoard event files and a JSON-lines metrics file."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    from tensorboardX import SummaryWriter
    self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    for k, v in scalars.items():
      self.tb.add_scalar(k, v, step)
    self.jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}}) + "\n")
    self.jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self.tb.close()
      self.jsonl.close()


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))


def host_metrics(metrics: Mapping[str, jax.Array]) -> dict[str, float]:
  return {k: float(np.asarray(v)) for k, v in metrics.items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains per `config`, evaluating at every epoch end; resumes from `workdir` if it can."""
  from salad_jax import checkpoint as ckpt_lib
  from salad_jax import train_data
  from salad_jax.evaluation import EpochEvaluator

  sharding.maybe_initialize_distributed()
  mesh = sharding.make_mesh(fsdp=config.mesh.fsdp)  # a bad fsdp is an error before anything runs
  mc = model_config(config)
  source = train_data.open_source(config)  # raises with instructions before anything compiles
  evaluator = EpochEvaluator(config, mesh)  # checks eval sets exist before anything compiles
  write_config(config, workdir)

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
  start = checkpointer.latest_step()
  if start is not None:
    state, meta = checkpointer.restore(start, ckpt_lib.abstract_like(state), data_iter,
                                       model=mc.to_dict())  # onto this run's layout
    logging.info("resumed from %s at step %d", checkpointer.directory, start)
    print(f"resumed from step {start} ({checkpointer.directory})")
  step_fn = make_train_step(mc, tx, freeze, dict(config.loss), schedule, mesh)
  writer = MetricsWriter(workdir)
  meta = {"model": mc.to_dict(), "steps_per_epoch": steps_per_epoch, "total_steps": total_steps}
  step = int(np.asarray(state["step"]))
  n_train = sum(x.size for x in optim.split_trainable(state["params"], freeze)[0].values())
  print(f"training ViT-{mc.variant} SALAD: {spec.num_places} places, {steps_per_epoch} steps/epoch, "
        f"{config.num_epochs} epochs, {global_images} images/step, {n_train:,} trainable params, "
        f"{jax.device_count()} device(s)")
  results: dict[str, Any] = {"evals": {}}
  if step == 0 and config.eval.at_start and evaluator.enabled:
    results["evals"][0] = evaluator(state["params"], mc, step=0, writer=writer, label="untrained")
  last_good = start
  bar = _Progress(total_steps, step, config.log_every_steps)
  corrupt_total = 0
  try:
    while step < total_steps:
      t0 = time.perf_counter()
      local = next(data_iter)
      corrupt_total += int(local.pop("corrupt", 0))
      batch = sharding.global_batch(local, mesh)
      state, metrics = step_fn(state, batch)
      m = host_metrics(metrics)
      step += 1
      if not m.pop("finite"):
        checkpointer.wait()
        raise NonFiniteError(
            f"non-finite loss or gradients at step {step} (loss={m['loss']}); stopping. The last "
            f"good checkpoint is step {last_good} in {checkpointer.directory}"
            if last_good is not None else
            f"non-finite loss or gradients at step {step} (loss={m['loss']}); stopping (no "
            "checkpoint saved yet)")
      dt = time.perf_counter() - t0
      m.update(step_time=dt, images_per_s=global_images / dt, corrupt_images=corrupt_total)
      if step % config.log_every_steps == 0 or step == total_steps:
        writer.write(step, m)
      bar.update(m)
      end_of_epoch = step % steps_per_epoch == 0
      eval_metrics = None
      if end_of_epoch and evaluator.enabled:
        epoch = step // steps_per_epoch
        eval_metrics = evaluator(state["params"], mc, step=step, writer=writer, label=f"epoch {epoch}")
        results["evals"][step] = eval_metrics
      if end_of_epoch or step % config.checkpoint.every_steps == 0 or step == total_steps:
        sel = {evaluator.select_metric: eval_metrics[evaluator.select_metric]} if eval_metrics else None
        checkpointer.save(step, state, {**meta, "step": step, "eval": eval_metrics or {}},
                          data_iter, metrics=sel)
        last_good = step
      if config.get("stop_after_steps") and step >= config.stop_after_steps:
        break  # for tests of interrupted runs: the state is checkpointed above
  finally:
    bar.close()
    checkpointer.close()
    writer.close()
  results.update(step=step, state=state, corrupt_images=corrupt_total)
  evals = results["evals"]
  if 0 in evals and len(evals) > 1 and jax.process_index() == 0:
    first, last = evals[0][evaluator.select_metric], evals[max(evals)][evaluator.select_metric]
    ratio = f" ({last / first:.1f}x)" if first > 0 else ""
    print(f"\nR@1 on {evaluator.sets[0].name}: untrained {first:.2f} -> trained {last:.2f}{ratio}")
  if corrupt_total:
    print(f"{corrupt_total} unreadable training images were replaced by black images (see log)")
  return results


class _Progress:
  """tqdm bar on a terminal; a plain line every `every` steps otherwise (logs, CI)."""

  def __init__(self, total: int, initial: int, every: int):
    import sys
    from tqdm import tqdm
    self.main = jax.process_index() == 0
    self.tty = sys.stderr.isatty()
    self.total, self.step, self.every, self.t0, self.s0 = total, initial, every, time.time(), initial
    self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                    disable=not (self.main and self.tty))

  def update(self, m: Mapping[str, float]) -> None:
    self.step += 1
    if self.tty:
      self.bar.update(1)
      self.bar.set_postfix(loss=f"{m['loss']:.4f}", b_acc=f"{m['b_acc']:.3f}", lr=f"{m['lr']:.2e}",
                           img_s=f"{m['images_per_s']:.1f}")
    elif self.main and (self.step % self.every == 0 or self.step == self.total):
      rate = (self.step - self.s0) / max(time.time() - self.t0, 1e-9)
      eta = (self.total - self.step) / max(rate, 1e-9)
      print(f"step {self.step}/{self.total}  loss {m['loss']:.4f}  b_acc {m['b_acc']:.3f}  "
            f"lr {m['lr']:.2e}  {m['step_time']:.2f} s/step  {m['images_per_s']:.1f} img/s  "
            f"ETA {eta / 60:.1f} min", flush=True)

  def close(self) -> None:
    self.bar.close()
