"""Images of queries with their top-k predictions (green border = correct, red = wrong).

Same outputs as VPR-methods-evaluation: `preds/<query index>.jpg` (query, then predictions) and
`preds/<query index>.txt` with the query path, the predicted paths and the positives' paths.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw, ImageOps

TILE = 256
BORDER = 10
GAP = 16
LABEL_H = 24


def _tile(path: str, color) -> Image.Image:
  with Image.open(path) as im:
    im = ImageOps.pad(im.convert("RGB"), (TILE, TILE), color="white")
  if color is not None:
    d = ImageDraw.Draw(im)
    for i in range(BORDER):
      d.rectangle([i, i, TILE - 1 - i, TILE - 1 - i], outline=color)
  return im


def prediction_image(query: str, preds: list[str], correct: list[bool | None]) -> Image.Image:
  tiles = [_tile(query, None)] + [
      _tile(p, None if c is None else ((0, 200, 0) if c else (220, 0, 0))) for p, c in zip(preds, correct)]
  labels = ["Query"] + [f"Pred{i}" + ("" if c is None else f" - {c}") for i, c in enumerate(correct)]
  w = len(tiles) * TILE + (len(tiles) - 1) * GAP
  canvas = Image.new("RGB", (w, TILE + LABEL_H), "white")
  d = ImageDraw.Draw(canvas)
  for i, (t, label) in enumerate(zip(tiles, labels)):
    x = i * (TILE + GAP)
    d.text((x + 4, 4), label, fill=(0, 0, 0))
    canvas.paste(t, (x, LABEL_H))
  return canvas


def save_predictions(eval_set, predictions: np.ndarray, out_dir: str,
                     only_wrong: bool = False) -> int:
  """Writes one image + one text file per query; returns how many were written."""
  os.makedirs(out_dir, exist_ok=True)
  written = 0
  digits = max(3, len(str(len(predictions))))
  for qi, preds in enumerate(predictions):
    pos = None if eval_set.positives is None else set(int(x) for x in eval_set.positives[qi])
    correct = [None if pos is None else int(p) in pos for p in preds]
    if only_wrong and correct and correct[0]:
      continue
    query = eval_set.query_paths[qi]
    paths = [eval_set.database_paths[int(p)] for p in preds]
    prediction_image(query, paths, correct).save(os.path.join(out_dir, f"{qi:0{digits}d}.jpg"))
    lines = ["Query path:", query + "\n", "Predictions paths:", "\n".join(paths) + "\n"]
    if pos is not None:
      lines += ["Positives paths:", "\n".join(eval_set.database_paths[j] for j in sorted(pos)) + "\n"]
    with open(os.path.join(out_dir, f"{qi:0{digits}d}.txt"), "w") as f:
      f.write("\n".join(lines))
    written += 1
  return written
