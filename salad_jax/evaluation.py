"""Descriptor extraction over all devices, exact kNN search (faiss or JAX), and Recall@K.

Recall@K (as the reference and VPR-methods-evaluation): the fraction of queries with at least one
ground-truth positive among the top-K retrieved database images, in percent.
"""

from __future__ import annotations

import gc
import json
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from salad_jax import sharding
from salad_jax.data import eval_sets, pipeline
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
  import sys
  for local in tqdm(data, total=total, desc=desc or "descriptors", unit="batch", leave=False,
                    disable=jax.process_index() != 0 or not sys.stderr.isatty()):
    batch = sharding.global_batch({"images": local["images"], "index": local["index"]}, mesh)
    d = np.asarray(describe(params, batch["images"]))
    index = np.asarray(multihost_utils.process_allgather(batch["index"], tiled=True)
                       if jax.process_count() > 1 else batch["index"])
    keep = index >= 0
    out[index[keep]] = d[keep]
  # grain's worker batches live in shared memory and sit in reference cycles: collect them now
  # so their segments are unlinked (else "leaked shared_memory objects" at exit, grain#398)
  del data
  gc.collect()
  return out


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
  if method == "faiss":
    return faiss_search(database, queries, k)
  if method == "jax":
    return jax_search(database, queries, k, mesh)
  raise ValueError(f"search must be 'faiss' or 'jax', got {method!r}")


def recalls(predictions: np.ndarray, positives: Sequence[np.ndarray],
            recall_values: Sequence[int] = RECALL_VALUES) -> dict[str, float]:
  """{"R@k": percent of queries with a positive in their top k}."""
  hits = np.zeros(len(recall_values))
  for preds, pos in zip(predictions, positives):
    for i, k in enumerate(recall_values):
      if np.isin(preds[:k], pos).any():
        hits[i:] += 1
        break
  return {f"R@{k}": float(100.0 * h / len(predictions)) for k, h in zip(recall_values, hits)}


def format_table(results: Mapping[str, Mapping[str, float]]) -> str:
  ks = list(next(iter(results.values())).keys()) if results else []
  width = max([len(n) for n in results] + [7])
  lines = [f"{'dataset':<{width}} " + " ".join(f"{k:>7}" for k in ks)]
  for name, r in results.items():
    lines.append(f"{name:<{width}} " + " ".join(f"{r[k]:7.2f}" for k in ks))
  return "\n".join(lines)


# ------------------------------------------------------------------------------ one eval set
def evaluate_set(eval_set: eval_sets.EvalSet, params, mc: ModelConfig, mesh, *,
                 image_size=(322, 322), batch_size: int = 32, recall_values=RECALL_VALUES,
                 search_method: str = "faiss", num_workers: int = 0, output_dir: str | None = None,
                 save_descriptors: bool = False, num_preds_to_save: int = 0,
                 save_only_wrong_preds: bool = False, describe=None) -> dict[str, Any]:
  """Descriptors, search and recalls for one set; returns {"recalls", "predictions"}."""
  eval_set.check_files()
  paths = list(eval_set.database_paths) + list(eval_set.query_paths)
  desc = extract(params, mc, paths, image_size=tuple(image_size), batch_size=batch_size, mesh=mesh,
                 num_workers=num_workers, describe=describe, desc=eval_set.name)
  db, q = desc[:eval_set.num_database], desc[eval_set.num_database:]
  k = max(max(recall_values), num_preds_to_save, 25 if eval_set.challenge else 0)
  _, predictions = search(db, q, min(k, len(db)), search_method, mesh)
  result: dict[str, Any] = {"predictions": predictions}
  if eval_set.positives is not None:
    result["recalls"] = recalls(predictions, eval_set.positives, recall_values)
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
    self.select_metric = "R@1"
    self._describe = None

  def __call__(self, params, mc: ModelConfig, step: int, writer=None, label: str = "") -> dict:
    if self._describe is None:
      self._describe = make_describe(mc, self.mesh)
    table, flat = {}, {}
    for i, s in enumerate(self.sets):
      r = evaluate_set(s, params, mc, self.mesh, image_size=tuple(self.cfg.image_size),
                       batch_size=self.cfg.batch_size, recall_values=tuple(self.cfg.recall_values),
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


def write_recalls(path: str, results: Mapping[str, Mapping[str, float]]) -> None:
  if jax.process_index() == 0:
    with open(path, "w") as f:
      json.dump(results, f, indent=2)


def evaluate_checkpoint(checkpoint: str, sets: Sequence[eval_sets.EvalSet], output_dir: str, *,
                        image_size=(322, 322), batch_size: int = 32,
                        recall_values=RECALL_VALUES, search_method: str = "faiss",
                        num_workers: int = 4, save_descriptors: bool = False,
                        num_preds_to_save: int = 0, save_only_wrong_preds: bool = False,
                        dtype: str | None = None) -> dict[str, dict[str, float]]:
  """evaluate.py's work: every set, a recall table, `recalls.json` and the requested outputs."""
  import salad_jax
  for s in sets:  # missing images are reported before any compute
    s.check_files()
  model = salad_jax.load(checkpoint, **({"dtype": dtype} if dtype else {}))
  mc = model.config
  if jax.device_count() > 1 and mc.micro_batch == "auto":
    mc = mc.replace(micro_batch=0)
  mesh = sharding.make_mesh()
  params = sharding.put_replicated(model.params, mesh)
  describe = make_describe(mc, mesh)
  os.makedirs(output_dir, exist_ok=True)
  table = {}
  for s in sets:
    sub = output_dir if len(sets) == 1 else os.path.join(output_dir, s.name)
    r = evaluate_set(s, params, mc, mesh, image_size=image_size, batch_size=batch_size,
                     recall_values=recall_values, search_method=search_method,
                     num_workers=num_workers, output_dir=sub, save_descriptors=save_descriptors,
                     num_preds_to_save=num_preds_to_save,
                     save_only_wrong_preds=save_only_wrong_preds, describe=describe)
    if jax.process_index() == 0:
      print(f"{s!r} [{s.protocol}]", flush=True)
      if "challenge_file" in r:
        print(f"  MSLS challenge predictions: {r['challenge_file']}")
    if "recalls" in r:
      table[s.name] = r["recalls"]
  if table and jax.process_index() == 0:
    print(f"\nRecall@K at {image_size[0]}x{image_size[1]} ({checkpoint}):\n{format_table(table)}")
  write_recalls(os.path.join(output_dir, "recalls.json"), table)
  return table
