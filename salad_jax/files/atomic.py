"""Writing beside a user's files: a name of our own, one rename, nothing else touched.

Every file or directory salad_jax writes next to a path a user chose is first written under a
name created exclusively for it in the destination's folder (O_EXCL or mkdir: never an existing
name, never through a link), `.<name>.salad_tmp_<random>`, with the mode a new
file gets under the umask, and then renamed onto the destination. If anything fails, the
temporary is removed. A temporary directory holds a marker file (host and pid) until the rename;
a leftover of a killed run is mentioned (`remove_leftovers`), never deleted.

Write failures (full disk, quota, read-only file system, no permission) are one `UserError`
naming the destination and the reason (`write_error`).

On an object store (`gs://...`, `salad_jax.files.paths.is_url`) there is no rename and no
exclusive create of a name of one's own; a single upload is atomic instead: `new_file` yields a
local temporary file and uploads it whole when the block succeeds (readers see the old object or
the new one, never a part); a failed block uploads nothing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import socket
from typing import IO, Callable, Iterator

from salad_jax.errors import UserError, note
from salad_jax.files import paths

TAG = ".salad_tmp_"
MARKER = ".salad_jax_tmp"  # inside a temporary directory: "<host> <pid>"
DISK_ERRNOS = {
  errno.ENOSPC: "no space left on the device",
  errno.EDQUOT: "disk quota exceeded",
  errno.EROFS: "read-only file system",
  errno.EACCES: "permission denied",
  errno.EPERM: "operation not permitted",
}


def exception_chain(exc: BaseException | None) -> Iterator[BaseException]:
  """`exc`, then what caused it (`__cause__`, else `__context__`), each once."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    yield exc
    exc = exc.__cause__ or exc.__context__


def os_errno(exc: BaseException) -> int | None:
  """The errno behind an exception: an OSError in its cause/context chain, or tensorstore's
  `[os_error_code='28']` in a message (Orbax wraps those in ValueError)."""
  for e in exception_chain(exc):
    if isinstance(e, OSError) and e.errno:
      return e.errno
    m = re.search(r"os_error_code='?(\d+)", str(e))
    if m:
      return int(m.group(1))
  return None


def write_error(path: str, exc: BaseException) -> UserError | None:
  """A one-line `UserError` for a failed write to `path`, or None if `exc` is no OS failure."""
  code = os_errno(exc)
  if code is None and paths.is_url(path):  # gcsfs: 403 is a bare OSError("Forbidden: ...")
    text = next((str(e) for e in exception_chain(exc) if isinstance(e, OSError)), "")
    if text.startswith(("Forbidden", "Unauthorized")) or isinstance(exc, PermissionError):
      code = errno.EACCES
  if code is None:
    return None
  reason = DISK_ERRNOS.get(code) or os.strerror(code).lower()
  hint = (
    "free some space there, or choose another destination"
    if code in (errno.ENOSPC, errno.EDQUOT)
    else "choose a destination you can write to"
  )
  return UserError(f"cannot write {path}: {reason}; nothing was written", hint)


def check_space(path: str, nbytes: int) -> None:
  """Refuses early when the file system of `path`'s folder has not room for `nbytes` (+5 %).
  An object store has no such figure: nothing to check."""
  if paths.is_url(path):
    return
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.isdir(parent):
    parent = os.path.dirname(parent)
  free = shutil.disk_usage(parent).free
  need = int(nbytes * 1.05) + (1 << 20)
  if free < need:
    raise UserError(
      f"cannot write {path}: it needs ~{need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB "
      "are free there; nothing was written",
      "free some space there, or choose another destination",
    )


def probe(path: str) -> None:
  """Creates and removes a temporary file in `path`'s folder: a folder the OS will not let us
  write to (read-only, /proc, permissions) is refused before any work. On an object store the
  same with a small object (a missing bucket or no write permission is refused)."""
  if paths.is_url(path):
    probe_url(path)
    return
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    return  # created later; destinations.check_dir checked its nearest existing ancestor
  try:
    os.remove(_fresh(path, _make_file))
  except OSError as e:
    raise write_error(path, e) or UserError(f"cannot write {path}: {e}") from None


def probe_url(path: str) -> None:
  """Uploads and deletes `.<name>.salad_tmp_<random>` beside the URL `path`."""
  tmp = paths.join(paths.parent(path), f".{paths.name(path)}{TAG}{secrets.token_hex(4)}")
  try:
    f, p = paths.fs(tmp)
    f.pipe_file(p, b"", mode="create")
    f.rm_file(p)
  except Exception as e:  # noqa: BLE001  (fsspec raises OSError, FileNotFoundError, ...)
    err = write_error(path, e)
    raise err or UserError(
      f"cannot write {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
      "check the bucket's name and your write permission on it",
    ) from None


def _fresh(path: str, make) -> str:
  """A new name `.<name>.salad_tmp_<random>` beside `path`, created by `make(name)` exclusively
  (O_EXCL / mkdir: never an existing name, never through a link). The kernel applies the umask
  to the mode `make` asks for, as for any new file: no process-wide umask change."""
  parent = os.path.dirname(os.path.abspath(path))
  prefix = os.path.join(parent, f".{os.path.basename(path)}{TAG}")
  for _ in range(100):
    tmp = prefix + secrets.token_hex(4)
    try:
      make(tmp)
      return tmp
    except FileExistsError:
      continue
  raise FileExistsError(f"no free temporary name beside {path}")


def _make_file(tmp: str) -> None:
  os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666))


@contextlib.contextmanager
def new_file(path: str) -> Iterator[str]:
  """Yields a fresh temporary file beside `path`; renamed onto `path` when the block succeeds.
  For a URL: a local temporary file, uploaded whole onto `path` when the block succeeds."""
  if paths.is_url(path):
    with _upload_on_success(path) as tmp:
      yield tmp
    return
  try:
    tmp = _fresh(path, _make_file)
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
def _upload_on_success(path: str) -> Iterator[str]:
  import tempfile

  fd, tmp = tempfile.mkstemp(prefix="salad_jax_upload_", suffix=os.path.splitext(path)[1])
  os.close(fd)
  try:
    yield tmp
    paths.upload(tmp, path)
  except Exception as e:
    err = write_error(path, e)
    if err is not None:
      raise err from e
    raise
  finally:
    with contextlib.suppress(OSError):
      os.remove(tmp)


def write_with(path: str, write: Callable[[IO[bytes]], None]) -> None:
  """`write(f)` into a fresh temporary file opened for binary writing, then renamed onto `path`
  (uploaded, for a URL): an existing file (and any hard link to it, a `cp -al` backup) is never
  written into. Libraries that pick a format from the file name get the file object: say the
  format (`np.save(f, a)`, `image.save(f, format="JPEG")`)."""
  with new_file(path) as tmp, open(tmp, "wb") as f:
    write(f)


def write_bytes(path: str, data: bytes) -> None:
  write_with(path, lambda f: f.write(data))


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode())


@contextlib.contextmanager
def new_dir(path: str) -> Iterator[str]:
  """Yields a fresh temporary directory beside `path` (marked as ours until the rename); the
  caller renames it into place (`os.replace`) before the block ends, else it is removed."""
  try:
    tmp = _fresh(path, lambda t: os.mkdir(t, 0o777))
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
  parent = paths.parent(path)
  prefix = f".{paths.name(path)}{TAG}"
  try:
    names = sorted(n for n in paths.listdir(parent) if n.startswith(prefix))
  except OSError:
    return
  if names:
    where = paths.join(parent, names[0]) + (f" and {len(names) - 1} more" if len(names) > 1 else "")
    note(
      f"{where} look(s) like leftovers of an interrupted salad_jax save of {path}; delete them "
      "if no salad_jax run is writing there"
    )
