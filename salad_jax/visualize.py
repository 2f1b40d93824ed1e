r"""Pictures: queries with their top-k predictions, and SALAD's assignment maps.

Predictions (evaluate.py --num_preds_to_save), as VPR-methods-evaluation: `preds/<query>.jpg`
(the query, then its predictions: green border = correct, red = wrong, grey = no result) and
`preds/<query>.txt` with the query path, the predicted paths and the positives' paths.

Assignment maps: what SALAD's optimal transport does with each patch, drawn from the model's own
Sinkhorn assignment (`SaladModel.assignment`; this module only draws):

  python -m salad_jax.visualize --checkpoint weights/dino_salad --images a.jpg b.jpg \
      --image_size 322 --output_dir runs/assignment [--pair]

per image: the image, (a) the dustbin mass per patch with its colour bar, (b) the arg-max cluster
per patch (one fixed colour per cluster, the same in every picture). With --pair, why the two
match (`salad_jax.explain`): their descriptor similarity, each cluster's and the global token's
part of it (they add up to it), the patches of the clusters that give most of it coloured in
both images and the rest grey (`--top_clusters K`, or the fewest that give half of the clusters'
part), the dustbin maps on one scale with its colour bar, and the file names; the numbers go to
`pair_<a>_<b>.json`. `assignments.npz` holds the values:
`names` (the image paths as given, [N] strings) and `assignments` [N, m+1, H/14, W/14] (row m =
dustbin), in the same order: `z = np.load(...); dict(zip(z["names"], z["assignments"]))`.
(Image names are never used as keys: np.savez takes them as its own keyword arguments.)

Every file is written under a fresh name and renamed into place (`salad_jax.files.atomic`), so a
hard-linked backup of an earlier run's output is never written into; `--output_dir` may be a URL
(gs://...).
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from salad_jax import drawing, explain
from salad_jax.data.images import load_image, normalize, resize
from salad_jax.files import atomic, paths
from salad_jax.weights import torch_files

TILE = 256
BORDER = 10
GAP, LABEL_H = drawing.GAP, drawing.LABEL_H


def _tile(path: str | None, color) -> Image.Image:
  if path is None:  # no result
    im = Image.new("RGB", (TILE, TILE), (200, 200, 200))
    ImageDraw.Draw(im).text((TILE // 2 - 28, TILE // 2 - 6), "no result", fill=(0, 0, 0))
    return im
  with Image.open(path) as im:
    im = ImageOps.pad(im.convert("RGB"), (TILE, TILE), color="white")
  if color is not None:
    d = ImageDraw.Draw(im)
    for i in range(BORDER):
      d.rectangle([i, i, TILE - 1 - i, TILE - 1 - i], outline=color)
  return im


def prediction_image(
  query: str, preds: list[str | None], correct: list[bool | None]
) -> Image.Image:
  """`preds`: paths, None for "no result"; `correct`: per prediction, None without labels."""
  tiles = [_tile(query, None)] + [
    _tile(
      p,
      (150, 150, 150) if p is None else None if c is None else ((0, 200, 0) if c else (220, 0, 0)),
    )
    for p, c in zip(preds, correct)
  ]
  labels = ["Query"] + [
    f"Pred{i}" + (" - no result" if p is None else "" if c is None else f" - {c}")
    for i, (p, c) in enumerate(zip(preds, correct))
  ]
  w = len(tiles) * TILE + (len(tiles) - 1) * GAP
  canvas = Image.new("RGB", (w, TILE + LABEL_H), "white")
  d = ImageDraw.Draw(canvas)
  for i, (t, label) in enumerate(zip(tiles, labels)):
    x = i * (TILE + GAP)
    d.text((x + 4, 4), label, fill=(0, 0, 0))
    canvas.paste(t, (x, LABEL_H))
  return canvas


def prediction_files(num_queries: int) -> list[str]:
  """Every name `save_predictions` may write for `num_queries` queries (relative to its folder)."""
  digits = max(3, len(str(num_queries)))
  return [f"{qi:0{digits}d}.{ext}" for qi in range(num_queries) for ext in ("jpg", "txt")]


def save_predictions(
  eval_set, predictions: np.ndarray, out_dir: str, only_wrong: bool = False
) -> int:
  """Writes one image + one text file per query; returns how many were written.

  A prediction of -1 (faiss: no result) is drawn and listed as "no result", never as an image.
  """
  paths.makedirs(out_dir)
  written = 0
  digits = max(3, len(str(len(predictions))))
  for qi, preds in enumerate(predictions):
    pos = None if eval_set.positives is None else set(int(x) for x in eval_set.positives[qi])
    correct = [None if pos is None else (int(p) >= 0 and int(p) in pos) for p in preds]
    if only_wrong and correct and correct[0]:
      continue
    query = eval_set.query_paths[qi]
    found = [eval_set.database_paths[int(p)] if int(p) >= 0 else None for p in preds]
    picture = prediction_image(query, found, correct)
    atomic.write_with(
      paths.join(out_dir, f"{qi:0{digits}d}.jpg"), lambda f: picture.save(f, format="JPEG")
    )
    listed = [p if p is not None else "(no result)" for p in found]
    lines = ["Query path:", query + "\n", "Predictions paths:", "\n".join(listed) + "\n"]
    if pos is not None:
      lines += [
        "Positives paths:",
        "\n".join(eval_set.database_paths[j] for j in sorted(pos)) + "\n",
      ]
    atomic.write_text(paths.join(out_dir, f"{qi:0{digits}d}.txt"), "\n".join(lines))
    written += 1
  return written


# ------------------------------------------------------------------------------ assignment maps
def assignment_picture(image: Image.Image, assign: np.ndarray, name: str = "") -> Image.Image:
  """Image | dustbin mass per patch | arg-max cluster per patch | the dustbin's colour bar
  (`image` as the model saw it, `name` its file name)."""
  m = assign.shape[0] - 1
  dust = assign[m]
  lo, hi = float(dust.min()), float(dust.max())
  clusters = drawing.argmax_clusters(assign)
  used = len(np.unique(clusters))
  scale = drawing.scale(image)
  return drawing.panels(
    [
      (f"image\n{name}", image),
      (
        f"(a) dustbin mass per patch\ndark {lo:.2f} .. light {hi:.2f}",
        drawing.blend(image, drawing.heat_colors((dust - lo) / max(hi - lo, 1e-6)), 0.8),
      ),
      (
        f"(b) arg-max cluster per patch\n{used} of {m} clusters",
        drawing.blend(image, drawing.grid_rgb(clusters, drawing.cluster_colors(m)), 0.6),
      ),
      ("dustbin mass (a)", drawing.colour_bar(lo, hi, (image.width * scale, image.height * scale))),
    ],
    scale,
  )


def _names(images) -> list[str]:
  """File stems, unique: when two images share one, every name gets its position as a prefix
  (prefixing only the repeated ones could meet another image's own name, e.g. 00_x)."""
  stems = [os.path.splitext(paths.name(p))[0] for p in images]
  if len(set(stems)) == len(stems):
    return stems
  return [f"{i:02d}_{stem}" for i, stem in enumerate(stems)]


def assignment_files(images, pair: bool = False) -> list[str]:
  """The files `assignment_maps` writes for `images`, relative to its output_dir."""
  names = _names(images)
  return (
    [f"{name}_assignment.png" for name in names]
    + ([f"pair_{names[0]}_{names[1]}.{ext}" for ext in ("png", "json")] if pair else [])
    + ["assignments.npz"]
  )


def _save_png(path: str, picture: Image.Image) -> None:
  atomic.write_with(path, lambda f: picture.save(f, format="PNG"))


def assignment_maps(
  model, files, image_size, output_dir: str, pair: bool = False, top_clusters: int = 0
) -> list[str]:
  """Draws `model.assignment` for each image, and with `pair` the pair picture of the first two
  and its numbers (`salad_jax.explain`: `top_clusters` coloured, or 0: the fewest that give half
  of the clusters' part); returns the files written into `output_dir`."""
  if not files:
    raise ValueError("assignment_maps: no images given")
  images, assigns, descs = [], [], []
  for path in files:
    with paths.local_copy(path) as local:  # an image on gs:// is read from a download
      im = resize(load_image(local), image_size)  # the pixels the model sees
    images.append(im)
    assigns.append(model.assignment(normalize(im)))
    if pair:
      descs.append(model.describe(normalize(im)))
  written = [paths.join(output_dir, f) for f in assignment_files(files, pair)]
  shown = [paths.name(p) for p in files]
  for im, a, name, path in zip(images, assigns, shown, written):
    _save_png(path, assignment_picture(im, a, name))
  if pair:
    c = model.config
    ex = explain.explain(*descs[:2], c.num_clusters, c.token_dim, top_k=top_clusters or None)
    picture = explain.pair_picture(images[0], assigns[0], images[1], assigns[1], ex, shown[:2])
    _save_png(written[-3], picture)
    data = dict(ex.to_json(), images=[os.fspath(p) for p in files[:2]])
    atomic.write_text(written[-2], json.dumps(data, indent=1))
  names = np.asarray([os.fspath(p) for p in files], dtype=str)
  atomic.write_with(written[-1], lambda f: np.savez(f, names=names, assignments=np.stack(assigns)))
  return written


def has_salad_head(path: str) -> bool:
  """Whether a torch/safetensors checkpoint file holds a SALAD head, from its keys alone (a
  DINOv2 backbone file would get a random head). Undecidable here: True, `load` will tell."""
  try:
    with paths.local_copy(path) as local:
      if torch_files.file_kind(path) == "safetensors":
        from safetensors import safe_open

        with safe_open(local, "np") as f:
          keys = list(f.keys())
      else:
        import torch

        obj = torch.load(local, map_location="cpu", weights_only=True, mmap=True)
        keys = list(obj.get("state_dict", obj)) if isinstance(obj, dict) else []
  except Exception:  # noqa: BLE001 (unreadable here: salad_jax.load gives the real message)
    return True
  return any(str(k).startswith("aggregator.") for k in keys) or not keys


def _main(argv) -> None:
  from absl import app, flags

  from salad_jax import argv_compat, cli, errors, inference
  from salad_jax.data import images
  from salad_jax.files import destinations, outputs

  F = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_logs()
  size = argv_compat.image_size(F.image_size)
  if not F.images:
    raise errors.UserError("--images is empty: no image files given", "e.g. --images a.jpg b.jpg")
  for p in F.images:
    if paths.isdir(p):
      raise IsADirectoryError(f"--images {p} is a folder; give image files (e.g. {p}/*.jpg)")
    if not paths.isfile(p):
      raise FileNotFoundError(f"--images: image not found: {p}")
  if F.top_clusters and not F.pair:
    raise app.UsageError("--top_clusters chooses the clusters coloured in a --pair picture")
  if F.pair and len(F.images) != 2:
    raise app.UsageError(f"--pair shows two images (a query and its match); got {len(F.images)}")
  inference.check_checkpoint_exists(F.checkpoint)
  out = destinations.check_dir(F.output_dir, "--output_dir")
  images.check_batch_memory(size, 1)
  with outputs.claim(out, assignment_files(F.images, F.pair), "salad_jax.visualize") as claimed:
    _draw(F, size, out, claimed)


def _draw(F, size, out, claimed) -> None:
  import salad_jax
  from salad_jax import errors

  no_head = paths.isfile(F.checkpoint) and not has_salad_head(F.checkpoint)
  model = None if no_head else salad_jax.load(F.checkpoint)
  if no_head or model.source.get("kind") == "dinov2":
    raise errors.UserError(
      f"{F.checkpoint} is a DINOv2 backbone without a SALAD head: it has no assignment to show",
      "give a SALAD checkpoint (dino_salad.ckpt, a converted dir or a train.py workdir)",
    )
  model.config.check_image_shape((1, size[0], size[1], 3))
  for path in assignment_maps(model, F.images, size, out, F.pair, F.top_clusters):
    print(f"wrote {path}")
  claimed.finish()


if __name__ == "__main__":
  import sys

  from absl import flags

  from salad_jax import argv_compat, cli, errors

  flags.DEFINE_string(
    "checkpoint", None, "SALAD checkpoint: converted dir, train.py workdir or .ckpt/.pth."
  )
  flags.DEFINE_list("images", None, "Image files (space- or comma-separated).")
  flags.DEFINE_list("image_size", ["322", "322"], "H W (one value: square); multiples of 14.")
  flags.DEFINE_string("output_dir", "runs/assignment", "Where the pictures go.")
  flags.DEFINE_bool(
    "pair", False, "Two images: their similarity, its parts, the top clusters coloured in both."
  )
  flags.DEFINE_integer(
    "top_clusters", 0, "With --pair: clusters to colour (0: the fewest giving half their part).", 0
  )
  flags.mark_flags_as_required(["checkpoint", "images"])
  try:
    sys.argv, _ = argv_compat.rewrite(sys.argv, *argv_compat.flag_kinds())
  except errors.UserError as e:
    cli.fail(e.message, e.hint)
  cli.run(_main)
