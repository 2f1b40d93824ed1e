"""JAX's persistent compilation cache for train.py (`config.compile_cache_dir`).

Without it every host compiles the train step, the evaluation and the small programs of the
set-up again at every start, and a preempted run restarts often. `auto` (the default) keeps
the cache in `<workdir>/compile_cache`: it lives as long as the run it serves, every host of a
pod sees it where it sees the workdir (a gs:// workdir included: JAX reads and writes the cache
through etils.epath), and deleting the run deletes it. A path shares one cache between runs;
'' turns it off. Entries are keyed by the program, the compile options, the devices, the
backend and the jax/jaxlib versions, so an entry never serves another setting; JAX writes them
from process 0 only. Every program is cached, however small or quick to compile
(`jax_persistent_cache_min_compile_time_secs=0`, `..._min_entry_size_bytes=-1`): on a start
the small ones add up too.

The jax settings are process-wide: `enabled` sets them for the duration of a run and restores
the previous ones afterwards (a test or notebook that trains twice writes no cache afterwards).
A cache directory set with JAX's own flags or environment variables is left as it is.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import jax

AUTO = "auto"
NAME = "compile_cache"  # in the workdir
_SETTINGS = {
  "jax_persistent_cache_min_compile_time_secs": 0.0,
  "jax_persistent_cache_min_entry_size_bytes": -1,
}


def cache_dir(setting: str, workdir: str) -> str | None:
  """The cache directory a run uses: `<workdir>/compile_cache` for 'auto', None for ''."""
  if not setting:
    return None
  if setting == AUTO:
    if "://" in str(workdir):  # gs://bucket/run: not a local path to make absolute
      return str(workdir).rstrip("/") + "/" + NAME
    return os.path.join(os.path.abspath(workdir), NAME)
  return setting if "://" in setting else os.path.abspath(os.path.expanduser(setting))


def _reset() -> None:
  from jax.experimental.compilation_cache import compilation_cache

  compilation_cache.reset_cache()  # the cache object is built once, at the first compile


@contextlib.contextmanager
def enabled(path: str | None) -> Iterator[str | None]:
  """Compiles inside use (and fill) the persistent cache at `path` (None: as jax is set)."""
  if path is None or jax.config.jax_compilation_cache_dir:
    yield jax.config.jax_compilation_cache_dir
    return
  names = ["jax_compilation_cache_dir", *_SETTINGS]
  before = {k: getattr(jax.config, k) for k in names}
  jax.config.update("jax_compilation_cache_dir", path)
  for k, v in _SETTINGS.items():
    jax.config.update(k, v)
  _reset()
  try:
    yield path
  finally:
    for k, v in before.items():
      jax.config.update(k, v)
    _reset()
