"""How salad_jax reports mistakes a user can fix.

Library functions raise `UserError` (a `ValueError`, so `except ValueError` keeps working) or one
of the standard file errors, with a message that names what was wrong and how to fix it. The
command-line entry points (`salad_jax.cli.run`) print such errors as one line, `error: ...`,
plus an optional `hint: ...` line, and exit with status 2; anything else is a bug and keeps its
traceback. `SALAD_JAX_TRACEBACK=1` shows the traceback of user errors too.
"""

from __future__ import annotations

import sys


def note(text: str) -> None:
  """One `note: ...` line on stderr: something the user may want to know; the result is right."""
  print(f"note: {text}", file=sys.stderr, flush=True)


def warning(text: str) -> None:
  """One `warning: ...` line on stderr: the result may not mean what the user thinks."""
  print(f"warning: {text}", file=sys.stderr, flush=True)


class UserError(ValueError):
  """A mistake the user can fix: `message` says what is wrong, `hint` how to fix it."""

  def __init__(self, message: str, hint: str = ""):
    super().__init__(message)
    self.message, self.hint = message, hint

  def __str__(self) -> str:
    return self.message + (f" (hint: {self.hint})" if self.hint else "")


# Errors the library raises for bad input, printed without a traceback by the entry points.
USER_ERRORS = (
  UserError,
  ValueError,
  FileNotFoundError,
  FileExistsError,
  NotADirectoryError,
  IsADirectoryError,
  PermissionError,
)
