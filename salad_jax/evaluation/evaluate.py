"""Evaluating a model on eval sets: descriptors, search, Recall@K and the requested outputs
(`evaluate_checkpoint`, evaluate.py's work), and the trainer's per-epoch validation
(`EpochEvaluator`)."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from salad_jax import errors, sharding, visualize
from salad_jax.data import benchmarks, eval_sets, images
from salad_jax.errors import UserError
from salad_jax.evaluation import descriptor_cache
from salad_jax.evaluation.descriptors import make_describe, set_descriptors
from salad_jax.evaluation.recall import RECALL_VALUES, check_recall_values, format_table, recalls
from salad_jax.evaluation.search import search
from salad_jax.files import atomic, destinations, outputs, paths
from salad_jax.inference import load
from salad_jax.models.config import ModelConfig
from salad_jax.weights import checksum


def evaluate_set(
  eval_set: eval_sets.EvalSet,
  params,
  model_cfg: ModelConfig,
  mesh,
  *,
  image_size=(322, 322),
  batch_size: int = 32,
  recall_values=RECALL_VALUES,
  search_method: str = "faiss",
  num_workers: int = 0,
  output_dir: str | None = None,
  save_descriptors: bool = False,
  num_preds_to_save: int = 0,
  save_only_wrong_preds: bool = False,
  describe=None,
  cache=None,
) -> dict[str, Any]:
  """Descriptors, search and recalls for one set; returns {"recalls", "predictions"}.

  Predictions of -1 mean "no result" (never "the last database image") in the recalls, the
  prediction pictures and the MSLS challenge file.
  """
  recall_values = check_recall_values(recall_values)
  if batch_size < 1 or num_preds_to_save < 0:
    raise UserError(
      f"batch_size {batch_size} / num_preds_to_save {num_preds_to_save}: "
      "need batch_size >= 1 and num_preds_to_save >= 0"
    )
  eval_set.check_files()
  db, q = set_descriptors(
    eval_set,
    params,
    model_cfg,
    mesh,
    image_size=image_size,
    batch_size=batch_size,
    num_workers=num_workers,
    describe=describe,
    cache=cache,
  )
  k = max(max(recall_values), num_preds_to_save, 25 if eval_set.challenge else 0)
  _, predictions = search(db, q, min(k, len(db)), search_method, mesh)
  result: dict[str, Any] = {"predictions": predictions}
  if eval_set.positives is not None:
    result["recalls"] = recalls(predictions, eval_set.positives, recall_values, len(db))
  is_main = jax.process_index() == 0
  if output_dir and is_main:  # each file under a fresh name, then renamed (atomic.write_with)
    paths.makedirs(output_dir)
    if save_descriptors:  # the rows' image paths beside them, written the same way
      rows = (("database", db, eval_set.database_paths), ("queries", q, eval_set.query_paths))
      for name, d, files in rows:
        atomic.write_with(
          paths.join(output_dir, f"{name}_descriptors.npy"), lambda f, d=d: np.save(f, d)
        )
        atomic.write_bytes(paths.join(output_dir, f"{name}_paths.txt"), paths_text(files))
    if eval_set.challenge:
      path = paths.join(output_dir, "msls_challenge_preds.txt")
      with atomic.new_file(path) as tmp:
        eval_sets.write_msls_challenge(tmp, eval_set, predictions[:, :25])
      result["challenge_file"] = path
    if num_preds_to_save:
      visualize.save_predictions(
        eval_set,
        predictions[:, :num_preds_to_save],
        paths.join(output_dir, "preds"),
        save_only_wrong_preds,
      )
  return result


class EpochEvaluator:
  """The trainer's per-epoch validation on `config.eval.sets` (checked at construction)."""

  def __init__(self, config, mesh):
    e = config.eval
    specs = [s.strip() for s in e.sets.split(",") if s.strip()] if e.sets else []
    specs = benchmarks.unique_specs(specs, "config.eval.sets")  # each set once
    self.sets = eval_sets.unique_names(  # names unique: they key the metrics
      [
        benchmarks.parse_set(s, e.data_root, e.index_root or None, e.positive_dist_threshold)
        for s in specs
      ],
      [not s.startswith("folder:") for s in specs],
    )
    for s in self.sets:
      s.check_files()
    self.enabled = bool(self.sets)
    self.cfg, self.mesh = e, mesh
    self.select_metric = "R@1"  # ranks the checkpoints: always computed, on the first set
    self.settings = self._settings(specs[0]) if specs else {}
    self.recall_values = tuple(sorted(set(check_recall_values(e.recall_values)) | {1}))
    self._describe = None

  def _settings(self, spec: str) -> dict:
    """What `select_metric` depends on: the first set (its files' place), the radius of its
    positives (the threshold; none for a ground-truth file) and the image size. A checkpoint
    records them (`run_checkpoints.SETTINGS`); R@1 under other settings is never compared with
    it. Other sets, K values, batch size and search method do not change R@1 on the first set."""
    e, first_set = self.cfg, self.sets[0]
    first = (
      {"folder": paths.real(spec[len("folder:") :])}
      if spec.startswith("folder:")
      else {
        "benchmark": first_set.name,
        "data_root": paths.real(e.data_root),
        "index_root": paths.real(e.index_root or paths.join(e.data_root, "datasets")),
      }
    )
    radius = first_set.positives_radius
    settings = {
      "set": first,
      "positive_dist_threshold": None if radius is None else float(radius),
      "image_size": [int(x) for x in e.image_size],
    }
    positives = "its ground truth" if radius is None else f"positives within {radius:g} m"
    text = f"R@1 on {first_set.name}, {positives}, {e.image_size[0]}x{e.image_size[1]}"
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return {"fingerprint": digest, "text": text, **settings}

  def __call__(
    self, params, model_cfg: ModelConfig, step: int, writer=None, label: str = ""
  ) -> dict:
    if self._describe is None:
      self._describe = make_describe(model_cfg, self.mesh)
    table, flat = {}, {}
    for i, s in enumerate(self.sets):
      r = evaluate_set(
        s,
        params,
        model_cfg,
        self.mesh,
        image_size=tuple(self.cfg.image_size),
        batch_size=self.cfg.batch_size,
        recall_values=self.recall_values,
        search_method=self.cfg.search,
        num_workers=self.cfg.num_workers,
        describe=self._describe,
      )
      if "recalls" not in r:
        continue
      table[s.name] = r["recalls"]
      flat.update({f"{s.name}/{k}": v for k, v in r["recalls"].items()})
      if i == 0:
        flat[self.select_metric] = r["recalls"]["R@1"]
    if writer is not None and flat:
      writer.write(step, {f"val/{k}": v for k, v in flat.items()})
    if table and jax.process_index() == 0:
      print(
        f"\nRecall@K ({label}, step {step}, {self.cfg.image_size[0]}x{self.cfg.image_size[1]}):\n"
        + format_table(table),
        flush=True,
      )
    return flat


SAVED = ("descriptors.npy", "paths.txt")  # --save_descriptors: per database and queries


def paths_text(files: Sequence[str]) -> bytes:
  """The image paths that descriptor rows belong to, one per line in row order (UTF-8; bytes a
  file name holds outside UTF-8 are written as they are: `surrogateescape`)."""
  return "".join(f"{p}\n" for p in files).encode("utf-8", "surrogateescape")


def planned_outputs(
  sets: Sequence[eval_sets.EvalSet], *, save_descriptors: bool, num_preds_to_save: int
) -> list[str]:
  """Every file `evaluate_checkpoint` may write, relative to its output_dir."""
  files = ["recalls.json"] if any(s.positives is not None for s in sets) else []
  for s in sets:
    sub = (lambda *p: "/".join(p)) if len(sets) == 1 else (lambda *p: "/".join((s.name,) + p))
    if save_descriptors:
      files += [sub(f"{n}_{kind}") for n in ("database", "queries") for kind in SAVED]
    if s.challenge:
      files.append(sub("msls_challenge_preds.txt"))
    if num_preds_to_save:
      files += [sub("preds", f) for f in visualize.prediction_files(s.num_queries)]
  return files


def write_recalls(path: str, results: Mapping[str, Mapping[str, float]]) -> None:
  if jax.process_index() == 0:
    atomic.write_text(path, json.dumps(results, indent=2))


def evaluate_checkpoint(
  checkpoint: str,
  sets: Sequence[eval_sets.EvalSet],
  output_dir: str,
  *,
  image_size=(322, 322),
  batch_size: int = 32,
  recall_values=RECALL_VALUES,
  search_method: str = "faiss",
  num_workers: int = 4,
  save_descriptors: bool = False,
  num_preds_to_save: int = 0,
  save_only_wrong_preds: bool = False,
  dtype: str | None = None,
  cache_dir: str | None = None,
  model_overrides: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, float]]:
  """evaluate.py's work: every set, a recall table, `recalls.json` and the requested outputs.

  `cache_dir`: reuse descriptors computed before with the same weights, model config, image size
  and image files (`salad_jax.desc_cache`); anything else is recomputed. `model_overrides`:
  ModelConfig fields for a torch file whose keys leave them open (`salad_jax.load`).
  """
  recall_values = check_recall_values(recall_values)
  images.check_batch_memory(image_size, batch_size)
  destinations.check_dir(output_dir, "output directory (--output_dir)")
  if cache_dir:
    destinations.check_dir(cache_dir, "--cache_dir")
  for s in sets:  # missing images are reported before any compute
    s.check_files()
  if all(s.positives is None and not s.challenge for s in sets) and not (
    num_preds_to_save or save_descriptors
  ):
    errors.warning(
      "no labels (--no_labels) and neither --num_preds_to_save nor "
      "--save_descriptors: retrieval only, nothing will be saved"
    )
  # files of yours in output_dir are never overwritten; an earlier run's outputs are removed
  planned = planned_outputs(
    sets, save_descriptors=save_descriptors, num_preds_to_save=num_preds_to_save
  )
  with outputs.claim(output_dir, planned, "evaluate.py", write=jax.process_index() == 0) as claimed:
    return _evaluate(
      checkpoint, sets, output_dir, claimed, image_size, batch_size, recall_values,
      search_method, num_workers, save_descriptors, num_preds_to_save, save_only_wrong_preds,
      dtype, cache_dir, model_overrides,
    )  # fmt: skip


def _evaluate(
  checkpoint, sets, output_dir, claimed, image_size, batch_size, recall_values, search_method,
  num_workers, save_descriptors, num_preds_to_save, save_only_wrong_preds, dtype, cache_dir, model_overrides,
):  # fmt: skip
  overrides = {**(model_overrides or {}), **({"dtype": dtype} if dtype else {})}
  model = load(checkpoint, **overrides)
  model_cfg = model.config
  model_cfg.check_image_shape((1, image_size[0], image_size[1], 3))
  if save_descriptors and jax.process_index() == 0:  # a full disk now, not after the extraction
    rows = sum(len(s.database_paths) + len(s.query_paths) for s in sets)
    atomic.check_space(paths.join(output_dir, "descriptors"), rows * model_cfg.descriptor_dim * 4)
  cache = None
  if cache_dir:
    cache = descriptor_cache.DescriptorCache(
      cache_dir, checksum.params_checksum(model.weights), model_cfg, image_size
    )
  if jax.device_count() > 1 and model_cfg.micro_batch == "auto":
    model_cfg = model_cfg.replace(micro_batch=0)
  mesh = sharding.make_mesh()
  params = sharding.put_replicated(model.weights, mesh)
  describe = make_describe(model_cfg, mesh)
  table = {}
  for s in sets:
    sub = output_dir if len(sets) == 1 else paths.join(output_dir, s.name)
    r = evaluate_set(
      s,
      params,
      model_cfg,
      mesh,
      image_size=image_size,
      batch_size=batch_size,
      recall_values=recall_values,
      search_method=search_method,
      num_workers=num_workers,
      output_dir=sub,
      save_descriptors=save_descriptors,
      num_preds_to_save=num_preds_to_save,
      save_only_wrong_preds=save_only_wrong_preds,
      describe=describe,
      cache=cache,
    )
    if jax.process_index() == 0:
      print(f"{s!r} [{s.protocol}]", flush=True)
      if "challenge_file" in r:
        print(f"  MSLS challenge predictions: {r['challenge_file']}")
    if "recalls" in r:
      table[s.name] = r["recalls"]
  if table and jax.process_index() == 0:
    print(f"\nRecall@K at {image_size[0]}x{image_size[1]} ({checkpoint}):\n{format_table(table)}")
  if table:  # without labels there are no recalls: no empty recalls.json
    write_recalls(paths.join(output_dir, "recalls.json"), table)
  claimed.finish()  # records what this run wrote; removes what an earlier run left, not rewritten
  return table
