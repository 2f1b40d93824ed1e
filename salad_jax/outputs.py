"""Output folders that hold only what salad_jax wrote: a manifest, so nothing of yours is replaced.

`evaluate.py` and `python -m salad_jax.visualize` write fixed names (`recalls.json`,
`preds/000.jpg`, ...) into a fixed `--output_dir`. Before any compute, `claim` checks every file
a run may write: one that exists and is not listed in `<output_dir>/.salad_jax_outputs.json` is
someone else's, and an error names it. The files an earlier run of the same tool listed there
are removed (one note line), so a run's outputs are never mixed with an earlier run's. The
manifest then lists every file this run may write, before it writes any, so a run that stops
half-way still owns what it left.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from salad_jax.errors import UserError, note

MANIFEST = ".salad_jax_outputs.json"


def _read(output_dir: str) -> dict[str, list[str]]:
  path = os.path.join(output_dir, MANIFEST)
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      data = json.load(f)
    if not (isinstance(data, dict) and all(isinstance(v, list) for v in data.values())):
      raise ValueError("not a {tool: [files]} object")
  except (OSError, ValueError) as e:
    raise UserError(f"{path} is unreadable ({e}): cannot tell which files in {output_dir} "
                    "salad_jax wrote", "choose another --output_dir, or delete that file if the "
                    "folder holds nothing of yours") from None
  return data


def claim(output_dir: str, files: Sequence[str], tool: str, flag: str = "--output_dir",
          write: bool = True) -> None:
  """Makes `files` (paths relative to `output_dir`) this run's outputs of `tool`, before compute.

  Raises `UserError` naming the first of `files` that exists but no salad_jax tool wrote; then
  removes the files the previous run of `tool` wrote (said in one note) and records `files`.
  `write=False` only checks (the processes of a multi-process run other than process 0).
  """
  manifest = _read(output_dir)
  ours = {f for listed in manifest.values() for f in listed}
  for rel in files:
    path = os.path.join(output_dir, rel)
    if os.path.lexists(path) and (rel not in ours or os.path.islink(path) or not os.path.isfile(path)):
      raise UserError(f"{flag} {output_dir}: {rel} exists and was not written by {tool} "
                      f"(not listed in {MANIFEST}); it would be overwritten",
                      f"choose another {flag}, or move the file away")
  if not write:
    return
  removed = 0
  for rel in manifest.get(tool, []):
    path = os.path.join(output_dir, rel)
    if os.path.isfile(path) and not os.path.islink(path):
      os.remove(path)
      removed += 1
  if removed:
    note(f"{output_dir}: removed {removed} files of an earlier {tool} run (listed in {MANIFEST}), "
         "so its outputs do not mix with this run's")
  manifest[tool] = sorted(set(files))
  tmp = os.path.join(output_dir, f".{MANIFEST}.tmp")
  os.makedirs(output_dir, exist_ok=True)
  with open(tmp, "w") as f:
    json.dump(manifest, f, indent=1)
  os.replace(tmp, os.path.join(output_dir, MANIFEST))
