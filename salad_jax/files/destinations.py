"""The one place that decides whether salad_jax may write at a path a user gave.

Every output is checked here before any compute:
  * `check_dir(path, what)`: a directory salad_jax writes into (created if missing; with
    `create=False` only checked): `--output_dir`, `--cache_dir`, `--data_dir`, a workdir;
  * `check_file(path, overwrite, ours)`: a file replaced as a whole (weight files);
  * `check_replace_dir(path, overwrite, refusal)`: a directory replaced as a whole (converted
    checkpoints);
  * files written inside an output directory are claimed through `salad_jax.files.outputs.claim`.
An existing file or directory is replaced only with `overwrite` and only if salad_jax provably wrote
it (the caller's `ours` / `refusal` decides what proves it); a link is never written through; the
destination's folder is probed (a temporary file created and removed) so a folder the OS will not
let us write to is refused before any work. Writing itself goes through `salad_jax.files.atomic`.
Every path may be a URL (`gs://bucket/...`, `salad_jax.files.paths`): the same rules, with an
object in place of a file, and a probe object uploaded and deleted in place of a temporary file.
"""

from __future__ import annotations

import os
from typing import Callable

from salad_jax.errors import UserError
from salad_jax.files import atomic, paths


def check_dir(path: str, what: str = "output directory", create: bool = True) -> str:
  """Makes sure `path` is (or can become) a writable directory, before any compute.

  Creates it if missing (unless `create=False`: then it only checks that the nearest existing
  ancestor is a writable directory); a file in its place, or a directory that cannot be
  written, is a `UserError` naming the path. Returns the absolute path (a URL as given).
  """
  if paths.is_url(path):
    return _check_url_dir(paths.absolute(path), what)
  path = os.path.abspath(os.fspath(path))
  probe = path
  while not os.path.exists(probe):  # the nearest existing ancestor decides
    parent = os.path.dirname(probe)
    if parent == probe:
      break
    probe = parent
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(
      f"{what} {path} is a file, not a directory",
      "give a directory path (it is created if missing)",
    )
  if not os.path.isdir(probe):
    raise UserError(
      f"{what} {path}: {probe} is a file, not a directory",
      "give a path whose parents are directories",
    )
  if not os.access(probe, os.W_OK | os.X_OK):
    raise UserError(
      f"{what} {path} is not writable (no write permission on {probe})",
      "choose a directory you can write to",
    )
  if not create:
    return path
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise UserError(
      f"cannot create {what} {path}: {e.strerror or e}", "choose a directory you can write to"
    ) from None
  return path


def _check_url_dir(path: str, what: str) -> str:
  """A folder on an object store: no object of that name (a file where the folder belongs),
  and a bucket we can write to (a probe object, uploaded and deleted)."""
  if paths.isfile(path):
    raise UserError(
      f"{what} {path} is a file (an object), not a folder",
      "give a folder path (objects are written under it)",
    )
  atomic.probe(paths.join(path, ".probe"))
  return path


def check_file(
  path: str,
  overwrite: bool,
  ours: Callable[[str], bool],
  *,
  flag: str = "--dst",
  kind: str = "weight file",
  single: str = "a .pth/.ckpt/.safetensors destination",
  overwrite_flag: str = "--overwrite (overwrite=True)",
) -> None:
  """A file salad_jax writes as a whole (a `kind`, given as `flag`): an empty path, a link or a
  directory there is refused; an existing file is replaced only with `overwrite` and only if
  `ours(path)` (salad_jax wrote it)."""
  if not path.strip():
    raise UserError(f"{flag} is an empty path", f"give the {kind} to write")
  if paths.islink(path):
    raise UserError(
      f"refusing to overwrite {path}: it is a symbolic link (to "
      f"{os.readlink(path)}); salad_jax replaces only regular files it wrote",
      "give the link's target itself as the destination, or remove the link",
    )
  if paths.isdir(path):
    raise IsADirectoryError(f"{flag} {path} is a directory; {single} must be a file")
  if paths.lexists(path):
    if not overwrite:
      raise FileExistsError(f"{path} exists; pass {overwrite_flag} to replace it")
    if not paths.isfile(path) or not ours(path):
      raise UserError(
        f"refusing to overwrite {path}: salad_jax did not write it (not a salad_jax {kind}); it "
        "only ever replaces files it wrote itself",
        f"remove the file yourself, or choose another {flag}",
      )
  if not paths.is_url(path):  # a URL's folder is probed below
    check_dir(os.path.dirname(os.path.abspath(path)), "destination folder", create=False)
  atomic.probe(path)


def check_replace_dir(
  path: str, overwrite: bool, refusal: Callable[[str], UserError | None]
) -> str:
  """A directory salad_jax writes as a whole (then renames into place). A non-empty directory
  there is replaced only with `overwrite` and only if `refusal(directory)` finds nothing that is
  not salad_jax's. Returns the resolved directory."""
  if not path.strip():
    raise UserError(
      "the destination is an empty path",
      "give a directory (-> Orbax checkpoint) or a .pth/.ckpt/.safetensors file",
    )
  directory = paths.real(path)
  check_dir(directory, "--dst", create=False)
  if paths.isdir(directory) and paths.listdir(directory):
    error = refusal(directory)
    if error is not None:
      raise error
    if not overwrite:
      raise FileExistsError(
        f"{path} exists (a salad_jax checkpoint); pass --overwrite (overwrite=True) to replace it"
      )
  atomic.probe(directory)
  return directory
