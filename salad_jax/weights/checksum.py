"""A checksum of a params tree that is the same on the host and on sharded devices.

Per leaf, the array's raw bits are read as unsigned words and summed twice modulo 2**32: plainly
and weighted by (flat index mod 65536) + 1. Integer sums are exact whatever the order of the
additions, so a tree sharded over any mesh (summed on the devices, `params_checksum`) and the
same tree as numpy arrays on the host give the same value; any flipped bit changes it. The
leaf paths, dtypes and shapes enter the final sha256 too.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any, Mapping

import numpy as np
from absl import logging

from salad_jax.errors import UserError

_MASK = (1 << 32) - 1


_BLOCK = 65536
_WEIGHTS = np.arange(1, _BLOCK + 1, dtype=np.uint32)


def _words_np(x: np.ndarray) -> np.ndarray:
  x = np.ascontiguousarray(x)
  if x.dtype.itemsize == 4:
    return x.reshape(-1).view(np.uint32)
  return x.reshape(-1).view(np.uint8).astype(np.uint32)


def _sums_np(x: np.ndarray) -> tuple[int, int]:
  w = _words_np(x)
  # uint32 arithmetic wraps modulo 2**32: the exact sums modulo 2**32, with no large temporaries
  # (the weighted sum block by block: row r of the [n, 65536] view gets weights 1..65536)
  n = w.size - w.size % _BLOCK
  weighted = int(np.sum(w[:n].reshape(-1, _BLOCK) @ _WEIGHTS, dtype=np.uint64))
  weighted += int(w[n:] @ _WEIGHTS[: w.size - n]) if w.size > n else 0
  return int(np.sum(w, dtype=np.uint64)) & _MASK, weighted & _MASK


def _sums(x):
  import jax
  import jax.numpy as jnp

  if x.dtype.itemsize == 4:
    w = jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
  else:
    w = jax.lax.bitcast_convert_type(x, jnp.uint8).reshape(-1).astype(jnp.uint32)
  weight = (jnp.arange(w.size, dtype=jnp.uint32) % 65536) + 1
  return jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * weight, dtype=jnp.uint32)])


@functools.lru_cache(maxsize=None)
def _jitted_sums(out_sharding):
  """One jitted function per output sharding, so repeated calls (every checkpoint) compile once."""
  import jax

  return jax.jit(lambda t: jax.tree.map(_sums, t), out_shardings=out_sharding)


def _sums_device(tree):
  import jax

  # replicated output: readable on every process when the params span several
  sharding = getattr(jax.tree.leaves(tree)[0], "sharding", None)
  out = (
    jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    if isinstance(sharding, jax.sharding.NamedSharding)
    else None
  )
  return jax.device_get(_jitted_sums(out)(tree))


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k in sorted(tree):
    v = tree[k]
    if isinstance(v, Mapping):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


def params_checksum(params: Mapping[str, Any]) -> str:
  """'sum32:<hex>' of a nested params dict of numpy arrays or (sharded) jax arrays.

  Computed on the host when this process holds all of the params (no compile), else on the
  devices (params spread over several processes).
  """
  flat = _flat(params)
  on_host = all(getattr(v, "is_fully_addressable", True) for v in flat.values())
  if on_host:
    import jax

    flat = {k: np.asarray(v) for k, v in jax.device_get(flat).items()}
    sums = {k: _sums_np(v) for k, v in flat.items()}
  else:
    dev = _sums_device(flat)
    sums = {k: (int(v[0]), int(v[1])) for k, v in dev.items()}
  h = hashlib.sha256()
  for k, v in flat.items():
    h.update(
      f"{k}|{np.dtype(v.dtype).str}|{tuple(v.shape)}|{sums[k][0]:08x}{sums[k][1]:08x};".encode()
    )
  return "sum32:" + h.hexdigest()


class CorruptCheckpointError(UserError):
  """A checkpoint's params do not match the checksum recorded when it was written."""


def verify(params, meta: Mapping[str, Any], where: str) -> None:
  """Raises CorruptCheckpointError if `params` do not match `meta["params_checksum"]`."""
  want = meta.get("params_checksum")
  if want is None:
    logging.info("%s has no params checksum (written before salad_jax recorded one)", where)
    return
  got = params_checksum(params)
  if got != want:
    raise CorruptCheckpointError(
      f"{where} is corrupt: its params do not match the checksum recorded when it was saved "
      f"({got[:16]}... != {want[:16]}...)",
      "use another checkpoint, or restore it from a backup",
    )
