"""Reading Orbax checkpoints: a params tree onto the host, and the noise of a failed restore."""

from __future__ import annotations

import inspect
import logging as std_logging
import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from salad_jax.errors import UserError


def quiet_orphaned_reads() -> None:
  """Called before restoring. When an Orbax restore fails, its other pending reads are orphaned,
  and each one reports again, after the restore's own error was raised and reported: it finishes
  on the closed event loop ("RuntimeError: Event loop is closed"), or is collected holding its
  read error ("Exception ignored in <coroutine ...>", via sys.unraisablehook), or its task is
  collected unretrieved ("Task exception was never retrieved", via the asyncio logger). With the
  TensorStore spec each is ~2 KB: one removed data file made up to 135 KB of stderr, enough to
  fill a pipe and block the process. Exactly those are dropped; anything else gets through."""
  previous = sys.unraisablehook
  if getattr(previous, "salad_jax", False):
    return
  orbax_dir = os.path.dirname(ocp.__file__) + os.sep

  def hook(unraisable):
    e, obj = unraisable.exc_value, unraisable.object
    closed_loop = isinstance(e, RuntimeError) and str(e) == "Event loop is closed"
    orbax_orphan = (
      inspect.iscoroutine(obj)
      and isinstance(e, Exception)
      and obj.cr_code.co_filename.startswith(orbax_dir)
    )
    if not (closed_loop or orbax_orphan):
      previous(unraisable)

  def unretrieved_orbax_task(record) -> bool:  # a logging filter: False drops the record
    msg = str(record.msg)
    return not (
      msg.startswith("Task exception was never retrieved") and f"defined at {orbax_dir}" in msg
    )

  sys.unraisablehook = hook
  std_logging.getLogger("asyncio").addFilter(unretrieved_orbax_task)


def restore_params(path: str) -> dict:
  """Restores an Orbax params tree saved with StandardSave, as numpy arrays on the host."""
  ckptr = ocp.StandardCheckpointer()
  try:
    meta = ckptr.metadata(path)
    tree = getattr(meta, "item_metadata", meta)
    target = jax.tree.map(
      lambda m: np.empty(m.shape, m.dtype), tree.tree if hasattr(tree, "tree") else tree
    )
    return ckptr.restore(path, target)
  finally:
    ckptr.close()


def short_reason(e: BaseException) -> str:
  """One short line: the message's first line, without TensorStore's pointer to more details."""
  text = e.message if isinstance(e, UserError) else str(e)
  text = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
  text = text.split(" See full TensorStore details")[0]
  text = text if len(text) <= 160 else text[:157] + "..."
  return f"{type(e).__name__}: {text}" if text else type(e).__name__
