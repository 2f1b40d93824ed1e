"""Writing beside a user's files: a name of our own, one rename, nothing else touched.

Every file or directory salad_jax writes next to a path a user chose is first written under a
name created exclusively for it (`tempfile.mkstemp`/`mkdtemp` in the destination's folder: O_EXCL,
never an existing name, never through a link), `.<name>.salad_tmp_<random>`, with the mode a new
file gets under the umask, and then renamed onto the destination. If anything fails, the
temporary is removed. A temporary directory holds a marker file (host and pid) until the rename;
a leftover of a killed run is mentioned (`remove_leftovers`), never deleted.

Write failures (full disk, quota, read-only file system, no permission) are one `UserError`
naming the destination and the reason (`write_error`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import tempfile
from typing import Iterator

from salad_jax.errors import UserError

TAG = ".salad_tmp_"
MARKER = ".salad_jax_tmp"  # inside a temporary directory: "<host> <pid>"
DISK_ERRNOS = {errno.ENOSPC: "no space left on the device",
               errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system",
               errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted"}


def _mode(base: int) -> int:
  umask = os.umask(0)
  os.umask(umask)
  return base & ~umask


def os_errno(exc: BaseException) -> int | None:
  """The errno behind an exception: an OSError in its cause/context chain, or tensorstore's
  `[os_error_code='28']` in a message (Orbax wraps those in ValueError)."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if isinstance(exc, OSError) and exc.errno:
      return exc.errno
    m = re.search(r"os_error_code='?(\d+)", str(exc))
    if m:
      return int(m.group(1))
    exc = exc.__cause__ or exc.__context__
  return None


def write_error(path: str, exc: BaseException) -> UserError | None:
  """A one-line `UserError` for a failed write to `path`, or None if `exc` is no OS failure."""
  code = os_errno(exc)
  if code is None:
    return None
  reason = DISK_ERRNOS.get(code) or os.strerror(code).lower()
  hint = ("free some space there, or choose another destination"
          if code in (errno.ENOSPC, errno.EDQUOT) else "choose a destination you can write to")
  return UserError(f"cannot write {path}: {reason}; nothing was written", hint)


def check_space(path: str, nbytes: int) -> None:
  """Refuses early when the file system of `path`'s folder has not room for `nbytes` (+5 %)."""
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.isdir(parent):
    parent = os.path.dirname(parent)
  free = shutil.disk_usage(parent).free
  need = int(nbytes * 1.05) + (1 << 20)
  if free < need:
    raise UserError(f"cannot write {path}: it needs ~{need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB "
                    "are free there; nothing was written",
                    "free some space there, or choose another destination")


def probe(path: str) -> None:
  """Creates and removes a temporary file in `path`'s folder: a folder the OS will not let us
  write to (read-only, /proc, permissions) is refused before any work."""
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    return  # created later; errors.check_output_dir checked its nearest existing ancestor
  try:
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}{TAG}", dir=parent)
    os.close(fd)
    os.remove(tmp)
  except OSError as e:
    raise write_error(path, e) or UserError(f"cannot write {path}: {e}") from None


@contextlib.contextmanager
def new_file(path: str) -> Iterator[str]:
  """Yields a fresh temporary file beside `path`; renamed onto `path` when the block succeeds."""
  parent = os.path.dirname(os.path.abspath(path))
  try:
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}{TAG}", dir=parent)
    os.fchmod(fd, _mode(0o666))
    os.close(fd)
  except OSError as e:
    raise write_error(path, e) or e from None
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException as e:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    err = write_error(path, e) if isinstance(e, Exception) else None
    if err is not None:
      raise err from e
    raise


@contextlib.contextmanager
def new_dir(path: str) -> Iterator[str]:
  """Yields a fresh temporary directory beside `path` (marked as ours until the rename); the
  caller renames it into place (`os.replace`) before the block ends, else it is removed."""
  parent = os.path.dirname(os.path.abspath(path))
  try:
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}{TAG}", dir=parent)
    os.chmod(tmp, _mode(0o777))
    with open(os.path.join(tmp, MARKER), "w") as f:
      f.write(f"{socket.gethostname()} {os.getpid()}")
  except OSError as e:
    raise write_error(path, e) or e from None
  try:
    yield tmp
  except BaseException as e:
    err = write_error(path, e) if isinstance(e, Exception) else None
    if err is not None:
      raise err from e
    raise
  finally:
    if os.path.isdir(tmp) and not os.path.islink(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


def unmark(tmp: str) -> None:
  """Removes the marker of a finished temporary directory, just before its rename."""
  os.remove(os.path.join(tmp, MARKER))


def remove_leftovers(path: str) -> None:
  """Mentions temporaries of `path` left by killed runs, never deletes them: a marker naming a
  dead pid is not proof (it can be copied or forged, and a pid of another PID namespace sharing
  the disk looks dead here), so the user decides, once, per destination."""
  parent = os.path.dirname(os.path.abspath(path))
  prefix = f".{os.path.basename(path)}{TAG}"
  try:
    names = sorted(n for n in os.listdir(parent) if n.startswith(prefix))
  except OSError:
    return
  if names:
    where = os.path.join(parent, names[0]) + (f" and {len(names) - 1} more" if len(names) > 1 else "")
    print(f"note: {where} look(s) like leftovers of an interrupted salad_jax save of {path}; "
          "delete them if no salad_jax run is writing there", flush=True)
