"""Exact k-nearest-neighbour search over descriptors: faiss (`IndexFlatL2`) or a sharded JAX
matmul + `lax.top_k` on the devices (the same neighbours)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from salad_jax import sharding


def faiss_search(
  database: np.ndarray, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
  import faiss

  index = faiss.IndexFlatL2(database.shape[1])
  index.add(np.ascontiguousarray(database, np.float32))
  return index.search(np.ascontiguousarray(queries, np.float32), k)


def jax_search(
  database: np.ndarray, queries: np.ndarray, k: int, mesh=None, query_chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
  """Exact squared-L2 top-k on the accelerator: database rows sharded over devices."""
  mesh = mesh or sharding.make_mesh()
  n_dev = mesh.devices.size
  n = len(database)
  pad = (-n) % n_dev
  db = (
    np.concatenate([database, np.zeros((pad, database.shape[1]), database.dtype)])
    if pad
    else database
  )
  valid = np.arange(len(db)) < n
  rows = sharding.data_sharded(mesh)
  db = jax.device_put(jnp.asarray(db, jnp.float32), rows)
  penalty = jax.device_put(jnp.where(valid, 0.0, jnp.inf).astype(jnp.float32), rows)
  k = min(k, n)

  @jax.jit
  def topk(q, db, penalty):  # db passed as an argument: never baked into the program
    d = (
      jnp.sum(q * q, axis=1, keepdims=True)
      - 2.0 * jnp.dot(q, db.T, precision="highest")
      + jnp.sum(db * db, axis=1)[None, :]
      + penalty[None, :]
    )
    neg, idx = jax.lax.top_k(-d, k)
    return -neg, idx

  dists, idxs = [], []
  for s in range(0, len(queries), query_chunk):
    d, i = topk(jnp.asarray(queries[s : s + query_chunk], jnp.float32), db, penalty)
    dists.append(np.asarray(d))
    idxs.append(np.asarray(i))
  return np.concatenate(dists), np.concatenate(idxs).astype(np.int64)


def search(database, queries, k, method: str = "faiss", mesh=None):
  """(distances, indices) [Q, k] of the k nearest database rows; index -1 means "no result"
  (faiss returns it when it has fewer than k results or a distance is NaN)."""
  if method == "faiss":
    return faiss_search(database, queries, k)
  if method == "jax":
    return jax_search(database, queries, k, mesh)
  raise ValueError(f"search must be 'faiss' or 'jax', got {method!r}")
