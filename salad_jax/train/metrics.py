"""What a training run reports: TensorBoard + JSON-lines metrics (process 0), a progress bar or
plain log lines, the metrics of dispatched steps read back only at sync points (`PendingMetrics`),
the non-finite stop, and train.py's closing lines."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np

from salad_jax.errors import UserError
from salad_jax.files import atomic, paths


class JsonLines:
  """metrics.jsonl, appended to. Locally an append-mode file, flushed per line. An object store
  has no append (epath's `open('a')` silently starts the object anew), so there the lines of
  earlier runs are read at start and the whole object is uploaded again, at most every
  `every_s` seconds and at `close()` (each upload is atomic: a reader sees whole lines)."""

  def __init__(self, path: str, every_s: float = 10.0):
    self.path, self.every_s = path, every_s
    self.remote = paths.is_url(path)
    if self.remote:
      self.text = paths.read_text(path) if paths.exists(path) else ""
      if self.text and not self.text.endswith("\n"):
        self.text += "\n"
      self.last, self.dirty = time.time(), False
    else:
      self.f = open(path, "a")

  def write(self, line: str) -> None:
    if not self.remote:
      self.f.write(line)
      self.f.flush()
      return
    self.text += line
    self.dirty = True
    if time.time() - self.last >= self.every_s:
      self._upload()

  def _upload(self) -> None:
    with atomic.new_file(self.path) as tmp, open(tmp, "w") as f:
      f.write(self.text)
    self.last, self.dirty = time.time(), False

  def close(self) -> None:
    if not self.remote:
      self.f.close()
    elif self.dirty:
      self._upload()


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

    self.tb = SummaryWriter(paths.join(workdir, "tensorboard"))  # tensorboardX writes gs:// too
    self.jsonl = JsonLines(paths.join(workdir, "metrics.jsonl"))
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
    except BaseException as e:  # noqa: BLE001  (raised in the loop's thread, see _raise_failed)
      self._error = self._error or e

  def _raise_failed(self) -> None:
    if self._error is not None:
      err = atomic.write_error(paths.parent(self.jsonl.path), self._error)
      if err is not None:  # a full disk, ...: one line with a hint
        raise err from self._error
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
    self.bar = tqdm(
      total=total,
      initial=initial,
      desc="train",
      unit="step",
      dynamic_ncols=True,
      disable=not (self.main and self.tty),
    )

  def advance(self) -> None:
    if self.tty:
      self.bar.update(1)

  def log(self, step: int, m: Mapping[str, float]) -> None:
    if self.tty:
      self.bar.set_postfix(
        loss=f"{m['loss']:.4f}",
        b_acc=f"{m['b_acc']:.3f}",
        lr=f"{m['lr']:.2e}",
        img_s=f"{m['images_per_s']:.1f}",
      )
    elif self.main:
      rate = (step - self.s0) / max(time.time() - self.t0, 1e-9)
      eta = (self.total - step) / max(rate, 1e-9)
      print(
        f"step {step}/{self.total}  loss {m['loss']:.4f}  b_acc {m['b_acc']:.3f}  "
        f"lr {m['lr']:.2e}  {m['step_time']:.3f} s/step  {m['images_per_s']:.1f} img/s  "
        f"ETA {eta / 60:.1f} min",
        flush=True,
      )

  def close(self) -> None:
    self.bar.close()


class NonFiniteError(UserError, FloatingPointError):
  """The loss, gradients, descriptors or updated params stopped being finite (a one-line error
  in train.py: nothing at or after the bad step is saved)."""


def _nonfinite(step: int, loss: float, last_saved: int | None, directory: str):
  where = (
    f"The last good checkpoint is step {last_saved} in {directory}"
    if last_saved is not None
    else "No checkpoint was saved before it"
  )
  return NonFiniteError(
    f"non-finite loss or gradients at step {step} (loss={loss}); stopping, "
    f"nothing at or after step {step} was saved. {where}",
    "lower --config.optim.lr or check the data; rerunning the same command "
    "resumes from the last good checkpoint",
  )


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


def same_on_every_process(metrics: Mapping[str, float] | None) -> None:
  """Evaluation is sharded over processes; every process must hold the same recalls."""
  if jax.process_count() == 1 or not metrics:
    return
  from jax.experimental import multihost_utils

  values = np.asarray([metrics[k] for k in sorted(metrics)], np.float64)
  multihost_utils.assert_equal(
    values,
    "Recall@K differs between processes: "
    f"{dict(sorted(metrics.items()))} on process "
    f"{jax.process_index()}",
  )


def summary(results: Mapping[str, Any], evaluator) -> None:
  evals = results["evals"]
  if 0 in evals and len(evals) > 1 and jax.process_index() == 0:
    first, last = evals[0][evaluator.select_metric], evals[max(evals)][evaluator.select_metric]
    ratio = f" ({last / first:.1f}x)" if first > 0 else ""
    print(f"\nR@1 on {evaluator.sets[0].name}: untrained {first:.2f} -> trained {last:.2f}{ratio}")
  if results["corrupt_images"]:
    print(
      f"{results['corrupt_images']} damaged or unreadable training images: damaged JPEGs "
      "decoded with grey fill, unreadable ones replaced by black images, as the reference "
      "does (each named in the log)"
    )


def done_line(results: Mapping[str, Any]) -> str:
  """train.py's last line: the step reached and what is actually on disk (and, with validation,
  the best checkpoint by R@1, which `evaluate.py` and `salad_jax.load` pick from a workdir, with
  the eval settings it was measured under, and the best kept under each earlier settings)."""
  saved, step, evals = results.get("saved_step"), results["step"], results.get("evals") or {}
  if saved is None:
    return f"done: step {step}; no checkpoint saved"

  def recall(s):
    r = evals.get(s, {}).get("R@1")
    if r is None:
      r = (results.get("saved_recalls") or {}).get(s)
    return f" (R@1 {r:.2f})" if r is not None else ""

  line = (
    f"done: step {step}; checkpoint of step {saved}{recall(saved)} in {results['checkpoint_dir']}"
  )
  best, others = results.get("best_step"), results.get("other_bests") or []
  settings = results.get("best_settings") or ""
  if best is not None and (best != saved or others):
    under = f" ({settings})" if others and settings else ""
    line += f"; best by R@1{under}: step {best}{recall(best)}"
  for c in others:  # never compared with the best above: measured under other settings
    line += (
      f"; kept step {c.step} (R@1 {c.r1:.2f}), the best under earlier eval settings ({c.text})"
    )
  return line
