"""train.py's settings checked before anything is generated, written or compiled.

Each bad value is one `UserError` naming the setting (`config.data.img_per_place`), its value and
what it must be: a value that would crash later (a zero step count), be caught only at the first
evaluation (after a whole epoch of training), or train something meaningless without a word (a
negative learning rate, batches without positives) stops here instead.
"""

from __future__ import annotations

import math
import re
from typing import Any

from salad_jax.errors import UserError

HINT = "fix it with --config.{key}=... or in the config file"


def _fail(key: str, value: Any, must: str) -> UserError:
  return UserError(f"config.{key} = {value!r}: {must}", HINT.format(key=key))


def _int(c, key: str, low: int, must: str | None = None) -> int:
  v = _get(c, key)
  if isinstance(v, bool) or not isinstance(v, int) or v < low:
    raise _fail(key, v, must or f"must be an integer >= {low}")
  return v


def _real(c, key: str, low: float, *, strict: bool, high: float | None = None,
          must: str | None = None) -> float:
  v = _get(c, key)
  ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
  ok = ok and (v > low if strict else v >= low) and (high is None or v <= high)
  if not ok:
    bound = (f"> {low}" if strict else f">= {low}") + (f" and <= {high}" if high is not None else "")
    raise _fail(key, v, must or f"must be a finite number {bound}")
  return float(v)


def _get(c, key: str):
  for part in key.split("."):
    c = c[part]
  return c


def _size(c, key: str, min_patches: int = 0) -> tuple[int, int]:
  from salad_jax.models import vit
  v = _get(c, key)
  values = list(v) if isinstance(v, (list, tuple)) else [v]
  if len(values) != 2 or any(isinstance(x, bool) or not isinstance(x, int) for x in values):
    raise _fail(key, v, "must be two integers (H, W), e.g. (224, 224)")
  try:
    vit.check_image_shape((1, values[0], values[1], 3), min_patches)
  except ValueError as e:
    raise UserError(f"config.{key} = {tuple(values)}: {e}", HINT.format(key=key)) from None
  return values[0], values[1]


def check(config) -> None:
  """Raises a `UserError` for the first setting that cannot train or evaluate as asked."""
  from salad_jax.evaluation import check_recall_values
  from salad_jax.train_data import city_names
  _int(config, "seed", 0)
  _int(config, "num_epochs", 1)
  _int(config, "log_every_steps", 1)
  if config.get("stop_after_steps") is not None:
    _int(config, "stop_after_steps", 0, "must be an integer >= 0 (0: run every epoch)")
  _int(config, "mesh.fsdp", 1)
  # data: the loss needs several places (negatives) and several images of each (positives)
  _int(config, "data.places_per_batch", 2, "must be an integer >= 2: the loss needs other places "
                                           "as negatives (the paper: 60)")
  k = _int(config, "data.img_per_place", 2, "must be an integer >= 2: the loss needs positives, "
                                            "other images of the same place (the paper: 4)")
  _int(config, "data.min_img_per_place", k, f"must be an integer >= data.img_per_place ({k}): "
                                            "places are drawn from those with enough images")
  clusters = _int(config, "model.num_clusters", 1)
  _size(config, "data.image_size", clusters)
  names = city_names(config.data)
  repeated = sorted({c for c in names if names.count(c) > 1})
  if repeated:  # each place would be in the data twice, as two places: its own images as negatives
    raise _fail("data.cities", config.data.cities, f"lists {', '.join(repeated)} more than once")
  _int(config, "data.num_workers", 0)
  _int(config, "data.num_threads", 1)
  # model shape fields the ModelConfig itself does not bound
  for key in ("cluster_dim", "token_dim", "hidden_dim"):
    _int(config, f"model.{key}", 1)
  if not 0 <= _real(config, "model.dropout", 0.0, strict=False, high=1.0) < 1:
    raise _fail("model.dropout", _get(config, "model.dropout"), "must be in [0, 1)")
  # optimizer and schedule (torch AdamW / LinearLR bounds)
  _real(config, "optim.lr", 0.0, strict=True)
  _real(config, "optim.weight_decay", 0.0, strict=False)
  _real(config, "optim.b1", 0.0, strict=False, high=0.999999, must="must be in [0, 1)")
  _real(config, "optim.b2", 0.0, strict=False, high=0.999999, must="must be in [0, 1)")
  _real(config, "optim.eps", 0.0, strict=True)
  _real(config, "optim.lr_start_factor", 0.0, strict=True, high=1.0, must="must be in (0, 1]")
  _real(config, "optim.lr_end_factor", 0.0, strict=False, high=1.0, must="must be in [0, 1]")
  _int(config, "optim.lr_total_iters", 1)
  freeze = _get(config, "optim.freeze")
  if not isinstance(freeze, str):
    raise _fail("optim.freeze", freeze, "must be 'auto' or a regex over param paths")
  try:
    re.compile(freeze)
  except re.error as e:
    raise _fail("optim.freeze", freeze, f"is not a valid regex ({e})") from None
  _real(config, "loss.alpha", 0.0, strict=True)
  _real(config, "loss.beta", 0.0, strict=True)
  _real(config, "loss.epsilon", 0.0, strict=False)
  _real(config, "loss.base", -math.inf, strict=True, must="must be a finite number")
  # evaluation: checked now, not at the end of the first epoch
  _size(config, "eval.image_size", clusters)
  _int(config, "eval.batch_size", 1)
  _int(config, "eval.num_workers", 0)
  _real(config, "eval.positive_dist_threshold", 0.0, strict=True,
        must="must be a positive number of metres (the paper: 25)")
  if _get(config, "eval.search") not in ("faiss", "jax"):
    raise _fail("eval.search", _get(config, "eval.search"), "must be 'faiss' or 'jax'")
  try:
    check_recall_values(_get(config, "eval.recall_values"))
  except UserError as e:
    raise UserError(f"config.eval.recall_values: {e.message}",
                    HINT.format(key="eval.recall_values")) from None
  # checkpoints: keeping none would delete the checkpoint the last line names
  _int(config, "checkpoint.every_steps", 1)
  _int(config, "checkpoint.keep_last", 1, "must be an integer >= 1 (the newest checkpoint is what "
                                          "a rerun resumes from)")
  _int(config, "checkpoint.keep_best", 0)
