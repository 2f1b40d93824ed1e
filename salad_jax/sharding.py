"""Device mesh, shardings and global batches: data parallel with optional FSDP. No pmap.

The mesh has two axes, `data` and `fsdp` (`config.mesh.fsdp`; `data` = devices / fsdp). A batch
is split over both axes on its first dim (every device holds different images; any number of
places and devices, padded with invalid entries where they do not divide: `BatchLayout`). Params and optimizer state are sharded over `fsdp` by rules on their paths (big_vision
`sharding.py` style: (regex, spec) pairs, first match wins, "fsdp" = the largest dim the axis
divides, else replicated), so fsdp=1 is plain data parallelism with replicated params. XLA adds
the all-gathers of weights and reduce-scatters of gradients that FSDP needs.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from salad_jax.errors import UserError

DATA, FSDP = "data", "fsdp"
# Arrays smaller than this stay replicated under "fsdp": gathering them costs more than they weigh.
MIN_SHARD_ELEMENTS = 2**14
# (regex over 'params/backbone/blocks_3/attn/qkv/kernel'-style paths, spec): first match wins.
# spec: "fsdp" (largest dim divisible by the fsdp axis), "replicate", or a PartitionSpec.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = ((r".*", "fsdp"),)


def maybe_initialize_distributed() -> None:
  """`jax.distributed.initialize()` when launched multi-process; a no-op on one process.

  Multi-process runs are detected from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES (or a cluster
  environment jax auto-detects, e.g. SLURM or a TPU pod: set SALAD_JAX_DISTRIBUTED=1).
  """
  if jax.distributed.is_initialized():
    return
  explicit = os.environ.get("JAX_COORDINATOR_ADDRESS") and os.environ.get("JAX_NUM_PROCESSES")
  if explicit:
    jax.distributed.initialize(
      coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
      num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
      process_id=int(os.environ.get("JAX_PROCESS_ID", "0")),
    )
  elif os.environ.get("SALAD_JAX_DISTRIBUTED") == "1":
    jax.distributed.initialize()


def check_fsdp(fsdp: int, num_devices: int) -> None:
  if isinstance(fsdp, bool) or not isinstance(fsdp, int) or fsdp < 1 or num_devices % fsdp:
    ok = [d for d in range(1, num_devices + 1) if num_devices % d == 0]
    raise UserError(
      f"config.mesh.fsdp={fsdp!r} does not divide the {num_devices} device(s)",
      f"use one of {ok} (--config.mesh.fsdp=N; 1 = params replicated)",
    )


def make_mesh(devices: Sequence | None = None, fsdp: int = 1) -> Mesh:
  """Mesh [data, fsdp] over `devices` (default: all). Consecutive devices share an fsdp group,
  so with fsdp <= devices per host the weight all-gathers stay within a host."""
  devices = jax.devices() if devices is None else list(devices)
  check_fsdp(fsdp, len(devices))
  return Mesh(np.asarray(devices).reshape(len(devices) // fsdp, fsdp), (DATA, FSDP))


def fsdp_size(mesh: Mesh) -> int:
  return mesh.shape.get(FSDP, 1)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  """First dim split over every mesh axis (each device its own slice of the batch)."""
  return NamedSharding(mesh, P(tuple(mesh.axis_names)))


@dataclasses.dataclass(frozen=True)
class BatchLayout:
  """How a step's P places x K images lie on the devices: any P, K, device and process count.

  The loss is global (the step gathers every descriptor before the similarity matrix), so
  places need not stay on one device. Each process loads ceil(P / processes) whole places
  (`data.pipeline.TrainSpec`: padding places where P does not divide), then pads its images to
  a multiple of its devices with invalid entries (`pad_batch`): every process's local batch has
  the same shape, and the global batch splits evenly over the devices.
  """

  places: int  # P
  img_per_place: int  # K
  local_places: int  # per process, padding places included
  local_images: int  # per process, padding included
  num_processes: int
  num_devices: int

  @property
  def global_images(self) -> int:
    return self.local_images * self.num_processes

  @property
  def padding(self) -> int:
    """Padding entries per step (whole padding places and per-device padding)."""
    return self.global_images - self.places * self.img_per_place

  def describe(self) -> str:
    """One line for the start of a run: how much of each batch is padding."""
    n = self.places * self.img_per_place
    if not self.padding:
      return (
        f"batch layout: {self.places} places x {self.img_per_place} images = {n} images over "
        f"{self.num_devices} device(s), {n // self.num_devices} per device, no padding"
      )
    return (
      f"batch layout: {self.places} places x {self.img_per_place} images = {n} images over "
      f"{self.num_devices} device(s) ({self.num_processes} process(es)): each step holds "
      f"{self.global_images} entries, {self.padding} of them padding "
      f"({100 * self.padding / self.global_images:.1f} %, masked out of the loss; "
      f"{self.global_images // self.num_devices} per device)"
    )


def batch_layout(places: int, img_per_place: int, mesh: Mesh) -> BatchLayout:
  """The layout of a P x K batch on `mesh` (all its processes; each holds the same number of
  the mesh's devices)."""
  procs = len({d.process_index for d in mesh.devices.flat})
  n = mesh.devices.size
  local_devices = n // procs
  local_places = -(-places // procs)
  local_images = -(-local_places * img_per_place // local_devices) * local_devices
  return BatchLayout(places, img_per_place, local_places, local_images, procs, n)


# padding values of the batch fields: invalid entries with no label and no example identity
PAD_VALUES = {"labels": -1, "ids": -1, "valid": False, "index": -1}


def pad_batch(local: Mapping[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  """Pads every array of a local batch along its first dim to `size` (`PAD_VALUES`, else 0)."""
  out = {}
  for k, v in local.items():
    v = np.asarray(v)
    if v.ndim == 0 or v.shape[0] == size:
      out[k] = v
      continue
    if v.shape[0] > size:
      raise ValueError(f"batch field {k!r} has {v.shape[0]} entries, more than {size}")
    pad = np.full((size - v.shape[0],) + v.shape[1:], PAD_VALUES.get(k, 0), v.dtype)
    out[k] = np.concatenate([v, pad])
  return out


# ------------------------------------------------------------------------------ params
def path_name(path) -> str:
  """'params/backbone/blocks_0/attn/qkv/kernel' for a jax tree path (dict keys, attrs, indices)."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def fsdp_spec(shape: Sequence[int], n: int, min_elements: int = MIN_SHARD_ELEMENTS) -> P:
  """Shard the largest dim that `n` divides over `fsdp`; replicate small or indivisible arrays."""
  if n == 1 or int(np.prod(shape, dtype=np.int64)) < min_elements:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: (-shape[d], d)):
    if shape[dim] % n == 0:
      spec = [None] * len(shape)
      spec[dim] = FSDP
      return P(*spec)
  return P()


def spec_for(
  name: str, shape: Sequence[int], mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES
) -> P:
  for pattern, spec in rules:
    if re.search(pattern, name):
      if spec == "fsdp":
        return fsdp_spec(shape, fsdp_size(mesh))
      if spec == "replicate":
        return P()
      return spec
  return P()


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
  """NamedSharding per leaf (arrays or jax.ShapeDtypeStruct) by `rules` over the leaf paths."""

  def one(path, x):
    return NamedSharding(mesh, spec_for(path_name(path), np.shape(x), mesh, rules))

  return jax.tree_util.tree_map_with_path(one, tree)


# ------------------------------------------------------------------------------ host -> devices
def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Process-local batch arrays -> global arrays sharded on the batch dim over the mesh."""
  sharding = data_sharded(mesh)
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
    for k, v in local.items()
    if np.ndim(v) > 0
  }


def put(tree: Any, shardings: Any) -> Any:
  """Host values (identical on every process) -> global arrays with the given shardings.

  Each process builds only its own devices' shards (`make_array_from_callback`), so this works
  for any sharding and any number of processes.
  """

  def one(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  return jax.tree.map(one, tree, shardings)


def put_replicated(tree: Any, mesh: Mesh) -> Any:
  """Host values (identical on every process) -> arrays replicated over the mesh."""
  sharding = replicated(mesh)
  return put(tree, jax.tree.map(lambda _: sharding, tree))
