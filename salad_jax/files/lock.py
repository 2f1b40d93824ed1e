"""One run per folder: the lock of a train.py workdir (`<workdir>/.lock`) and of an output
folder (evaluate.py, `python -m salad_jax.visualize`).

Locally (`Lock`) the lock file is created with O_CREAT and held with flock, recording {host, pid,
start, time, argv}. flock (released by the kernel when the holder dies) decides on this host and
on file systems that share locks; the recorded pid and start time make messages and detect pid
reuse. A lock recorded by another host is taken over only if its heartbeat stops.

On an object store (`UrlLock`, gs://) the lock is an object created only if absent (GCS
`ifGenerationMatch=0`: of two runs starting together exactly one creates it). The holder rewrites
it every heartbeat, each time only if it still holds the generation it wrote (compare-and-swap);
a lock whose generation stops changing for 2.5 heartbeats (or that names a dead process of this
host) is taken over by a delete conditional on that generation, then the same create-if-absent;
release deletes it only if it is still the holder's generation. `make_lock(path)` picks one.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
import sys
import threading
import time

from salad_jax.errors import UserError
from salad_jax.files import paths


def utc_stamp(t: float) -> str:
  """'20261206T051230Z': a UTC time in file names and records."""
  return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _proc_start(pid: int) -> str | None:
  """Start time of a process (clock ticks since boot) and the boot id: tells pid reuse apart."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      start = f.read().rsplit(")", 1)[1].split()[19]
    with open("/proc/sys/kernel/random/boot_id") as f:
      return f"{f.read().strip()}:{start}"
  except (OSError, IndexError):
    return None


def _alive(pid: int, start: str | None) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # someone else's live process
  return start is None or _proc_start(pid) in (None, start)


def refusal(path: str, holder: dict, tool: str, flag: str) -> UserError:
  who = (
    f"{holder.get('host')} pid {holder.get('pid')} (since {holder.get('time')})"
    if holder
    else "another process"
  )
  folder = path.rsplit("/", 1)[0] if "://" in path else os.path.dirname(path)
  return UserError(
    f"{folder} is in use by a running {tool}: {who} holds {path}",
    f"wait for that run to finish or stop it, or use another {flag}; if no run "
    f"is using it (e.g. it ran on another machine), delete {path}",
  )


def _me() -> dict:
  return {
    "host": socket.gethostname(),
    "pid": os.getpid(),
    "start": _proc_start(os.getpid()),
    "time": utc_stamp(time.time()),
    "argv": sys.argv,
  }


class _Heartbeat:
  """What both locks share: the path, the tool and flag their refusals name, and a daemon
  thread that calls the lock's `_beat_once` every `heartbeat_s` while it is held (until it
  returns False)."""

  def __init__(
    self,
    path: str,
    heartbeat_s: float = 10.0,
    tool: str = "train.py",
    flag: str = "--workdir",
  ):
    self.path, self.heartbeat_s, self.tool, self.flag = path, heartbeat_s, tool, flag
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def _start_heartbeat(self) -> None:
    self._stop.clear()
    self._thread = threading.Thread(target=self._beat, name="salad_jax-lock", daemon=True)
    self._thread.start()

  def _stop_heartbeat(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      if self._beat_once() is False:
        return

  def _beat_once(self) -> bool | None:
    raise NotImplementedError


class Lock(_Heartbeat):
  """`<workdir>/.lock`: O_CREAT + flock, holding {host, pid, start, time, argv} as JSON.

  flock (released by the kernel when the holder dies) decides on this host and on file systems
  that share locks; the recorded pid and start time make messages and detect pid reuse. A lock
  recorded by another host is taken over only if its heartbeat (the holder touches the file every
  `heartbeat_s`) stops for 2.5 heartbeats.
  """

  def __init__(self, path: str, **kw):
    super().__init__(path, **kw)
    self.fd: int | None = None

  def acquire(self) -> None:
    import fcntl

    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        flocked = True
      except BlockingIOError:
        holder = self._read(fd)
        os.close(fd)
        raise self._refusal(holder) from None
      except OSError as e:  # a file system without flock: rely on the recorded pid
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
          os.close(fd)
          raise
        flocked = False
      try:
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)  # the previous holder removed the file between our open and flock: retry
    try:
      holder = self._read(fd)
      if holder:
        self._check_stale(holder, flocked)
      me = _me()
      os.ftruncate(fd, 0)
      os.pwrite(fd, json.dumps(me).encode(), 0)
      os.fsync(fd)
    except BaseException:
      os.close(fd)
      raise
    self.fd = fd
    self._start_heartbeat()

  def _check_stale(self, holder: dict, flocked: bool) -> None:
    host, pid = holder.get("host"), holder.get("pid")
    if host == socket.gethostname():
      # with flock the kernel has decided already (we hold it: the holder is gone)
      if not flocked and isinstance(pid, int) and _alive(pid, holder.get("start")):
        raise self._refusal(holder)
      reason = "that process is no longer running"
    else:  # another host: is its heartbeat still going?
      wait = 2.5 * self.heartbeat_s
      print(
        f"{self.path} was taken by {host} pid {pid}; checking for {wait:.0f} s whether that "
        "run is still alive",
        flush=True,
      )
      before = os.stat(self.path).st_mtime_ns
      time.sleep(wait)
      if os.stat(self.path).st_mtime_ns != before:
        raise self._refusal(holder)
      reason = f"its heartbeat stopped over {wait:.0f} s"
    print(
      f"taking over the stale lock {self.path} of {host} pid {pid} (since {holder.get('time')}): "
      f"{reason}",
      flush=True,
    )

  def _refusal(self, holder: dict) -> UserError:
    return refusal(self.path, holder, self.tool, self.flag)

  @staticmethod
  def read_file(path: str) -> dict:
    """The holder recorded in a lock file ({} if it is not one)."""
    try:
      fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
      return {}
    try:
      return Lock._read(fd)
    finally:
      os.close(fd)

  @staticmethod
  def _read(fd: int) -> dict:
    try:
      data = os.pread(fd, 1 << 16, 0)
      holder = json.loads(data) if data.strip() else {}
      return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
      return {}

  def _beat_once(self) -> None:
    with contextlib.suppress(OSError):
      os.utime(self.path)

  def release(self) -> None:
    if self.fd is None:
      return
    self._stop_heartbeat()
    with contextlib.suppress(OSError):
      if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
        os.unlink(self.path)
    os.close(self.fd)
    self.fd = None


class UrlLock(_Heartbeat):
  """The lock as an object on GCS (see the module docstring): create-if-absent, a heartbeat that
  rewrites it by compare-and-swap on its generation, takeover by a conditional delete."""

  def __init__(self, path: str, **kw):
    super().__init__(path, **kw)
    self.generation: str | None = None
    self.fd = None  # for code that asks whether a lock is held

  def _fs(self):
    f, p = paths.fs(self.path)
    bucket, key, _ = f.split_path(p)
    return f, p, bucket, key

  def _upload(self, data: bytes, if_generation_match: str) -> str:
    """One media upload, only if the object's generation is `if_generation_match` ("0": only
    if absent); FileExistsError (HTTP 412) otherwise. Returns the new generation."""
    f, _, bucket, key = self._fs()
    meta = json.dumps({"name": key, "contentType": "application/json"})
    body = (
      (  # a multipart upload, as gcsfs's own create-only pipe_file(mode="create") sends
        f"--==0==\nContent-Type: application/json; charset=UTF-8\n\n{meta}\n--==0==\n"
        "Content-Type: application/json\n\n"
      ).encode()
      + data
      + b"\n--==0==--"
    )
    out = f.call(
      "POST",
      f"{f._location}/upload/storage/v1/b/{bucket}/o",
      uploadType="multipart",
      headers={"Content-Type": 'multipart/related; boundary="==0=="'},
      data=body,
      ifGenerationMatch=if_generation_match,
      json_out=True,
    )
    return str(out["generation"])

  def _read(self) -> tuple[dict, str | None]:
    """(holder, generation) of the lock object; ({}, None) if there is none."""
    f, p, *_ = self._fs()
    f.invalidate_cache(p)  # the generation now, not a listing's
    try:
      info = f.info(p)
      data = f.cat_file(p)
    except FileNotFoundError:
      return {}, None
    try:
      holder = json.loads(data) if data.strip() else {}
    except ValueError:
      holder = {}
    return (holder if isinstance(holder, dict) else {}), str(info.get("generation"))

  def _delete(self, generation: str) -> None:
    f, _, bucket, key = self._fs()
    with contextlib.suppress(FileNotFoundError, FileExistsError):  # gone, or not that one
      f.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=generation)

  def acquire(self) -> None:
    me = json.dumps(_me()).encode()
    try:
      self.generation = self._upload(me, "0")
    except FileExistsError:
      holder, generation = self._read()
      if generation is not None:
        self._check_stale(holder, generation)
        self._delete(generation)
      try:
        self.generation = self._upload(me, "0")
      except FileExistsError:  # another run took it first
        raise refusal(self.path, self._read()[0], self.tool, self.flag) from None
    self._start_heartbeat()

  def _check_stale(self, holder: dict, generation: str) -> None:
    host, pid = holder.get("host"), holder.get("pid")
    if host == socket.gethostname() and isinstance(pid, int):  # this host: the pid decides
      if _alive(pid, holder.get("start")):
        raise refusal(self.path, holder, self.tool, self.flag)
      reason = "that process is no longer running"
    else:
      wait = 2.5 * self.heartbeat_s
      print(
        f"{self.path} was taken by {host} pid {pid}; checking for {wait:.0f} s whether that "
        "run is still alive",
        flush=True,
      )
      time.sleep(wait)
      if self._read()[1] != generation:
        raise refusal(self.path, holder, self.tool, self.flag)
      reason = f"its heartbeat stopped over {wait:.0f} s"
    print(
      f"taking over the stale lock {self.path} of {host} pid {pid} (since {holder.get('time')}): "
      f"{reason}",
      flush=True,
    )

  def _beat_once(self) -> bool | None:
    try:
      self.generation = self._upload(json.dumps(_me()).encode(), self.generation)
    except FileExistsError:
      print(f"warning: {self.path} was taken over by another run", file=sys.stderr, flush=True)
      return False  # stop beating
    except Exception:  # noqa: BLE001  (a network hiccup: the next beat tries again)
      pass
    return None

  def release(self) -> None:
    if self.generation is None:
      return
    self._stop_heartbeat()
    with contextlib.suppress(Exception):
      self._delete(self.generation)
    self.generation = None

  @staticmethod
  def read_file(path: str) -> dict:
    return UrlLock(path)._read()[0]


def make_lock(path: str, **kw) -> Lock | UrlLock:
  """The lock for `path`: an object on an object store, a flocked file locally."""
  return UrlLock(path, **kw) if paths.is_url(path) else Lock(path, **kw)
