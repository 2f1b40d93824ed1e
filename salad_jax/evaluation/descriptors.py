"""Descriptor extraction over all devices: fixed-shape padded batches from the image loader, each
process loading its share, descriptors gathered in the order of the paths."""

from __future__ import annotations

import functools
import gc
import sys
from typing import Sequence

import jax
import numpy as np
from tqdm import tqdm

from salad_jax import sharding
from salad_jax.data import eval_sets, pipeline
from salad_jax.errors import UserError
from salad_jax.models.config import ModelConfig
from salad_jax.models.vpr import VPRModel, as_variables
from salad_jax.train import preemption


def make_describe(model_cfg: ModelConfig, mesh):
  """Jitted (weights, uint8 images [B,H,W,3] sharded on `data`) -> float32 descriptors
  (replicated). `weights`: the params, or {"params", "batch_stats"} (`vpr.as_variables`)."""
  model = VPRModel(model_cfg)

  def fn(params, images):
    return model.apply(as_variables(params), pipeline.normalize_images(images))

  # params: any layout (replicated, or the train state's fsdp shards: XLA gathers them)
  return jax.jit(
    fn, in_shardings=(None, sharding.data_sharded(mesh)), out_shardings=sharding.replicated(mesh)
  )


def extract(
  params,
  model_cfg: ModelConfig,
  paths: Sequence[str],
  *,
  image_size: tuple[int, int],
  batch_size: int,
  mesh,
  num_workers: int = 0,
  describe=None,
  desc: str = "",
) -> np.ndarray:
  """Descriptors [len(paths), D] in the order of `paths`; fixed-shape padded batches."""
  model_cfg.check_image_shape((1, image_size[0], image_size[1], 3))
  n_dev = mesh.devices.size
  batch_size = -(-batch_size // n_dev) * n_dev  # a multiple of the device count
  # no larger than the set needs: a set of 3 images is not padded to a batch of 256
  batch_size = min(batch_size, max(n_dev, -(-len(paths) // n_dev) * n_dev))
  describe = describe or make_describe(model_cfg, mesh)
  out = np.zeros((len(paths), model_cfg.descriptor_dim), np.float32)
  data = pipeline.eval_dataset(
    paths,
    image_size=image_size,
    batch_size=batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    num_workers=num_workers,
  )
  total = -(-len(paths) // batch_size)
  gather = _replicate(mesh)
  previous = None
  for local in tqdm(
    data,
    total=total,
    desc=desc or "descriptors",
    unit="batch",
    leave=False,
    disable=jax.process_index() != 0 or not sys.stderr.isatty(),
  ):
    preemption.check_evaluation()  # a trainer's SIGTERM stops here, between batches
    # each process loads its share of the global batch; descriptors and image indices come back
    # replicated, so every process fills the whole `out`. Batch i is dispatched before batch i-1
    # is read back, so loading batch i+1 overlaps the devices' work.
    batch = sharding.global_batch({"images": local["images"], "index": local["index"]}, mesh)
    current = (describe(params, batch["images"]), gather(batch["index"]))
    if previous is not None:
      _store(out, *previous)
    previous = current
  if previous is not None:
    _store(out, *previous)
  # grain's worker batches live in shared memory and sit in reference cycles: collect them now
  # so their segments are unlinked (else "leaked shared_memory objects" at exit, grain#398)
  del data
  gc.collect()
  _wait_for_shm_unlinks()
  return out


def _wait_for_shm_unlinks() -> None:
  """grain unlinks those segments on a one-thread pool (`SharedMemoryArray.enable_async_del`); a
  process that exits right after evaluating could leave some behind. A no-op through the same
  pool returns once every unlink queued before it has run."""
  try:
    from grain._src.python.ipc.shared_memory_array import SharedMemoryArray
  except ImportError:  # another grain layout: nothing to wait for that we know of
    return
  pool = getattr(SharedMemoryArray, "_del_thread_pool", None)
  if pool is not None:
    pool.apply(int)


@functools.lru_cache(maxsize=None)
def _replicate(mesh):
  """Jitted identity onto every device of `mesh` (an all-gather, across processes too)."""
  return jax.jit(lambda x: x, out_shardings=sharding.replicated(mesh))


def _store(out: np.ndarray, descriptors: jax.Array, index: jax.Array) -> None:
  """Writes one global batch's descriptors into `out` at their image indices (-1 = padding)."""
  d, index = np.asarray(descriptors), np.asarray(index)
  keep = index >= 0
  out[index[keep]] = d[keep]


def set_descriptors(
  eval_set: eval_sets.EvalSet,
  params,
  model_cfg: ModelConfig,
  mesh,
  *,
  image_size=(322, 322),
  batch_size: int = 32,
  num_workers: int = 0,
  describe=None,
  cache=None,
) -> tuple[np.ndarray, np.ndarray]:
  """(database, query) descriptors of a set: one `extract` pass, or per role through `cache`
  (a `descriptor_cache.DescriptorCache`). NaN/Inf descriptors are an error naming the first image."""
  kw = dict(
    image_size=tuple(image_size),
    batch_size=batch_size,
    mesh=mesh,
    num_workers=num_workers,
    describe=describe,
  )
  db_paths, q_paths = list(eval_set.database_paths), list(eval_set.query_paths)
  if cache is None:
    desc = extract(params, model_cfg, db_paths + q_paths, desc=eval_set.name, **kw)
    db, q = desc[: len(db_paths)], desc[len(db_paths) :]
  else:
    db = cache.get(
      "database",
      db_paths,
      label=eval_set.name,
      compute=lambda: extract(params, model_cfg, db_paths, desc=f"{eval_set.name} database", **kw),
    )
    q = cache.get(
      "queries",
      q_paths,
      label=eval_set.name,
      compute=lambda: extract(params, model_cfg, q_paths, desc=f"{eval_set.name} queries", **kw),
    )
  for d, paths in ((db, db_paths), (q, q_paths)):
    bad = np.flatnonzero(~np.isfinite(d).all(axis=1))
    if bad.size:
      raise UserError(
        f"{eval_set.name}: {bad.size} of {len(d)} descriptors are NaN/Inf (first: {paths[bad[0]]})",
        "the checkpoint's weights are not finite, or the model overflows in "
        "this dtype (try --dtype float32)",
      )
  return db, q
