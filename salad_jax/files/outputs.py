"""Output folders that hold only what salad_jax wrote: a manifest, so nothing of yours is replaced.

`evaluate.py` and `python -m salad_jax.visualize` write fixed names (`recalls.json`,
`preds/000.jpg`, ...) into a fixed `--output_dir`. `<output_dir>/.salad_jax_outputs.json` records,
per tool, each file a run wrote with its size and modification time. Before any compute, `claim`
checks every file the run may write: one that exists is replaced only if the manifest records it
with the size and time it still has (or it was left by a run that stopped half-way, which
announced it as pending); anything else is someone else's and an error names it. `Claim.finish`,
after a run succeeded, records what it wrote and removes the files of the tool's earlier run that
this run did not rewrite, so one run's outputs never mix with another's; a failed run removes
nothing. Only paths inside the folder, never through a link, are read from the manifest.

One run per output folder: `claim` also takes `<output_dir>/.salad_jax_outputs.lock`
(`salad_jax.files.lock`: flock locally, a create-if-absent object on GCS) until `finish()` or
`release()`, so a second run into the same folder while one is writing there is refused before
any compute (it would delete the first run's files as they are written). A later run replaces the
earlier run's outputs (one note says so); give another --output_dir to keep both.
The folder may be a URL (gs://...): files are identified there by size and generation.
"""

from __future__ import annotations

import json
import os
import time
from typing import Sequence

from salad_jax.errors import UserError, note
from salad_jax.files import atomic, paths
from salad_jax.files.lock import make_lock

MANIFEST = ".salad_jax_outputs.json"
LOCK = ".salad_jax_outputs.lock"


def _safe(output_dir: str, rel) -> bool:
  """A plain relative path below output_dir that passes through no link."""
  if not isinstance(rel, str) or not rel or os.path.isabs(rel) or os.path.normpath(rel) != rel:
    return False
  parts = rel.split(os.sep)
  if ".." in parts:
    return False
  path = output_dir
  for part in parts[:-1]:
    path = paths.join(path, part)
    if paths.islink(path):
      return False
  return True


_stat = paths.stat_id  # [size, mtime ns] of a regular file (no link); [size, generation] on GCS


def _read(output_dir: str) -> dict:
  path = paths.join(output_dir, MANIFEST)
  if not paths.lexists(path):
    return {}
  try:
    if paths.islink(path) or not paths.isfile(path):
      raise ValueError("not a regular file")
    data = json.loads(paths.read_text(path))
    ok = isinstance(data, dict) and all(
      isinstance(v, dict)
      and isinstance(v.get("files", {}), dict)
      and all(
        _safe(output_dir, k) and isinstance(s, list) and len(s) == 2
        for k, s in v.get("files", {}).items()
      )
      and all(_safe(output_dir, k) for k in v.get("pending", {}).get("files", []))
      for v in data.values()
    )
    if not ok:
      raise ValueError("not a manifest salad_jax wrote")
  except (OSError, ValueError) as e:
    raise UserError(
      f"{path} is unreadable ({e}): cannot tell which files in {output_dir} salad_jax wrote",
      "choose another --output_dir, or delete that file if the folder holds nothing of yours",
    ) from None
  return data


def _write(output_dir: str, manifest: dict) -> None:
  paths.makedirs(output_dir)
  atomic.write_text(paths.join(output_dir, MANIFEST), json.dumps(manifest, indent=1))


class Claim:
  """This run's right to write `files` in `output_dir`; `finish()` once they are written."""

  def __init__(
    self,
    output_dir: str,
    files: Sequence[str],
    tool: str,
    write: bool,
    before: dict,
    earlier: dict,
    lock=None,
  ):
    self.output_dir, self.files, self.tool, self.write = output_dir, list(files), tool, write
    self.before = before  # planned file -> its stat when claimed (None: absent)
    self.earlier = earlier  # the tool's manifest entry when claimed
    self.lock = lock  # held until finish() or release()

  def release(self) -> None:
    """Lets another run write into the folder (also when this one failed)."""
    if self.lock is not None:
      self.lock.release()
      self.lock = None

  def __del__(self) -> None:  # a run that dropped its claim (it failed) frees the folder
    try:
      self.release()
    except Exception:  # noqa: BLE001  (interpreter shutdown)
      pass

  def __enter__(self) -> "Claim":
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  def finish(self) -> None:
    """Records the files this run wrote; removes the earlier run's files it did not rewrite."""
    if not self.write:
      return
    try:
      self._finish()
    finally:
      self.release()

  def _finish(self) -> None:
    written = {}
    for rel in self.files:
      st = _stat(paths.join(self.output_dir, rel))
      if st is not None and st != self.before.get(rel):
        written[rel] = st
    stale = [
      rel
      for rel, st in self.earlier.get("files", {}).items()
      if rel not in written and _stat(paths.join(self.output_dir, rel)) == st
    ]  # unchanged since that run wrote it
    crashed = self.earlier.get("pending", {})
    stale += [
      rel
      for rel in crashed.get("files", [])
      if rel not in written
      and rel not in stale
      and _left_by(paths.join(self.output_dir, rel), crashed)
    ]
    for rel in stale:
      paths.remove(paths.join(self.output_dir, rel))
    manifest = _read(self.output_dir)
    manifest[self.tool] = {"files": written}
    _write(self.output_dir, manifest)
    if stale:
      note(
        f"{self.output_dir}: removed {len(stale)} file(s) of an earlier {self.tool} run that "
        "this run did not rewrite, so its outputs do not mix with this run's"
      )


def _left_by(path: str, pending: dict) -> bool:
  """Written after a run announced it as pending (a run that stopped half-way); 1 s of slack
  for the file system's coarse clock."""
  st, start = _stat(path), pending.get("start")
  return st is not None and isinstance(start, int) and st[1] >= start - 1_000_000_000


def claim(
  output_dir: str, files: Sequence[str], tool: str, flag: str = "--output_dir", write: bool = True
) -> Claim:
  """Checks, before any compute, that this run of `tool` may write `files` (paths relative to
  `output_dir`); raises `UserError` naming the first that exists and salad_jax did not write.
  `write=False` only checks (the processes of a multi-process run other than process 0).
  With `write`, the folder's lock is held until `finish()` / `release()` (a run writing there
  already is a `UserError`)."""
  lock = None
  if write:
    paths.makedirs(output_dir)
    lock = make_lock(paths.join(output_dir, LOCK), tool=tool, flag=flag)
    lock.acquire()
  try:
    return _claim(output_dir, files, tool, flag, write, lock)
  except BaseException:
    if lock is not None:
      lock.release()
    raise


def _claim(output_dir, files, tool, flag, write, lock) -> Claim:
  manifest = _read(output_dir)
  recorded = {k: s for v in manifest.values() for k, s in v.get("files", {}).items()}
  pending = [v["pending"] for v in manifest.values() if "pending" in v]
  before = {}
  for rel in files:
    path = paths.join(output_dir, rel)
    if not _safe(output_dir, rel):
      raise UserError(
        f"{flag} {output_dir}: the path to {rel} passes through a link",
        f"choose another {flag}, or replace the link by a folder",
      )
    if not paths.lexists(path):
      continue
    st = before[rel] = _stat(path)
    ours = st is not None and (
      recorded.get(rel) == st
      or any(rel in p.get("files", []) and _left_by(path, p) for p in pending)
    )
    if not ours:
      raise UserError(
        f"{flag} {output_dir}: {rel} exists and was not written by {tool} "
        f"(not recorded, as it is now, in {MANIFEST}); it would be overwritten",
        f"choose another {flag}, or move the file away",
      )
  earlier = dict(manifest.get(tool, {}))
  if write:  # announce the outputs, so a run that stops half-way still owns what it left
    manifest[tool] = {**earlier, "pending": {"start": time.time_ns(), "files": sorted(set(files))}}
    _write(output_dir, manifest)
  return Claim(output_dir, files, tool, write, before, earlier, lock)
