"""Device mesh, shardings and global batches (data parallel; params replicated). No pmap."""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def maybe_initialize_distributed() -> None:
  """`jax.distributed.initialize()` when launched multi-process; a no-op on one process.

  Multi-process runs are detected from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES (or a cluster
  environment jax auto-detects, e.g. SLURM or a TPU pod: set SALAD_JAX_DISTRIBUTED=1).
  """
  if jax.distributed.is_initialized():
    return
  explicit = os.environ.get("JAX_COORDINATOR_ADDRESS") and os.environ.get("JAX_NUM_PROCESSES")
  if explicit:
    jax.distributed.initialize(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                               num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                               process_id=int(os.environ.get("JAX_PROCESS_ID", "0")))
  elif os.environ.get("SALAD_JAX_DISTRIBUTED") == "1":
    jax.distributed.initialize()


def make_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


def check_batch_layout(global_images: int, img_per_place: int, mesh: Mesh) -> None:
  """All K images of a place must sit on one device: images per device divisible by K."""
  n = mesh.devices.size
  if global_images % n or (global_images // n) % img_per_place:
    places = global_images // img_per_place
    raise ValueError(f"a batch of {places} places x {img_per_place} images cannot be split over "
                     f"{n} devices with whole places per device; use a multiple of {n} places "
                     f"(e.g. --config.data.places_per_batch={max(n, places // n * n)})")


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Process-local batch arrays -> global arrays sharded on the `data` axis."""
  sharding = data_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items() if np.ndim(v) > 0}


def put_replicated(tree: Any, mesh: Mesh) -> Any:
  """Host values (identical on every process) -> arrays replicated over the mesh."""
  sharding = replicated(mesh)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
  return jax.tree.map(put, tree)
