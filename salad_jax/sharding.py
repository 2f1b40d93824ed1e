"""Device mesh, shardings and global batches: data parallel with optional FSDP. No pmap.

The mesh has two axes, `data` and `fsdp` (`config.mesh.fsdp`; `data` = devices / fsdp). A batch
is split over both axes on its first dim (every device holds different images; any number of
places and devices, padded with invalid entries where they do not divide: `BatchLayout`). Params and optimizer state are sharded over `fsdp` by rules on their paths (big_vision
`sharding.py` style: (regex, spec) pairs, first match wins, "fsdp" = the largest dim the axis
divides, else replicated), so fsdp=1 is plain data parallelism with replicated params. XLA adds
the all-gathers of weights and reduce-scatters of gradients that FSDP needs.

The device order follows the interconnect (`make_mesh`): within a TPU slice
`mesh_utils.create_device_mesh` lays `data x fsdp` onto the physical torus, so an fsdp group's
all-gathers run over neighbouring ICI links; across slices (`config.mesh.dcn_data=N`, one per
slice) `create_hybrid_device_mesh` makes the outer part of `data` span the slices, so only the
data-parallel gradient reduction crosses the slower data-centre network (DCN).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from absl import logging
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


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def _bad_int(v, low: int) -> bool:
  return isinstance(v, bool) or not isinstance(v, int) or v < low


def check_fsdp(fsdp: int, num_devices: int) -> None:
  if _bad_int(fsdp, 1) or num_devices % fsdp:
    raise UserError(
      f"config.mesh.fsdp={fsdp!r} does not divide the {num_devices} device(s)",
      f"use one of {_divisors(num_devices)} (--config.mesh.fsdp=N; 1 = params replicated)",
    )


def num_slices(devices: Sequence) -> int | None:
  """How many TPU slices `devices` span (`slice_index`), or None where devices have no slices
  (CPU, GPU, and TPU topologies described without `num_slices`)."""
  if not devices or not hasattr(devices[0], "slice_index"):
    return None
  return len({d.slice_index for d in devices})


def mesh_groups(devices: Sequence, dcn_data: int = 0) -> list[list]:
  """The devices split into `dcn_data` groups that the `data` axis spans over DCN, each group
  then laid out by the interconnect (`make_mesh`). Checks the setting (one `UserError` line that
  names a value that works).

  On TPU devices with a `slice_index` the groups are the slices, and `dcn_data` must equal their
  number (0 = auto: one group per slice). Devices without slices (CPU, GPU) have no DCN to
  detect: `dcn_data` = N splits them, in (process, id) order, into N equal consecutive groups
  (processes stay whole when N divides the process count: GPU nodes over InfiniBand/Ethernet;
  on one process's CPU devices this stands in for slices in tests). 0 = auto = 1 group.
  """
  n = len(devices)
  slices = num_slices(devices)
  if _bad_int(dcn_data, 0):
    raise UserError(
      f"config.mesh.dcn_data={dcn_data!r} must be an integer >= 0",
      "use 0 (auto: one per TPU slice, 1 elsewhere) or the number of slices",
    )
  if slices is not None:
    dcn = dcn_data or slices
    if dcn != slices:
      raise UserError(
        f"config.mesh.dcn_data={dcn_data} but the {n} devices form {slices} TPU slice(s)",
        f"use --config.mesh.dcn_data={slices} (or 0: one per slice)",
      )
    by_slice: dict[int, list] = {}
    for d in devices:
      by_slice.setdefault(d.slice_index, []).append(d)
    groups = [by_slice[k] for k in sorted(by_slice)]
    if len({len(g) for g in groups}) > 1:
      raise UserError(
        f"the TPU slices have different device counts {[len(g) for g in groups]}",
        "use slices of one shape (data parallelism over DCN needs equal slices)",
      )
    return groups
  dcn = dcn_data or 1
  if n % dcn:
    raise UserError(
      f"config.mesh.dcn_data={dcn_data} does not divide the {n} device(s)",
      f"use one of {_divisors(n)} (--config.mesh.dcn_data=N; 1 = one group)",
    )
  ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
  per = n // dcn
  return [ordered[i * per : (i + 1) * per] for i in range(dcn)]


def _check_fsdp_in_group(fsdp: int, per_group: int, groups: int) -> None:
  if groups == 1:
    return check_fsdp(fsdp, per_group)
  if _bad_int(fsdp, 1) or per_group % fsdp:
    raise UserError(
      f"config.mesh.fsdp={fsdp!r} does not divide the {per_group} devices of each of the "
      f"{groups} DCN groups (config.mesh.dcn_data={groups}): fsdp stays inside a slice",
      f"use one of {_divisors(per_group)} (--config.mesh.fsdp=N)",
    )


def check_mesh(devices: Sequence | None = None, fsdp: int = 1, dcn_data: int = 0) -> None:
  """`config.mesh.fsdp` and `config.mesh.dcn_data` against the devices and their slices: a
  value that does not fit is one `UserError` line naming a value that does."""
  devices = jax.devices() if devices is None else list(devices)
  groups = mesh_groups(devices, dcn_data)
  _check_fsdp_in_group(fsdp, len(groups[0]), len(groups))


def _slice_mesh(shape: tuple[int, int], devices: Sequence) -> np.ndarray:
  """`shape` laid onto one slice's (or group's) interconnect: `create_device_mesh`, allowed to
  split physical axes if the shape needs it (e.g. 8 x 2 on a 4x4 v5e); where it has no layout
  (a TPU topology with one device per TensorCore, which it refuses) the id order, with a
  warning. On CPU it keeps the (process, id) order of `mesh_groups`; on GPUs the id order."""
  from jax.experimental import mesh_utils

  try:  # splits a physical axis only where no whole-axis assignment fits
    return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError) as e:
    logging.warning("no topology-aware layout for mesh %s (%s); using device id order", shape, e)
  return np.asarray(sorted(devices, key=lambda d: d.id)).reshape(shape)


def make_mesh(devices: Sequence | None = None, fsdp: int = 1, dcn_data: int = 0) -> Mesh:
  """Mesh [data, fsdp] over `devices` (default: all), laid out by the interconnect.

  `data` = dcn_data x (devices per slice / fsdp): its outer part spans the `dcn_data` slices
  (`mesh_groups`; `mesh_utils.create_hybrid_device_mesh` on TPU slices), its inner part and
  `fsdp` lie within one slice (`mesh_utils.create_device_mesh`: neighbours on the ICI torus). An
  fsdp group never crosses a slice. On CPU devices (and one GPU host) this is the device order:
  consecutive devices share an fsdp group.
  """
  devices = jax.devices() if devices is None else list(devices)
  groups = mesh_groups(devices, dcn_data)
  per = len(groups[0])
  _check_fsdp_in_group(fsdp, per, len(groups))
  inner = (per // fsdp, fsdp)
  if len(groups) > 1 and num_slices(devices) is not None:
    from jax.experimental import mesh_utils

    try:
      order = mesh_utils.create_hybrid_device_mesh(
        inner, (len(groups), 1), devices, allow_split_physical_axes=True
      )
      return Mesh(order, (DATA, FSDP))
    except (ValueError, NotImplementedError, AssertionError) as e:
      logging.warning("create_hybrid_device_mesh failed (%s); laying out slice by slice", e)
  order = np.concatenate([_slice_mesh(inner, g) for g in groups], axis=0)
  assert order.shape == (len(devices) // fsdp, fsdp) and math.prod(order.shape) == len(devices)
  return Mesh(order, (DATA, FSDP))


def describe_mesh(mesh: Mesh) -> str:
  """'data=4 x fsdp=2 over 2 slice(s): [[0 1] [2 3] ...]' (device ids; for logs and docs)."""
  ids = np.vectorize(lambda d: d.id)(mesh.devices)
  slices = num_slices(list(mesh.devices.flat))
  where = f" over {slices} slice(s)" if slices else ""
  return f"data={mesh.shape[DATA]} x fsdp={fsdp_size(mesh)}{where}: {ids.tolist()}"


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
