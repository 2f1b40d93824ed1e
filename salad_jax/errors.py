"""How salad_jax reports mistakes a user can fix.

Library functions raise `UserError` (a `ValueError`, so `except ValueError` keeps working) or one
of the standard file errors, with a message that names what was wrong and how to fix it. The
command-line entry points (`salad_jax.cli.run`) print such errors as one line, `error: ...`,
plus an optional `hint: ...` line, and exit with status 2; anything else is a bug and keeps its
traceback. `SALAD_JAX_TRACEBACK=1` shows the traceback of user errors too.
"""

from __future__ import annotations

import os
import sys


def note(text: str) -> None:
  """One `note: ...` line on stderr: something the user may want to know; the result is right."""
  print(f"note: {text}", file=sys.stderr, flush=True)


def warning(text: str) -> None:
  """One `warning: ...` line on stderr: the result may not mean what the user thinks."""
  print(f"warning: {text}", file=sys.stderr, flush=True)


def check_checkpoint_exists(path: str, flag: str = "--checkpoint") -> None:
  """A checkpoint argument that names nothing is one line saying what it may name."""
  if not os.path.exists(path):
    raise UserError(f"{flag} {path} does not exist", "give a converted dir (convert_weights.py), "
                    "a train.py workdir, or a .ckpt/.pth/.safetensors file")


class UserError(ValueError):
  """A mistake the user can fix: `message` says what is wrong, `hint` how to fix it."""

  def __init__(self, message: str, hint: str = ""):
    super().__init__(message)
    self.message, self.hint = message, hint

  def __str__(self) -> str:
    return self.message + (f" (hint: {self.hint})" if self.hint else "")


# Errors the library raises for bad input, printed without a traceback by the entry points.
USER_ERRORS = (UserError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
               IsADirectoryError, PermissionError)


def check_output_dir(path: str, what: str = "output directory", create: bool = True) -> str:
  """Makes sure `path` is (or can become) a writable directory, before any compute.

  Creates it if missing (unless `create=False`: then it only checks that the nearest existing
  ancestor is a writable directory); a file in its place, or a directory that cannot be
  written, is a `UserError` naming the path. Returns the absolute path.
  """
  path = os.path.abspath(os.fspath(path))
  probe = path
  while not os.path.exists(probe):  # the nearest existing ancestor decides
    parent = os.path.dirname(probe)
    if parent == probe:
      break
    probe = parent
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"{what} {path} is a file, not a directory",
                    "give a directory path (it is created if missing)")
  if not os.path.isdir(probe):
    raise UserError(f"{what} {path}: {probe} is a file, not a directory",
                    "give a path whose parents are directories")
  if not os.access(probe, os.W_OK | os.X_OK):
    raise UserError(f"{what} {path} is not writable (no write permission on {probe})",
                    "choose a directory you can write to")
  if not create:
    return path
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot create {what} {path}: {e.strerror or e}",
                    "choose a directory you can write to") from None
  return path
