"""Recall@K, as the reference and VPR-methods-evaluation compute it: the percentage of queries
with at least one ground-truth positive among their top-K retrieved database images."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from salad_jax.errors import UserError

RECALL_VALUES = (1, 5, 10, 15, 20, 25)


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
      raise UserError(
        f"recall value {k!r}: K must be a positive integer", "e.g. --recall_values 1 5 10 20"
      )
    ks.add(ki)
  if not ks:
    raise UserError("no recall values given", "e.g. --recall_values 1 5 10 20")
  return tuple(sorted(ks))


def recalls(
  predictions: np.ndarray,
  positives: Sequence[np.ndarray],
  recall_values: Sequence[int] = RECALL_VALUES,
  num_database: int | None = None,
) -> dict[str, float]:
  """{"R@k": percent of queries with a positive among their top k}, k ascending.

  `recall_values` in any order, repeats allowed. A prediction of -1 (no result) is never a hit.
  With `num_database`, predictions too short for the largest K are an error, not a smaller K.
  """
  ks = check_recall_values(recall_values)
  preds = np.asarray(predictions)
  if preds.ndim != 2 or len(preds) != len(positives) or len(preds) == 0:
    raise ValueError(
      f"predictions {preds.shape} and {len(positives)} positive lists: expected "
      "[num_queries > 0, k] and one list per query"
    )
  if num_database is not None and preds.shape[1] < min(ks[-1], num_database):
    raise ValueError(
      f"R@{ks[-1]} needs the top {min(ks[-1], num_database)} predictions, got {preds.shape[1]}"
    )
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
