"""Orbax's log records that nobody can act on, filtered out (installed on import).

Saves between validations carry no metrics, and Orbax warns about each one. A save that fails on
the file system (full disk, quota, read-only, permission) makes each of Orbax's threads log the
same traceback, then the asyncio logger once more per array; the checkpointer raises it once,
as one line with a hint (`salad_jax.train.checkpoint.TrainCheckpointer`), using
`write_failure` to recognise it. Any other record gets through.
"""

from __future__ import annotations

import logging as std_logging
import os

import orbax.checkpoint as ocp
from absl import logging

from salad_jax.files import atomic


class _NoUntrackedMetricNotice:
  """Saves between validations carry no metrics; Orbax warns about each one (nothing to act on)."""

  def filter(self, record) -> bool:
    return "did not provide metrics" not in str(record.getMessage())


logging.get_absl_logger().addFilter(_NoUntrackedMetricNotice())

_ORBAX_DIR = os.path.dirname(ocp.__file__) + os.sep


def write_failure(exc: BaseException | None, text: str = "") -> bool:
  """A failed write of the file system (full disk, quota, read-only, permission), or what the
  threads of a failed save raise after it (the interpreter shutting down under them)."""
  return (exc is not None and atomic.os_errno(exc) is not None) or any(
    s in text or (exc is not None and s in str(exc))
    for s in ("os_error_code=", "cannot schedule new futures after interpreter shutdown")
  )


class _NoOrbaxWriteFailureTracebacks:
  """A save that fails on the file system makes each of Orbax's threads log the same traceback
  (~450 lines for one full disk); the main thread raises it once, as one line with a hint
  (`TrainCheckpointer._save_error`). Other Orbax errors get through."""

  def filter(self, record) -> bool:
    if record.levelno < std_logging.ERROR or not record.pathname.startswith(_ORBAX_DIR):
      return True
    exc = record.exc_info[1] if record.exc_info else None
    return not write_failure(exc, str(record.getMessage()))


class _NoUnretrievedWriteFailures:
  """The same failure, once more per array, from the asyncio logger ("exception was never
  retrieved") as Orbax's pending writes are collected."""

  def filter(self, record) -> bool:
    text = str(record.getMessage())
    return not ("exception was never retrieved" in text and write_failure(None, text))


logging.get_absl_logger().addFilter(_NoOrbaxWriteFailureTracebacks())
std_logging.getLogger("asyncio").addFilter(_NoUnretrievedWriteFailures())
