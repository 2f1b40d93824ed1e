"""Paths a user names: local, or a URL (`gs://bucket/run`, any etils.epath scheme).

Every file operation of salad_jax on a path a user gave goes through here, so that a URL is never
taken for a local name (`os.path.abspath("gs://b/run")` is `<cwd>/gs:/b/run`, and `os.makedirs`
creates it without a word). Local paths keep the operating system's calls (links, modes, flock,
O_EXCL, fsync are decided by `salad_jax.files.atomic` and the lock); URLs go through
`etils.epath` (fsspec: gcsfs for gs://, from the `gcs` extra). Object stores have no folders
(a prefix is one once an object lies under it), no links, no append and no rename: writing is one
upload of a whole object (`atomic.new_file` makes it), moving a tree is copy then delete.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import posixpath
import re
import shutil
from typing import IO, Iterator

from salad_jax.errors import UserError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+://")


def is_url(path) -> bool:
  """`gs://...`, `s3://...`, any `scheme://` (a one-letter scheme is a Windows drive, not a URL)."""
  return bool(_URL.match(os.fspath(path))) if isinstance(path, (str, os.PathLike)) else False


def absolute(path) -> str:
  """An absolute local path (`os.path.abspath`), or the URL as given (no trailing slash)."""
  path = os.fspath(path)
  if is_url(path):
    scheme, rest = path.split("://", 1)
    rest = posixpath.normpath(rest) if rest.strip("/") else rest
    return f"{scheme}://{rest.lstrip('/')}"
  return os.path.abspath(path)


def real(path) -> str:
  """`os.path.realpath` for a local path; a URL as given (object stores have no links)."""
  return absolute(path) if is_url(path) else os.path.realpath(os.fspath(path))


def join(path, *parts) -> str:
  path = os.fspath(path)
  return posixpath.join(path, *parts) if is_url(path) else os.path.join(path, *parts)


def parent(path) -> str:
  """The folder holding `path` (of an absolute path; a bucket's root is its own parent)."""
  path = absolute(path)
  if is_url(path):
    scheme, rest = path.split("://", 1)
    return f"{scheme}://{rest.rsplit('/', 1)[0]}" if "/" in rest else path
  return os.path.dirname(path)


def name(path) -> str:
  return posixpath.basename(absolute(path)) if is_url(path) else os.path.basename(path)


_PACKAGES = {"gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"), "s3": ("s3fs", None)}


@functools.lru_cache(maxsize=None)
def _backend(scheme: str) -> None:
  """A scheme whose fsspec package is missing is one line saying what to install. Listings are
  not cached: Orbax (tensorstore) writes checkpoints beside fsspec, and a cached listing would
  hide them (a setting of the user's fsspec config, e.g. FSSPEC_GCS, wins)."""
  import fsspec.config

  fsspec.config.conf.setdefault(scheme, {}).setdefault("use_listings_cache", False)
  module, extra = _PACKAGES.get(scheme, (None, None))
  if module is None:
    return
  try:
    importlib.import_module(module)
  except ImportError:
    install = f"pip install 'salad-jax[{extra}]'" if extra else f"pip install {module}"
    raise UserError(f"{scheme}:// paths need the {module} package", install) from None


def epath(path):
  from etils import epath as ep

  path = os.fspath(path)
  if is_url(path):
    _backend(path.split("://", 1)[0])
  return ep.Path(path)


def fs(path):
  """(fsspec file system, its path) of a URL: what epath uses underneath, for what epath does not
  offer (create-only uploads, generations, conditional deletes)."""
  import fsspec

  path = os.fspath(path)
  _backend(path.split("://", 1)[0])
  return fsspec.core.url_to_fs(path)


# ------------------------------------------------------------------------------ queries
def exists(path) -> bool:
  """Whether `path` exists (a broken local link does not; see `lexists`)."""
  return epath(path).exists() if is_url(path) else os.path.exists(path)


def lexists(path) -> bool:
  return epath(path).exists() if is_url(path) else os.path.lexists(path)


def isdir(path) -> bool:
  return epath(path).is_dir() if is_url(path) else os.path.isdir(path)


def isfile(path) -> bool:
  return epath(path).is_file() if is_url(path) else os.path.isfile(path)


def islink(path) -> bool:
  """Object stores have no links."""
  return False if is_url(path) else os.path.islink(path)


def listdir(path) -> list[str]:
  """Names in a folder (a URL prefix); FileNotFoundError / NotADirectoryError as os.listdir."""
  if not is_url(path):
    return os.listdir(path)
  p = epath(path)
  if not p.is_dir():
    if p.exists():
      raise NotADirectoryError(f"{path} is a file, not a folder")
    raise FileNotFoundError(f"no such folder: {path}")
  return [c.name for c in p.iterdir()]


def getsize(path) -> int:
  if is_url(path):
    f, p = fs(path)
    return int(f.info(p)["size"])
  return os.path.getsize(path)


def stat_id(path) -> list[int] | None:
  """What tells one version of a regular file from another, or None if `path` is none: [size,
  mtime in ns] locally (no link followed); [size, generation] on GCS (any rewrite, even of the
  same bytes, makes a new generation), [size, hash of the ETag/mtime] elsewhere."""
  if is_url(path):
    f, p = fs(path)
    try:
      info = f.info(p)
    except FileNotFoundError:
      return None
    if info.get("type") != "file":
      return None
    version = info.get("generation") or info.get("ETag") or info.get("mtime")
    try:
      v = int(version)
    except (TypeError, ValueError):
      import zlib

      v = zlib.crc32(str(version).encode())
    return [int(info["size"]), v]
  try:
    st = os.lstat(path)
  except OSError:
    return None
  return [st.st_size, st.st_mtime_ns] if os.path.isfile(path) and not os.path.islink(path) else None


def walk_files(path) -> list[str]:
  """Every file below the folder `path`, as '/'-separated paths relative to it, sorted."""
  if not is_url(path):
    out = []
    for root, _, names in os.walk(path):
      out += [os.path.relpath(os.path.join(root, n), path).replace(os.sep, "/") for n in names]
    return sorted(out)
  f, p = fs(path)
  p = p.rstrip("/")
  return sorted(x[len(p) + 1 :] for x in f.find(p) if x.startswith(p + "/"))


# ------------------------------------------------------------------------------ reading
def open_read(path, mode: str = "rb") -> IO:
  """A file opened for reading (`r` or `rb`); writing goes through `atomic`."""
  if mode not in ("r", "rb"):
    raise ValueError(f"open_read: mode {mode!r}; write through salad_jax.files.atomic")
  return epath(path).open(mode) if is_url(path) else open(path, mode)


def read_bytes(path) -> bytes:
  with open_read(path, "rb") as f:
    return f.read()


def read_text(path) -> str:
  return read_bytes(path).decode()


@contextlib.contextmanager
def local_copy(path) -> Iterator[str]:
  """A local path holding the file `path` (itself, or a temporary download of a URL): for
  libraries that read only local files."""
  if not is_url(path):
    yield os.fspath(path)
    return
  import tempfile

  with tempfile.TemporaryDirectory(prefix="salad_jax_download_") as d:
    local = os.path.join(d, "file" + os.path.splitext(name(path))[1])
    f, p = fs(path)
    f.get_file(p, local)
    yield local


# ------------------------------------------------------------------------------ changing
def makedirs(path) -> None:
  """A folder and its parents; nothing to create on an object store (a prefix exists once an
  object lies under it)."""
  if not is_url(path):
    os.makedirs(path, exist_ok=True)


def remove(path) -> None:
  if is_url(path):
    epath(path).unlink()
  else:
    os.remove(path)


def rmtree(path) -> None:
  if is_url(path):
    f, p = fs(path)
    if f.exists(p):
      f.rm(p, recursive=True)
  else:
    shutil.rmtree(path)


def upload(local: str, url: str) -> None:
  """One local file -> one object (a single upload: the object appears whole or not at all)."""
  f, p = fs(url)
  f.put_file(local, p)


def upload_tree(local: str, url: str, order=None) -> None:
  """A local folder's files -> objects under `url` (in `order(rel paths)`, else sorted)."""
  rels = walk_files(local)
  for rel in order(rels) if order else rels:
    upload(os.path.join(local, *rel.split("/")), join(url, rel))


def move_tree(src: str, dst: str) -> None:
  """A folder moved to `dst` (absent): renamed locally; on an object store copied object by
  object, checked, then the source deleted (no rename there); nothing is deleted before its copy
  exists."""
  if not is_url(src) and not is_url(dst):
    shutil.move(src, dst)
    return
  rels = walk_files(src)
  f, s = fs(src)
  _, d = fs(dst)
  for rel in rels:
    f.copy(f"{s.rstrip('/')}/{rel}", f"{d.rstrip('/')}/{rel}")
  missing = [r for r in rels if not f.exists(f"{d.rstrip('/')}/{r}")]
  if missing:
    raise OSError(f"copying {src} to {dst}: {len(missing)} object(s) missing after the copy")
  f.rm(s, recursive=True)
