"""The training loop: steps are dispatched without the host ever waiting for the device.

Per step the host does three things: dispatch the jitted step on the batch already on the
devices, take the next local batch and start its transfer (double buffering: batch n+1 travels
while step n runs), and hold step n's metrics as device arrays. Nothing is read back per step
(the step's dispatch and the batch transfer run under a device-to-host transfer guard, so a
stray `float(loss)` fails loudly). Metrics are fetched together, at sync points only:

  * every `log_every_steps` and at the last step (write TensorBoard/JSONL, progress line),
  * before every checkpoint save and before every evaluation,
  * after the first step of a run (so step times exclude compilation).

At each sync point every pending step's `finite` flag is checked in order: a non-finite step
raises `NonFiniteError` naming the first bad step and the last checkpoint saved, and since a
save always comes after a check, no state at or after a bad step is ever saved.

The host runs at most `MAX_AHEAD` steps ahead of the device (it waits for step n-2 after
dispatching step n; the device still has n-1 and n queued), so batches in flight stay bounded.
(The bound also matters on XLA:CPU: hundreds of dispatched steps with collectives deadlock its
8 host devices in a rendezvous timeout; 2 or 8 steps ahead ran fine.)
`step_time` is the wall time between two log points over the steps between them, evaluation
and checkpoint saves excluded.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np

from salad_jax import sharding
from salad_jax.errors import UserError

MAX_AHEAD = 2  # steps the host may dispatch before the device has finished them
MAX_PENDING = 64  # fetch (already finished) metrics at least this often, whatever log_every_steps


class MetricsWriter:
  """Process 0 writes TensorBoard event files and a JSON-lines metrics file.

  Writes run in one background thread, in order (a TensorBoard scalar costs ~0.1 ms of Python,
  which the loop should not pay); `close()` waits for them, and a failed write is raised by the
  next `write` or by `close`.
  """

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    from concurrent.futures import ThreadPoolExecutor

    from tensorboardX import SummaryWriter
    self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics")
    self._error: BaseException | None = None

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    self._raise_failed()
    self._pool.submit(self._write, step, {k: float(v) for k, v in scalars.items()})

  def _write(self, step: int, scalars: Mapping[str, float]) -> None:
    try:
      for k, v in scalars.items():
        self.tb.add_scalar(k, v, step)
      self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
      self.jsonl.flush()
    except BaseException as e:  # noqa: BLE001  (raised in the loop's thread, see _raise_failed)
      self._error = self._error or e

  def _raise_failed(self) -> None:
    if self._error is not None:
      raise RuntimeError(f"writing metrics failed: {self._error}") from self._error

  def close(self) -> None:
    if self.enabled:
      self._pool.shutdown(wait=True)
      self.tb.close()
      self.jsonl.close()
      self._raise_failed()


class Progress:
  """tqdm bar on a terminal (advanced per step, metrics at log points); a plain line per log
  point otherwise (logs, CI). Never touches a device value."""

  def __init__(self, total: int, initial: int):
    from tqdm import tqdm
    self.main = jax.process_index() == 0
    self.tty = sys.stderr.isatty()
    self.total, self.t0, self.s0 = total, time.time(), initial
    self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                    disable=not (self.main and self.tty))

  def advance(self) -> None:
    if self.tty:
      self.bar.update(1)

  def log(self, step: int, m: Mapping[str, float]) -> None:
    if self.tty:
      self.bar.set_postfix(loss=f"{m['loss']:.4f}", b_acc=f"{m['b_acc']:.3f}", lr=f"{m['lr']:.2e}",
                           img_s=f"{m['images_per_s']:.1f}")
    elif self.main:
      rate = (step - self.s0) / max(time.time() - self.t0, 1e-9)
      eta = (self.total - step) / max(rate, 1e-9)
      print(f"step {step}/{self.total}  loss {m['loss']:.4f}  b_acc {m['b_acc']:.3f}  "
            f"lr {m['lr']:.2e}  {m['step_time']:.3f} s/step  {m['images_per_s']:.1f} img/s  "
            f"ETA {eta / 60:.1f} min", flush=True)

  def close(self) -> None:
    self.bar.close()


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


def next_batch(data_iter, mesh) -> tuple[dict[str, jax.Array], int]:
  """The next local batch, put on the devices (the transfer is asynchronous); its corrupt count."""
  local = dict(next(data_iter))
  corrupt = int(local.pop("corrupt", 0))  # a host value that comes with the batch
  return sharding.global_batch(local, mesh), corrupt


class NonFiniteError(UserError, FloatingPointError):
  """The loss, gradients, descriptors or updated params stopped being finite (a one-line error
  in train.py: nothing at or after the bad step is saved)."""


def _nonfinite(step: int, loss: float, last_saved: int | None, directory: str):
  where = (f"The last good checkpoint is step {last_saved} in {directory}" if last_saved is not None
           else "No checkpoint was saved before it")
  return NonFiniteError(f"non-finite loss or gradients at step {step} (loss={loss}); stopping, "
                        f"nothing at or after step {step} was saved. {where}",
                        "lower --config.optim.lr or check the data; rerunning the same command "
                        "resumes from the last good checkpoint")


class PendingMetrics:
  """Metrics of dispatched steps, still on the devices, oldest first."""

  def __init__(self, checkpoint_dir: str, last_saved: int | None = None):
    self.steps: list[tuple[int, dict]] = []
    self.checkpoint_dir, self.last_saved = checkpoint_dir, last_saved
    self.fetches = 0  # times metrics were read back from the devices

  def __len__(self) -> int:
    return len(self.steps)

  def add(self, step: int, metrics: dict) -> None:
    self.steps.append((step, metrics))

  def wait_for(self, age: int) -> None:
    """Blocks until the step `age` places before the newest has finished (reads nothing)."""
    if len(self.steps) > age:
      jax.block_until_ready(self.steps[-1 - age][1]["finite"])

  def fetch(self) -> tuple[int, dict[str, float]] | None:
    """Reads every pending step's metrics in one transfer; raises at the first non-finite step.

    Returns (newest step, its metrics as floats without `finite`), or None if nothing is pending.
    """
    if not self.steps:
      return None
    pending, self.steps = self.steps, []
    with jax.transfer_guard_device_to_host("allow"):
      host = jax.device_get([m for _, m in pending])
    self.fetches += 1
    for (s, _), m in zip(pending, host):
      if not bool(m["finite"]):
        raise _nonfinite(s, float(m["loss"]), self.last_saved, self.checkpoint_dir)
    return pending[-1][0], {k: float(v) for k, v in host[-1].items() if k != "finite"}


def run(config, *, state: dict, step: int, step_fn, data_iter, mesh, checkpointer, evaluator,
        writer: MetricsWriter, mc, meta: Mapping[str, Any], steps_per_epoch: int, total_steps: int,
        global_images: int, last_saved: int | None, results: dict[str, Any]) -> dict[str, Any]:
  """Trains from `step` to `total_steps` (or `config.stop_after_steps`); fills and returns `results`:
  step, state, corrupt_images, saved_step (the last checkpoint, None if none), best_step (by R@1,
  with validation), checkpoint_dir, metric_fetches (times metrics were read back), evals."""
  pending = PendingMetrics(checkpointer.directory, last_saved)
  stop_after = config.get("stop_after_steps") or 0
  log_every, save_every = config.log_every_steps, config.checkpoint.every_steps
  bar = Progress(total_steps, step)
  corrupt_total, first = 0, step
  mark_step, mark_time, excluded = step, time.perf_counter(), 0.0
  try:
    with jax.transfer_guard_device_to_host("disallow"):
      nxt = next_batch(data_iter, mesh) if step < total_steps else None
      while step < total_steps:
        batch, corrupt = nxt
        corrupt_total += corrupt
        state, metrics = step_fn(state, batch)
        step += 1
        pending.add(step, metrics)
        stop = step >= total_steps or (stop_after and step >= stop_after)
        end_of_epoch = step % steps_per_epoch == 0
        evaluate = end_of_epoch and evaluator.enabled
        save = end_of_epoch or step % save_every == 0 or stop
        log = step % log_every == 0 or stop
        position = IteratorPosition(data_iter) if save else None  # before batch n+1 is taken
        if not stop:
          nxt = next_batch(data_iter, mesh)  # batch n+1 on its way while step n runs
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
            eval_metrics = evaluator(state["params"], mc, step=step, writer=writer,
                                     label=f"epoch {step // steps_per_epoch}")
            same_on_every_process(eval_metrics)
            results["evals"][step] = eval_metrics
          if save:
            sel = ({evaluator.select_metric: eval_metrics[evaluator.select_metric]}
                   if eval_metrics else None)
            checkpointer.save(step, state, {**meta, "step": step, "eval": eval_metrics or {}},
                              position, metrics=sel)
            pending.last_saved = step
        excluded += time.perf_counter() - t
        if stop:
          break
    results["best_step"] = checkpointer.best_step() if evaluator.enabled else None
    # R@1 of the kept checkpoints, those saved before a resume included (for the last line)
    results["saved_recalls"] = {s: checkpointer.metric_of(s) for s in
                                {results["best_step"], pending.last_saved} if s is not None}
  finally:
    bar.close()
    checkpointer.close()
    writer.close()
  results.update(step=step, state=state, corrupt_images=corrupt_total, saved_step=pending.last_saved,
                 checkpoint_dir=checkpointer.directory, metric_fetches=pending.fetches)
  _summary(results, evaluator)
  return results


def same_on_every_process(metrics: Mapping[str, float] | None) -> None:
  """Evaluation is sharded over processes; every process must hold the same recalls."""
  if jax.process_count() == 1 or not metrics:
    return
  from jax.experimental import multihost_utils
  values = np.asarray([metrics[k] for k in sorted(metrics)], np.float64)
  multihost_utils.assert_equal(values, "Recall@K differs between processes: "
                                       f"{dict(sorted(metrics.items()))} on process "
                                       f"{jax.process_index()}")


def _summary(results: Mapping[str, Any], evaluator) -> None:
  evals = results["evals"]
  if 0 in evals and len(evals) > 1 and jax.process_index() == 0:
    first, last = evals[0][evaluator.select_metric], evals[max(evals)][evaluator.select_metric]
    ratio = f" ({last / first:.1f}x)" if first > 0 else ""
    print(f"\nR@1 on {evaluator.sets[0].name}: untrained {first:.2f} -> trained {last:.2f}{ratio}")
  if results["corrupt_images"]:
    print(f"{results['corrupt_images']} damaged or unreadable training images: damaged JPEGs "
          "decoded with grey fill, unreadable ones replaced by black images, as the reference "
          "does (each named in the log)")


def done_line(results: Mapping[str, Any]) -> str:
  """train.py's last line: the step reached and what is actually on disk (and, with validation,
  the best checkpoint by R@1, which `evaluate.py` and `salad_jax.load` pick from a workdir)."""
  saved, step, evals = results.get("saved_step"), results["step"], results.get("evals") or {}
  if saved is None:
    return f"done: step {step}; no checkpoint saved"

  def recall(s):
    r = evals.get(s, {}).get("R@1")
    if r is None:
      r = (results.get("saved_recalls") or {}).get(s)
    return f" (R@1 {r:.2f})" if r is not None else ""
  line = f"done: step {step}; checkpoint of step {saved}{recall(saved)} in {results['checkpoint_dir']}"
  best = results.get("best_step")
  if best is not None and best != saved:
    line += f"; best by R@1: step {best}{recall(best)}"
  return line
