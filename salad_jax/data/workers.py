"""Worker processes that die with the process that started them.

`kill -9` of `evaluate.py --num_workers 2` left its two grain workers (~225 MB each) and the
multiprocessing resource tracker running, with 62 /dev/shm segments, until killed by hand: a
process killed that way runs no cleanup, and nothing told its workers. Every worker salad_jax
starts (grain's data workers in evaluation and training, the pack's writers) runs
`die_with_parent` as it starts: a daemon thread that polls its parent every `POLL_S` and exits
the worker when the parent is gone. The shared-memory segments the workers made are registered
with the resource tracker, which unlinks what is left once the last of them has exited (its
pipe closes), and then exits too.

A polling thread rather than `prctl(PR_SET_PDEATHSIG)`: that signal follows the parent *thread*
that started the worker (grain may start them from a helper thread), exists only on Linux, and
a forkserver's workers have the forkserver, not the main process, as their parent.
"""

from __future__ import annotations

import os
import signal
import threading
import time

POLL_S = 0.25


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process of that pid: not ours, but alive
    return True
  return True


def die_with_parent(main_pid: int, *_worker_info) -> None:
  """Exits this worker (status 1, no cleanup) once `main_pid`, the process that started it, is
  gone. A direct child notices by its parent pid changing (it is reparented when the parent
  exits, even before a zombie parent is reaped); the child of a forkserver also checks that
  `main_pid` still exists. `_worker_info`: grain's (worker index, worker count), unused."""
  first_parent = os.getppid()

  def gone() -> bool:
    if os.getppid() != first_parent:
      return True
    return first_parent != main_pid and not _alive(main_pid)

  if gone():
    os._exit(1)  # the parent died before this worker started

  def watch() -> None:
    while not gone():
      time.sleep(POLL_S)
    os._exit(1)

  threading.Thread(target=watch, name="salad_jax-die-with-parent", daemon=True).start()


def start_data_worker(main_pid: int, *worker_info) -> None:
  """grain's data workers: `die_with_parent`, and survive a SIGTERM sent to the whole process
  group (systemd on a VM being preempted, SLURM), so that the trainer can still save
  (`train/preemption.py`); grain stops them when the trainer exits. A worker whose parent is gone
  exits on SIGTERM."""
  parent = os.getppid()

  def on_sigterm(signum, frame):
    if os.getppid() != parent:
      os._exit(143)

  signal.signal(signal.SIGTERM, on_sigterm)
  die_with_parent(main_pid, *worker_info)
