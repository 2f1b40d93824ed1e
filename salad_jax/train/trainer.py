"""SALAD training: one jitted and sharded train step, and the loop around it.

The step updates the train state of `salad_jax.train.state` ({"params", "opt", "step", "rng"},
and a ResNet's "batch_stats", updated by every step: train mode, as the official training runs
it).

The loop never waits for the devices between steps. Per step the host dispatches the jitted step
on the batch already on the devices, takes the next local batch and starts its transfer (batch n+1
travels while step n runs), and holds step n's metrics as device arrays. Nothing is read back per
step (the dispatch runs under a device-to-host transfer guard, so a stray `float(loss)` fails
loudly). Metrics are fetched together at sync points only: every `log_every_steps` and at the last
step, before every checkpoint save and evaluation, and after the first step of a run (so step
times exclude compilation). At each sync point every pending step's `finite` flag is checked in
order: a non-finite step raises `NonFiniteError` naming the first bad step and the last checkpoint
saved; a save always comes after a check, so no state at or after a bad step is ever saved.

The host runs at most `MAX_AHEAD` steps ahead of the devices (it waits for step n-2 after
dispatching step n), so batches in flight stay bounded. (The bound also matters on XLA:CPU:
hundreds of dispatched steps with collectives deadlock its 8 host devices in a rendezvous
timeout; 2 or 8 steps ahead ran fine.) `step_time` is the wall time between two log points over
the steps between them, evaluation and checkpoint saves excluded.

Any number of places, devices and processes: each process loads whole places and pads its local
batch to a multiple of its devices with invalid entries (`sharding.BatchLayout`); the step's
loss, gradients and dropout masks do not depend on positions or padding, so every layout
trains the numbers one device trains. SIGTERM (`preemption`) is a flag checked after each
step's dispatch, between evaluation batches and after a save: the step reached is saved and
`preemption.Terminated` names it (several processes stop at the same step through
jax.distributed's preemption sync point). `checkpoint.every_secs` adds time-based saves, and
`compile_cache_dir` JAX's persistent compilation cache (`compile_cache`).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from salad_jax import losses, sharding
from salad_jax.data import source
from salad_jax.data.pipeline import normalize_images
from salad_jax.evaluation.evaluate import EpochEvaluator
from salad_jax.models.config import ModelConfig
from salad_jax.models.vpr import VPRModel
from salad_jax.train import checkpoint, compile_cache, metrics, optim, preemption
from salad_jax.train import config as config_lib
from salad_jax.train import workdir as workdir_lib
from salad_jax.train.state import (
  abstract_state,
  create_state,
  eval_weights,
  freeze_regex,
  initial_variables,
  model_config,
  state_shardings,
)
from salad_jax.weights import run_checkpoints

MAX_AHEAD = 2  # steps the host may dispatch before the devices have finished them
MAX_PENDING = 64  # fetch (already finished) metrics at least this often, whatever log_every_steps


# ------------------------------------------------------------------------------ the step
def compute_loss(desc, labels, valid, loss_cfg: Mapping[str, Any]):
  """(loss, aux) of `config.loss`: any official loss and miner (`losses.vpr_loss`).

  MultiSimilarityLoss with MultiSimilarityMiner (the default) runs `multi_similarity_loss`
  with alpha, beta, base and the miner margin as epsilon, as before the other options existed
  (`loss_cfg` may still name the margin `epsilon`). Names are static: chosen at trace time.
  """
  name = loss_cfg.get("name", "MultiSimilarityLoss")
  miner = loss_cfg.get("miner", "MultiSimilarityMiner")
  miner = None if config_lib.no_miner(miner) else miner
  margin = loss_cfg.get("miner_margin", loss_cfg.get("epsilon", 0.1))
  ms = {k: loss_cfg.get(k, v) for k, v in config_lib.MS_DEFAULTS.items()}
  if name == "MultiSimilarityLoss" and miner == "MultiSimilarityMiner":
    return losses.multi_similarity_loss(desc, labels, valid=valid, epsilon=margin, **ms)
  kw = {"loss_kwargs": ms} if name == "MultiSimilarityLoss" else {}
  return losses.vpr_loss(
    desc, labels, loss=name, miner=miner, miner_margin=margin, valid=valid, **kw
  )


def make_stats_loss_fn(model_cfg: ModelConfig, loss_cfg: Mapping[str, Any]):
  """loss_fn(train, frozen, batch_stats, images_u8, labels, valid, dropout_rng, ids=None) ->
  (loss, (aux, descriptors, new batch_stats)): the model in train mode; a ResNet's BatchNorm
  statistics come from the valid examples and are returned updated (None in, None out). `ids`:
  each example's identity (keys its dropout mask; default: its position)."""
  model = VPRModel(model_cfg)

  def loss_fn(train, frozen, batch_stats, images, labels, valid, dropout_rng, ids=None):
    variables = {"params": optim.unflatten({**frozen, **train})}
    kw = dict(train=True, valid=valid, example_ids=ids, rngs={"dropout": dropout_rng})
    if batch_stats is None:
      desc, new_stats = model.apply(variables, normalize_images(images), **kw), None
    else:
      desc, updated = model.apply(
        {**variables, "batch_stats": batch_stats},
        normalize_images(images),
        mutable=["batch_stats"],
        **kw,
      )
      new_stats = updated["batch_stats"]
    desc = desc.astype(jnp.float32)
    loss, aux = compute_loss(desc, labels, valid, loss_cfg)
    return loss, (aux, desc, new_stats)

  return loss_fn


def make_loss_fn(model_cfg: ModelConfig, loss_cfg: Mapping[str, Any]):
  """loss_fn(train, frozen, images_u8, labels, valid, dropout_rng, ids=None) -> (loss, (aux,
  descriptors)); models without BatchNorm (`make_stats_loss_fn` takes and returns a ResNet's
  statistics)."""
  fn = make_stats_loss_fn(model_cfg, loss_cfg)

  def loss_fn(train, frozen, images, labels, valid, dropout_rng, ids=None):
    loss, (aux, desc, _) = fn(train, frozen, None, images, labels, valid, dropout_rng, ids)
    return loss, (aux, desc)

  return loss_fn


def make_train_step(
  model_cfg: ModelConfig,
  tx,
  freeze: str,
  loss_cfg: Mapping[str, float],
  schedule: Callable,
  mesh,
  donate: bool = True,
):
  """Returns jitted `step(state, batch) -> (state, metrics)`; batch {images u8, labels, valid,
  ids (optional: each example's identity in the step, -1 for padding; default: its position)}.

  The state keeps the layout of `state_shardings` (params and optimizer state sharded over the
  mesh's `fsdp` axis, if any); the batch is split over all devices. Loss, gradients and
  metrics do not depend on where an example sits in the batch, nor on padding entries
  (valid False): the loss and miner see every descriptor (gathered), and each example's
  dropout mask is keyed by its id. So any device count trains the same numbers.
  """
  loss_fn = make_stats_loss_fn(model_cfg, loss_cfg)

  def step(state, batch):
    # the model keeps activations batch-split under fsdp (vit.constrain_batch reads this mesh)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return _step(state, batch)

  def _step(state, batch):
    train, frozen = optim.split_trainable(state["params"], freeze)
    dropout_rng = jax.random.fold_in(state["rng"], state["step"])
    stats = state.get("batch_stats")
    ids = batch.get("ids")
    if ids is None:
      ids = jnp.arange(batch["labels"].shape[0], dtype=jnp.int32)
    (loss, (aux, desc, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      train, frozen, stats, batch["images"], batch["labels"], batch["valid"], dropout_rng, ids
    )
    updates, opt = tx.update(grads, state["opt"], train)
    train = optax.apply_updates(train, updates)
    # a non-finite loss, gradient, descriptor or updated param stops training (host side)
    finite = (
      jnp.isfinite(loss)
      & jnp.all(jnp.isfinite(desc))
      & jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves((grads, train))]))
    )
    new = {
      "params": optim.unflatten({**frozen, **train}),
      "opt": opt,
      "step": state["step"] + 1,
      "rng": state["rng"],
    }
    if stats is not None:
      new["batch_stats"] = stats
    metrics = {
      "loss": loss,
      "b_acc": aux["b_acc"],
      "lr": schedule(state["step"]),
      "pos_pairs": aux["num_pos_pairs"],
      "neg_pairs": aux["num_neg_pairs"],
      "grad_norm": optax.tree.norm(grads),
      "finite": finite,
    }
    return new, metrics

  repl, data = sharding.replicated(mesh), sharding.data_sharded(mesh)
  state_sh = state_shardings(abstract_state(model_cfg, tx, freeze), mesh)
  return jax.jit(
    step,
    in_shardings=(state_sh, data),  # every batch field split over the devices
    out_shardings=(state_sh, repl),
    donate_argnums=(0,) if donate else (),
  )


# ------------------------------------------------------------------------------ the loop
def next_batch(data_iter, mesh, local_images: int = 0) -> tuple[dict[str, jax.Array], int]:
  """The next local batch, padded to `local_images` entries (`sharding.BatchLayout`) and put on
  the devices (the transfer is asynchronous); its corrupt count."""
  local = dict(next(data_iter))
  corrupt = int(local.pop("corrupt", 0))  # a host value that comes with the batch
  if local_images:
    local = sharding.pad_batch(local, local_images)
  return sharding.global_batch(local, mesh), corrupt


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains per `config`, evaluating at every epoch end; resumes from `workdir` if it can.

  Holds the workdir's lock until it returns or raises (`salad_jax.train.workdir`). Returns the
  results: step, state, corrupt_images, saved_step (the last checkpoint, None if none), best_step
  (by R@1, with validation), checkpoint_dir, metric_fetches (times metrics were read back), evals.

  SIGTERM (`preemption`): the run saves the step it reached after the step in flight (a save in
  progress completes; an evaluation in progress stops between batches and is skipped) and
  raises `preemption.Terminated` naming the saved step; before the first step it raises with
  nothing saved.
  """
  config_lib.check(config)  # every setting, before anything is generated, written or compiled
  preemption.cooperate()  # from here SIGTERM sets a flag that the loop checks at safe points
  with contextlib.ExitStack() as stack:
    run = stack.enter_context(workdir_lib.hold(workdir))
    # ---- set-up: every check before anything is written or compiled
    sharding.maybe_initialize_distributed()
    config_lib.check_mesh(config)  # fsdp / dcn_data against the devices, before anything runs
    poll = preemption.Poll()
    mesh = sharding.make_mesh(fsdp=config.mesh.fsdp, dcn_data=config.mesh.get("dcn_data", 0))
    model_cfg = model_config(config)
    data = source.open_source(config)  # raises with instructions before anything compiles
    config_lib.check_data(config, data.num_places)
    evaluator = EpochEvaluator(config, mesh)  # checks eval sets exist before anything compiles
    preemption.stop_if_terminated(poll)
    run.start(config)  # lock; compare with the saved config.json before writing anything
    cache = compile_cache.cache_dir(config.get("compile_cache_dir", ""), workdir)
    stack.enter_context(compile_cache.enabled(cache))

    global_images = config.data.places_per_batch * config.data.img_per_place
    layout = sharding.batch_layout(config.data.places_per_batch, config.data.img_per_place, mesh)
    data_iter, spec = source.make_iterator(config, data, jax.process_index(), jax.process_count())
    steps_per_epoch = spec.steps_per_epoch
    total_steps = config.num_epochs * steps_per_epoch
    tx, schedule = optim.make_optimizer(config.optim, steps_per_epoch)
    freeze = freeze_regex(config, model_cfg)
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    params, batch_stats = initial_variables(config, model_cfg, init_rng)
    state = create_state(params, tx, freeze, mesh, state_rng, batch_stats)
    train, frozen = optim.split_trainable(state["params"], freeze)
    config_lib.check_trainable(config, freeze, train, frozen)
    preemption.stop_if_terminated(poll)
    checkpointer = checkpoint.TrainCheckpointer(
      workdir, config.checkpoint.keep_last, config.checkpoint.keep_best, evaluator.select_metric
    )
    stack.callback(checkpointer.close)  # waits for a save in progress, whatever happens
    last_saved = None
    restored = checkpointer.restore_latest(
      checkpoint.abstract_like(state), data_iter, model=model_cfg.to_dict()
    )  # onto this run's layout
    if restored is not None:  # the newest checkpoint that restores; damaged newer ones set aside
      last_saved, state, _ = restored
      logging.info("resumed from %s at step %d", checkpointer.directory, last_saved)
      print(f"resumed from step {last_saved} ({checkpointer.directory})")
      if evaluator.enabled and jax.process_index() == 0:
        checkpointer.say_if_settings_changed(evaluator.settings)
    preemption.stop_if_terminated(poll)
    step_fn = make_train_step(model_cfg, tx, freeze, dict(config.loss), schedule, mesh)
    writer = metrics.MetricsWriter(workdir)
    stack.callback(writer.close)
    meta = {
      "model": model_cfg.to_dict(),
      "steps_per_epoch": steps_per_epoch,
      "total_steps": total_steps,
    }
    step = int(np.asarray(state["step"]))
    print(
      f"training {model_cfg.describe()}: {spec.num_places} places, {steps_per_epoch} "
      f"steps/epoch, {config.num_epochs} epochs, {global_images} images/step, "
      f"{sum(x.size for x in train.values()):,} trainable params, {jax.device_count()} device(s)"
    )
    if layout.padding and jax.process_index() == 0:
      print(layout.describe(), flush=True)
    results: dict[str, Any] = {"evals": {}}
    if step == 0 and config.eval.at_start and evaluator.enabled:
      try:
        results["evals"][0] = evaluator(
          eval_weights(state), model_cfg, step=0, writer=writer, label="untrained"
        )
      except preemption.EvaluationInterrupted:
        raise preemption.Terminated(preemption.BEFORE_FIRST_STEP) from None

    # ---- the loop
    pending = metrics.PendingMetrics(checkpointer.directory, last_saved)
    stop_after = config.get("stop_after_steps") or 0
    log_every, save_every = config.log_every_steps, config.checkpoint.every_steps
    timed = preemption.TimedSaves(config.checkpoint.get("every_secs", 0) or 0, log_every)
    bar = stack.enter_context(contextlib.closing(metrics.Progress(total_steps, step)))
    corrupt_total, first = 0, step
    mark_step, mark_time, excluded = step, time.perf_counter(), 0.0
    with jax.transfer_guard_device_to_host("disallow"):
      nxt = next_batch(data_iter, mesh, layout.local_images) if step < total_steps else None
      while step < total_steps:
        if step == first:
          preemption.stop_if_terminated(poll)  # a SIGTERM while the first batch was read
        batch, corrupt = nxt
        corrupt_total += corrupt
        state, step_metrics = step_fn(state, batch)
        step += 1
        pending.add(step, step_metrics)
        terminate = poll(step)  # SIGTERM (one process), or the preemption sync point (several)
        stop = step >= total_steps or (stop_after and step >= stop_after)
        end_of_epoch = step % steps_per_epoch == 0
        evaluate = end_of_epoch and evaluator.enabled and not terminate
        save = end_of_epoch or step % save_every == 0 or stop or terminate or timed.due(step)
        log = step % log_every == 0 or stop
        # the data position before batch n+1 is taken
        position = checkpoint.IteratorPosition(data_iter) if save else None
        if not (stop or terminate):
          nxt = next_batch(data_iter, mesh, layout.local_images)  # batch n+1 on its way
        bar.advance()
        pending.wait_for(MAX_AHEAD)  # step n-2 done (no read): the host stays <= 2 steps ahead
        if not (log or save or evaluate or step == first + 1 or len(pending) >= MAX_PENDING):
          continue
        # ---- a sync point: fetch and check every pending step
        fetched = pending.fetch()
        now = time.perf_counter()
        if step == first + 1 and not log:
          mark_step, mark_time, excluded = step, now, 0.0  # step times without the compilation
        if log:
          _, m = fetched
          dt = (now - mark_time - excluded) / max(step - mark_step, 1)
          m.update(step_time=dt, images_per_s=global_images / dt, corrupt_images=corrupt_total)
          writer.write(step, m)
          bar.log(step, m)
          mark_step, mark_time, excluded = step, now, 0.0
        t = time.perf_counter()
        with jax.transfer_guard_device_to_host("allow"):
          eval_metrics = None
          if evaluate:
            try:
              eval_metrics = evaluator(
                eval_weights(state),
                model_cfg,
                step=step,
                writer=writer,
                label=f"epoch {step // steps_per_epoch}",
              )
            except preemption.EvaluationInterrupted:  # SIGTERM: save this step unevaluated
              terminate = True
            else:
              metrics.same_on_every_process(eval_metrics)
              results["evals"][step] = eval_metrics
          if save:
            settings = evaluator.settings if eval_metrics else {}
            sel = (
              {
                evaluator.select_metric: eval_metrics[evaluator.select_metric],
                run_checkpoints.SETTINGS: settings["fingerprint"],
                run_checkpoints.SETTINGS_TEXT: settings["text"],
              }
              if eval_metrics
              else None
            )
            checkpointer.save(
              step,
              state,
              {
                **meta,
                "step": step,
                "eval": eval_metrics or {},
                run_checkpoints.SETTINGS: settings,
              },
              position,
              metrics=sel,
            )
            pending.last_saved = step
            timed.saved()
        excluded += time.perf_counter() - t
        if save and poll.requested_here():  # a SIGTERM during the evaluation or the save
          terminate = True
        if terminate:  # the save completes as the stack unwinds (checkpointer.close)
          raise preemption.Terminated(preemption.saved_message(step, checkpointer.directory))
        if stop:
          break
    checkpointer.wait()  # the last save's metrics are on disk: rank every kept checkpoint
    best, other_bests = checkpointer.best()  # as salad_jax.load(workdir) picks it
    results["best_step"] = best.step if best else None
    results["best_settings"] = best.text if best else ""
    results["other_bests"] = other_bests  # the best under each earlier eval settings, kept
    # R@1 of the kept checkpoints, those saved before a resume included (for the last line)
    results["saved_recalls"] = {
      s: checkpointer.metric_of(s)
      for s in {results["best_step"], pending.last_saved}
      if s is not None
    }
    stack.close()  # the progress bar, the metrics writer, the checkpointer, the lock; in order
    results.update(
      step=step,
      state=state,
      corrupt_images=corrupt_total,
      saved_step=pending.last_saved,
      checkpoint_dir=checkpointer.directory,
      metric_fetches=pending.fetches,
    )
    metrics.summary(results, evaluator)
    return results
