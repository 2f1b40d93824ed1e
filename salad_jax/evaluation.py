"""Descriptor extraction over all devices, exact kNN search (faiss or JAX), and Recall@K.

Recall@K (as the reference and VPR-methods-evaluation): the fraction of queries with at least one
ground-truth positive among the top-K retrieved database images, in percent.
"""

from __future__ import annotations

import functools
import gc
import json
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from salad_jax import sharding
from salad_jax.data import eval_sets, images, pipeline
from salad_jax.errors import UserError
from salad_jax.models import vit
from salad_jax.models.vpr import ModelConfig, VPRModel

RECALL_VALUES = (1, 5, 10, 15, 20, 25)


# ------------------------------------------------------------------------------ descriptors
def make_describe(mc: ModelConfig, mesh):
  """Jitted (params, uint8 images [B,H,W,3] sharded on `data`) -> float32 descriptors (replicated)."""
  model = VPRModel(mc)

  def fn(params, images):
    return model.apply({"params": params}, pipeline.normalize_images(images))

  # params: any layout (replicated, or the train state's fsdp shards: XLA gathers them)
  return jax.jit(fn, in_shardings=(None, sharding.data_sharded(mesh)),
                 out_shardings=sharding.replicated(mesh))


def extract(params, mc: ModelConfig, paths: Sequence[str], *, image_size: tuple[int, int],
            batch_size: int, mesh, num_workers: int = 0, describe=None, desc: str = "") -> np.ndarray:
  """Descriptors [len(paths), D] in the order of `paths`; fixed-shape padded batches."""
  from salad_jax.models import vit
  vit.check_image_shape((1, image_size[0], image_size[1], 3), mc.num_clusters)
  n_dev = mesh.devices.size
  batch_size = -(-batch_size // n_dev) * n_dev  # a multiple of the device count
  describe = describe or make_describe(mc, mesh)
  out = np.zeros((len(paths), mc.descriptor_dim), np.float32)
  data = pipeline.eval_dataset(paths, image_size=image_size, batch_size=batch_size,
                               process_index=jax.process_index(), process_count=jax.process_count(),
                               num_workers=num_workers)
  total = -(-len(paths) // batch_size)
  gather = _replicate(mesh)
  import sys
  previous = None
  for local in tqdm(data, total=total, desc=desc or "descriptors", unit="batch", leave=False,
                    disable=jax.process_index() != 0 or not sys.stderr.isatty()):
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


# ------------------------------------------------------------------------------ search
def faiss_search(database: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  import faiss
  index = faiss.IndexFlatL2(database.shape[1])
  index.add(np.ascontiguousarray(database, np.float32))
  return index.search(np.ascontiguousarray(queries, np.float32), k)


def jax_search(database: np.ndarray, queries: np.ndarray, k: int, mesh=None,
               query_chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """Exact squared-L2 top-k on the accelerator: database rows sharded over devices."""
  mesh = mesh or sharding.make_mesh()
  n_dev = mesh.devices.size
  n = len(database)
  pad = (-n) % n_dev
  db = np.concatenate([database, np.zeros((pad, database.shape[1]), database.dtype)]) if pad else database
  valid = np.arange(len(db)) < n
  rows = sharding.data_sharded(mesh)
  db = jax.device_put(jnp.asarray(db, jnp.float32), rows)
  penalty = jax.device_put(jnp.where(valid, 0.0, jnp.inf).astype(jnp.float32), rows)
  k = min(k, n)

  @jax.jit
  def topk(q, db, penalty):  # db passed as an argument: never baked into the program
    d = (jnp.sum(q * q, axis=1, keepdims=True) - 2.0 * jnp.dot(q, db.T, precision="highest")
         + jnp.sum(db * db, axis=1)[None, :] + penalty[None, :])
    neg, idx = jax.lax.top_k(-d, k)
    return -neg, idx

  dists, idxs = [], []
  for s in range(0, len(queries), query_chunk):
    d, i = topk(jnp.asarray(queries[s:s + query_chunk], jnp.float32), db, penalty)
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


def check_recall_values(recall_values: Sequence) -> tuple[int, ...]:
  """The distinct K values, ascending; each must be a positive integer (any order, repeats ok)."""
  ks = set()
  for k in recall_values:
    try:
      ki = int(k)
      ok = float(k) == ki
    except (TypeError, ValueError):
      ok = False
    if not ok or ki <= 0:
      raise UserError(f"recall value {k!r}: K must be a positive integer",
                      "e.g. --recall_values 1 5 10 20")
    ks.add(ki)
  if not ks:
    raise UserError("no recall values given", "e.g. --recall_values 1 5 10 20")
  return tuple(sorted(ks))


def recalls(predictions: np.ndarray, positives: Sequence[np.ndarray],
            recall_values: Sequence[int] = RECALL_VALUES,
            num_database: int | None = None) -> dict[str, float]:
  """{"R@k": percent of queries with a positive among their top k}, k ascending.

  `recall_values` in any order, repeats allowed. A prediction of -1 (no result) is never a hit.
  With `num_database`, predictions too short for the largest K are an error, not a smaller K.
  """
  ks = check_recall_values(recall_values)
  preds = np.asarray(predictions)
  if preds.ndim != 2 or len(preds) != len(positives) or len(preds) == 0:
    raise ValueError(f"predictions {preds.shape} and {len(positives)} positive lists: expected "
                     "[num_queries > 0, k] and one list per query")
  if num_database is not None and preds.shape[1] < min(ks[-1], num_database):
    raise ValueError(f"R@{ks[-1]} needs the top {min(ks[-1], num_database)} predictions, got "
                     f"{preds.shape[1]}")
  first_hit = np.full(len(preds), np.inf)  # rank of the first correct prediction
  for qi, (p, pos) in enumerate(zip(preds, positives)):
    hit = np.flatnonzero((p >= 0) & np.isin(p, np.asarray(pos, np.int64)))
    if hit.size:
      first_hit[qi] = hit[0]
  return {f"R@{k}": float(100.0 * np.mean(first_hit < k)) for k in ks}


def format_table(results: Mapping[str, Mapping[str, float]]) -> str:
  ks = list(next(iter(results.values())).keys()) if results else []
  width = max([len(n) for n in results] + [7])
  lines = [f"{'dataset':<{width}} " + " ".join(f"{k:>7}" for k in ks)]
  for name, r in results.items():
    lines.append(f"{name:<{width}} " + " ".join(f"{r[k]:7.2f}" for k in ks))
  return "\n".join(lines)


# ------------------------------------------------------------------------------ one eval set
def set_descriptors(eval_set: eval_sets.EvalSet, params, mc: ModelConfig, mesh, *,
                    image_size=(322, 322), batch_size: int = 32, num_workers: int = 0,
                    describe=None, cache=None) -> tuple[np.ndarray, np.ndarray]:
  """(database, query) descriptors of a set: one `extract` pass, or per role through `cache`
  (a `desc_cache.DescriptorCache`). NaN/Inf descriptors are an error naming the first image."""
  kw = dict(image_size=tuple(image_size), batch_size=batch_size, mesh=mesh,
            num_workers=num_workers, describe=describe)
  db_paths, q_paths = list(eval_set.database_paths), list(eval_set.query_paths)
  if cache is None:
    desc = extract(params, mc, db_paths + q_paths, desc=eval_set.name, **kw)
    db, q = desc[:len(db_paths)], desc[len(db_paths):]
  else:
    db = cache.get("database", db_paths, label=eval_set.name, compute=lambda: extract(
        params, mc, db_paths, desc=f"{eval_set.name} database", **kw))
    q = cache.get("queries", q_paths, label=eval_set.name, compute=lambda: extract(
        params, mc, q_paths, desc=f"{eval_set.name} queries", **kw))
  for d, paths in ((db, db_paths), (q, q_paths)):
    bad = np.flatnonzero(~np.isfinite(d).all(axis=1))
    if bad.size:
      raise UserError(f"{eval_set.name}: {bad.size} of {len(d)} descriptors are NaN/Inf "
                      f"(first: {paths[bad[0]]})",
                      "the checkpoint's weights are not finite, or the model overflows in "
                      "this dtype (try --dtype float32)")
  return db, q


def evaluate_set(eval_set: eval_sets.EvalSet, params, mc: ModelConfig, mesh, *,
                 image_size=(322, 322), batch_size: int = 32, recall_values=RECALL_VALUES,
                 search_method: str = "faiss", num_workers: int = 0, output_dir: str | None = None,
                 save_descriptors: bool = False, num_preds_to_save: int = 0,
                 save_only_wrong_preds: bool = False, describe=None, cache=None) -> dict[str, Any]:
  """Descriptors, search and recalls for one set; returns {"recalls", "predictions"}.

  Predictions of -1 mean "no result" (never "the last database image") in the recalls, the
  prediction pictures and the MSLS challenge file.
  """
  recall_values = check_recall_values(recall_values)
  if batch_size < 1 or num_preds_to_save < 0:
    raise UserError(f"batch_size {batch_size} / num_preds_to_save {num_preds_to_save}: "
                    "need batch_size >= 1 and num_preds_to_save >= 0")
  eval_set.check_files()
  db, q = set_descriptors(eval_set, params, mc, mesh, image_size=image_size,
                          batch_size=batch_size, num_workers=num_workers, describe=describe,
                          cache=cache)
  k = max(max(recall_values), num_preds_to_save, 25 if eval_set.challenge else 0)
  _, predictions = search(db, q, min(k, len(db)), search_method, mesh)
  result: dict[str, Any] = {"predictions": predictions}
  if eval_set.positives is not None:
    result["recalls"] = recalls(predictions, eval_set.positives, recall_values, len(db))
  is_main = jax.process_index() == 0
  if output_dir and is_main:
    os.makedirs(output_dir, exist_ok=True)
    if save_descriptors:
      np.save(os.path.join(output_dir, "database_descriptors.npy"), db)
      np.save(os.path.join(output_dir, "queries_descriptors.npy"), q)
    if eval_set.challenge:
      path = os.path.join(output_dir, "msls_challenge_preds.txt")
      eval_sets.write_msls_challenge(path, eval_set, predictions[:, :25])
      result["challenge_file"] = path
    if num_preds_to_save:
      from salad_jax import visualize
      visualize.save_predictions(eval_set, predictions[:, :num_preds_to_save],
                                 os.path.join(output_dir, "preds"), save_only_wrong_preds)
  return result


class EpochEvaluator:
  """The trainer's per-epoch validation on `config.eval.sets` (checked at construction)."""

  def __init__(self, config, mesh):
    e = config.eval
    specs = [s.strip() for s in e.sets.split(",") if s.strip()] if e.sets else []
    self.sets = [eval_sets.parse_set(s, e.data_root, e.index_root or None, e.positive_dist_threshold)
                 for s in specs]
    for s in self.sets:
      s.check_files()
    self.enabled = bool(self.sets)
    self.cfg, self.mesh = e, mesh
    self.select_metric = "R@1"  # ranks the checkpoints: always computed
    self.recall_values = tuple(sorted(set(check_recall_values(e.recall_values)) | {1}))
    self._describe = None

  def __call__(self, params, mc: ModelConfig, step: int, writer=None, label: str = "") -> dict:
    if self._describe is None:
      self._describe = make_describe(mc, self.mesh)
    table, flat = {}, {}
    for i, s in enumerate(self.sets):
      r = evaluate_set(s, params, mc, self.mesh, image_size=tuple(self.cfg.image_size),
                       batch_size=self.cfg.batch_size, recall_values=self.recall_values,
                       search_method=self.cfg.search, num_workers=self.cfg.num_workers,
                       describe=self._describe)
      if "recalls" not in r:
        continue
      table[s.name] = r["recalls"]
      flat.update({f"{s.name}/{k}": v for k, v in r["recalls"].items()})
      if i == 0:
        flat[self.select_metric] = r["recalls"]["R@1"]
    if writer is not None and flat:
      writer.write(step, {f"val/{k}": v for k, v in flat.items()})
    if table and jax.process_index() == 0:
      print(f"\nRecall@K ({label}, step {step}, {self.cfg.image_size[0]}x{self.cfg.image_size[1]}):\n"
            + format_table(table), flush=True)
    return flat


def planned_outputs(sets: Sequence[eval_sets.EvalSet], *, save_descriptors: bool,
                    num_preds_to_save: int) -> list[str]:
  """Every file `evaluate_checkpoint` may write, relative to its output_dir."""
  from salad_jax import visualize
  files = ["recalls.json"] if any(s.positives is not None for s in sets) else []
  for s in sets:
    sub = "" if len(sets) == 1 else s.name
    if save_descriptors:
      files += [os.path.join(sub, "database_descriptors.npy"),
                os.path.join(sub, "queries_descriptors.npy")]
    if s.challenge:
      files.append(os.path.join(sub, "msls_challenge_preds.txt"))
    if num_preds_to_save:
      files += [os.path.join(sub, "preds", f) for f in visualize.prediction_files(s.num_queries)]
  return files


def write_recalls(path: str, results: Mapping[str, Mapping[str, float]]) -> None:
  if jax.process_index() == 0:
    with open(path, "w") as f:
      json.dump(results, f, indent=2)


def evaluate_checkpoint(checkpoint: str, sets: Sequence[eval_sets.EvalSet], output_dir: str, *,
                        image_size=(322, 322), batch_size: int = 32,
                        recall_values=RECALL_VALUES, search_method: str = "faiss",
                        num_workers: int = 4, save_descriptors: bool = False,
                        num_preds_to_save: int = 0, save_only_wrong_preds: bool = False,
                        dtype: str | None = None,
                        cache_dir: str | None = None) -> dict[str, dict[str, float]]:
  """evaluate.py's work: every set, a recall table, `recalls.json` and the requested outputs.

  `cache_dir`: reuse descriptors computed before with the same weights, model config, image size
  and image files (`salad_jax.desc_cache`); anything else is recomputed.
  """
  import salad_jax
  from salad_jax import desc_cache, errors, integrity, outputs
  recall_values = check_recall_values(recall_values)
  images.check_batch_memory(image_size, batch_size)
  errors.check_output_dir(output_dir, "output directory (--output_dir)")
  if cache_dir:
    errors.check_output_dir(cache_dir, "--cache_dir")
  for s in sets:  # missing images are reported before any compute
    s.check_files()
  if all(s.positives is None and not s.challenge for s in sets) and not (
      num_preds_to_save or save_descriptors):
    errors.warning("no labels (--no_labels) and neither --num_preds_to_save nor "
                   "--save_descriptors: retrieval only, nothing will be saved")
  # files of yours in output_dir are never overwritten; an earlier run's outputs are removed
  planned = planned_outputs(sets, save_descriptors=save_descriptors,
                            num_preds_to_save=num_preds_to_save)
  claimed = outputs.claim(output_dir, planned, "evaluate.py", write=jax.process_index() == 0)
  model = salad_jax.load(checkpoint, **({"dtype": dtype} if dtype else {}))
  mc = model.config
  vit.check_image_shape((1, image_size[0], image_size[1], 3), mc.num_clusters)
  cache = None
  if cache_dir:
    cache = desc_cache.DescriptorCache(cache_dir, integrity.params_checksum(model.params), mc,
                                       image_size)
  if jax.device_count() > 1 and mc.micro_batch == "auto":
    mc = mc.replace(micro_batch=0)
  mesh = sharding.make_mesh()
  params = sharding.put_replicated(model.params, mesh)
  describe = make_describe(mc, mesh)
  table = {}
  for s in sets:
    sub = output_dir if len(sets) == 1 else os.path.join(output_dir, s.name)
    r = evaluate_set(s, params, mc, mesh, image_size=image_size, batch_size=batch_size,
                     recall_values=recall_values, search_method=search_method,
                     num_workers=num_workers, output_dir=sub, save_descriptors=save_descriptors,
                     num_preds_to_save=num_preds_to_save,
                     save_only_wrong_preds=save_only_wrong_preds, describe=describe,
                     cache=cache)
    if jax.process_index() == 0:
      print(f"{s!r} [{s.protocol}]", flush=True)
      if "challenge_file" in r:
        print(f"  MSLS challenge predictions: {r['challenge_file']}")
    if "recalls" in r:
      table[s.name] = r["recalls"]
  if table and jax.process_index() == 0:
    print(f"\nRecall@K at {image_size[0]}x{image_size[1]} ({checkpoint}):\n{format_table(table)}")
  if table:  # without labels there are no recalls: no empty recalls.json
    write_recalls(os.path.join(output_dir, "recalls.json"), table)
  claimed.finish()  # records what this run wrote; removes what an earlier run left, not rewritten
  return table
