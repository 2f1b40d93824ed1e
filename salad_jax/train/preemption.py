"""SIGTERM (a scheduler or a spot VM stopping the job) as a request to stop at a safe point.

Raising from the signal handler (as Ctrl-C does) interrupts whatever the main thread runs: a
grain read, an Orbax save, a compile's Python frames or an atexit callback. Tried on the demo,
that ended in segmentation faults and in half-written checkpoints. Instead, while the trainer
runs (`cooperative()`), the handler only sets a flag; the loop checks it at safe points (after
each step's dispatch, between evaluation batches, after a save), saves the step it reached and
raises `Terminated`, which train.py turns into one line and exit status 143.

Several processes: jax.distributed's preemption service takes the notice (it replaces this
handler) and `multihost_utils.reached_preemption_sync_point(step)` tells every process the same
step to stop at (`Poll`). Outside the trainer (evaluate.py, convert_weights.py) the first SIGTERM
raises `Terminated` like Ctrl-C, so that the cleanups run; later ones are ignored while they do.
"""

from __future__ import annotations

import signal
import threading
import time

EXIT_STATUS = 143  # 128 + SIGTERM, what a shell reports for a process killed by it
DEFAULT_MESSAGE = "terminated (SIGTERM); rerun the same command to resume"

_requested = threading.Event()
_cooperative = False


class Terminated(KeyboardInterrupt):
  """The run stops on SIGTERM; `message` is the one line train.py prints (exit 143). A
  KeyboardInterrupt, so that `except Exception` on its way out does not swallow it."""

  def __init__(self, message: str = DEFAULT_MESSAGE):
    super().__init__(message)
    self.message = message


class EvaluationInterrupted(Exception):
  """Raised between evaluation batches when SIGTERM asks the trainer to stop (one process)."""


def _handler(signum, frame):
  first = not _requested.is_set()
  _requested.set()
  if first and not _cooperative:
    raise Terminated()


def install(replace: bool = False) -> None:
  """SIGTERM -> `_handler`, from the main thread and where nothing else handles it (a handler
  installed before us is left alone, unless `replace`)."""
  if threading.current_thread() is not threading.main_thread():
    return
  if replace or signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, _handler):
    signal.signal(signal.SIGTERM, _handler)


def request() -> None:
  """Records a SIGTERM received before `install` (train.py catches them while importing)."""
  _requested.set()


def cooperate() -> None:
  """From now on SIGTERM only sets the flag (for the rest of the process: a second SIGTERM while
  the trainer saves and exits must not raise either)."""
  global _cooperative
  _cooperative = True


def requested() -> bool:
  """A SIGTERM arrived (in this process)."""
  return _requested.is_set()


def clear() -> None:
  _requested.clear()


def check_evaluation() -> None:
  """Called between evaluation batches: stops a single-process trainer's evaluation on SIGTERM.
  Several processes evaluate in lock step and stop at a step's sync point instead."""
  if _cooperative and _requested.is_set() and _process_count() == 1:
    raise EvaluationInterrupted()


def _process_count() -> int:
  import jax

  return jax.process_count()


class Poll:
  """`poll(step)` after each step's dispatch: True when the run must save `step` and stop.

  One process: the SIGTERM flag. Several: `reached_preemption_sync_point(step)`, True at the
  same step on every process once any of them got the notice (called once per step, in order;
  a cheap local check until a notice arrives). Without a preemption service (disabled by
  `jax_enable_preemption_service`) only the local flag is seen.
  """

  def __init__(self):
    import jax

    self.multi = jax.process_count() > 1
    self.sync = None
    if self.multi:
      from jax.experimental import multihost_utils

      self.sync = multihost_utils.reached_preemption_sync_point

  def __call__(self, step: int) -> bool:
    if self.sync is not None:
      try:
        return bool(self.sync(int(step)))
      except RuntimeError:  # no preemption service (jax_enable_preemption_service=False)
        self.sync = None
    return not self.multi and _requested.is_set()

  def requested_here(self) -> bool:
    """A SIGTERM, outside the steps' sync points: during start-up, an evaluation or a save. One
    process only: several processes stop together at a step's sync point."""
    return not self.multi and _requested.is_set()


def saved_message(step: int, directory: str) -> str:
  return f"terminated (SIGTERM): saved step {step} in {directory}; rerun the same command to resume"


BEFORE_FIRST_STEP = "terminated (SIGTERM) before the first step; nothing to save"


class TimedSaves:
  """`checkpoint.every_secs`: is a time-based save due at `step`? One process: every step, by
  its clock. Several: the decision must be the same everywhere, so it is process 0's clock,
  broadcast at log steps only (a collective; the host waits for the step in flight there)."""

  def __init__(self, every_secs: float, log_every: int):
    self.every_secs, self.log_every = float(every_secs), log_every
    self.last = time.monotonic()

  def saved(self) -> None:
    self.last = time.monotonic()

  def due(self, step: int) -> bool:
    if self.every_secs <= 0:
      return False
    import jax
    import numpy as np

    elapsed = time.monotonic() - self.last >= self.every_secs
    if jax.process_count() == 1:
      return elapsed
    if step % self.log_every:
      return False
    from jax.experimental import multihost_utils

    with jax.transfer_guard_device_to_host("allow"):
      return bool(multihost_utils.broadcast_one_to_all(np.int32(elapsed)))


def stop_if_terminated(poll: Poll) -> None:
  """Start-up: a SIGTERM before the first step stops the run (nothing to save)."""
  if poll.requested_here():
    raise Terminated(BEFORE_FIRST_STEP)
