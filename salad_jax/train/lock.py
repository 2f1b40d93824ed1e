"""The workdir's lock: one train.py per workdir.

`<workdir>/.lock` is created with O_CREAT and held with flock, recording {host, pid, start, time,
argv}. flock (released by the kernel when the holder dies) decides on this host and on file
systems that share locks; the recorded pid and start time make messages and detect pid reuse. A
lock recorded by another host is taken over only if its heartbeat stops.
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


class Lock:
  """`<workdir>/.lock`: O_CREAT + flock, holding {host, pid, start, time, argv} as JSON.

  flock (released by the kernel when the holder dies) decides on this host and on file systems
  that share locks; the recorded pid and start time make messages and detect pid reuse. A lock
  recorded by another host is taken over only if its heartbeat (the holder touches the file every
  `heartbeat_s`) stops for 2.5 heartbeats.
  """

  def __init__(self, path: str, heartbeat_s: float = 10.0):
    self.path, self.heartbeat_s = path, heartbeat_s
    self.fd: int | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

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
      me = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start": _proc_start(os.getpid()),
        "time": utc_stamp(time.time()),
        "argv": sys.argv,
      }
      os.ftruncate(fd, 0)
      os.pwrite(fd, json.dumps(me).encode(), 0)
      os.fsync(fd)
    except BaseException:
      os.close(fd)
      raise
    self.fd = fd
    self._stop.clear()
    self._thread = threading.Thread(target=self._beat, name="salad_jax-lock", daemon=True)
    self._thread.start()

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
    who = (
      f"{holder.get('host')} pid {holder.get('pid')} (since {holder.get('time')})"
      if holder
      else "another process"
    )
    return UserError(
      f"{os.path.dirname(self.path)} is in use by a running train.py: {who} holds {self.path}",
      "wait for that run to finish or stop it, or use another --workdir; if no run "
      f"is using it (e.g. it ran on another machine), delete {self.path}",
    )

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

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      with contextlib.suppress(OSError):
        os.utime(self.path)

  def release(self) -> None:
    if self.fd is None:
      return
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    with contextlib.suppress(OSError):
      if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
        os.unlink(self.path)
    os.close(self.fd)
    self.fd = None
