"""The embedded demo dataset: procedural places, generated deterministically from a seed.

Each place is a distinct synthetic street scene (sky, ground, buildings with window grids, trees,
signs). Its images are views that differ in viewpoint (perspective warp, crop and scale),
lighting and colour, blur and partial occlusion, so recognising a place takes more than matching
pixels. Written in the real layouts, so the demo runs the same readers as a real run:

  <base>/gsv/Dataframes/<City>.csv + <base>/gsv/Images/<City>/<GSV-Cities name>.jpg   (training)
  <base>/eval/database/@east@north@...@.jpg + <base>/eval/queries/...              (held-out places)

Generated once; `<base>/.demo_complete` records the version and seed.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import string
import tempfile

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from salad_jax.data.gsv_cities import image_name
from salad_jax.errors import UserError

VERSION = 1
CITIES = ("DemoNorth", "DemoSouth")
TRAIN_PLACES_PER_CITY = 90
EVAL_PLACES = 60
SCENE_SIZE = (320, 240)
VIEW_SIZE = (160, 120)
MARKER = ".demo_complete"


def _color(rng, lo=0, hi=255):
  return tuple(int(c) for c in rng.integers(lo, hi, 3))


def scene(rng: np.random.Generator) -> Image.Image:
  """One place: a random street scene."""
  w, h = SCENE_SIZE
  img = Image.new("RGB", (w, h))
  d = ImageDraw.Draw(img)
  horizon = int(h * rng.uniform(0.35, 0.6))
  top, bottom = np.array(_color(rng, 60, 255)), np.array(_color(rng, 60, 255))
  for y in range(horizon):
    c = top + (bottom - top) * y / max(horizon - 1, 1)
    d.line([(0, y), (w, y)], fill=tuple(int(v) for v in c))
  d.rectangle([0, horizon, w, h], fill=_color(rng, 20, 160))
  for _ in range(int(rng.integers(4, 9))):  # buildings
    bw, bh = int(rng.integers(30, 110)), int(rng.integers(40, horizon + 30))
    x0 = int(rng.integers(-20, w - 10))
    y1 = horizon + int(rng.integers(0, 25))
    d.rectangle([x0, y1 - bh, x0 + bw, y1], fill=_color(rng), outline=_color(rng, 0, 80))
    win, gap = int(rng.integers(4, 10)), int(rng.integers(4, 10))
    wc = _color(rng)
    for yy in range(y1 - bh + gap, y1 - win, win + gap):
      for xx in range(x0 + gap, x0 + bw - win, win + gap):
        d.rectangle([xx, yy, xx + win, yy + win], fill=wc)
  for _ in range(int(rng.integers(1, 5))):  # trees
    x, y, r = (
      int(rng.integers(0, w)),
      horizon + int(rng.integers(-10, 30)),
      int(rng.integers(8, 25)),
    )
    d.rectangle([x - 2, y, x + 2, y + r], fill=(80, 50, 20))
    d.ellipse([x - r, y - 2 * r, x + r, y], fill=_color(rng, 0, 180))
  for _ in range(int(rng.integers(1, 4))):  # signs / road markings
    x, y = int(rng.integers(0, w - 40)), int(rng.integers(horizon, h - 10))
    sw = int(rng.integers(15, 50))
    for k in range(int(rng.integers(2, 5))):
      d.rectangle([x + k * sw // 4, y, x + k * sw // 4 + sw // 8, y + 8], fill=_color(rng))
  pts = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(3)]
  d.polygon(pts, fill=_color(rng))
  return img


def view(img: Image.Image, rng: np.random.Generator) -> Image.Image:
  """A different photo of the same place: viewpoint, lighting/colour, blur, occlusion."""
  w, h = img.size
  j = 0.12
  quad = []
  for cx, cy in ((0, 0), (0, h), (w, h), (w, 0)):  # perspective warp (source quad corners)
    quad += [cx + rng.uniform(-j, j) * w, cy + rng.uniform(-j, j) * h]
  out = img.transform((w, h), Image.QUAD, quad, Image.BILINEAR)
  s = rng.uniform(0.7, 1.0)  # crop + scale
  cw, ch = int(w * s), int(h * s)
  x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
  out = out.crop((x0, y0, x0 + cw, y0 + ch)).resize(VIEW_SIZE, Image.BILINEAR)
  out = ImageEnhance.Brightness(out).enhance(rng.uniform(0.6, 1.4))
  out = ImageEnhance.Contrast(out).enhance(rng.uniform(0.7, 1.3))
  out = ImageEnhance.Color(out).enhance(rng.uniform(0.6, 1.4))
  gains = rng.uniform(0.85, 1.15, 3)
  out = Image.fromarray(np.clip(np.asarray(out, np.float32) * gains, 0, 255).astype(np.uint8))
  if rng.random() < 0.5:
    out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5)))
  if rng.random() < 0.5:  # occluder: a car, a pedestrian, a truck...
    vw, vh = out.size
    ow, oh = int(vw * rng.uniform(0.15, 0.35)), int(vh * rng.uniform(0.2, 0.5))
    ox, oy = int(rng.integers(0, vw - ow)), int(rng.integers(0, vh - oh))
    ImageDraw.Draw(out).rectangle([ox, oy, ox + ow, oy + oh], fill=_color(rng))
  return out


def _panoid(rng) -> str:
  chars = string.ascii_letters + string.digits + "-_"
  return "".join(chars[i] for i in rng.integers(0, len(chars), 22))


def _write_train(root: str, seed: int) -> None:
  os.makedirs(os.path.join(root, "Dataframes"))
  for ci, city in enumerate(CITIES):
    img_dir = os.path.join(root, "Images", city)
    os.makedirs(img_dir)
    rows = []
    for pid in range(TRAIN_PLACES_PER_CITY):
      rng = np.random.default_rng([seed, 0, ci, pid])
      base = scene(rng)
      lat, lon = round(float(rng.uniform(40, 60)), 6), round(float(rng.uniform(-10, 30)), 6)
      n_img = 3 if pid % 15 == 14 else int(rng.integers(4, 8))  # a few places too small to keep
      for k in range(n_img):
        year, month, north = (
          int(rng.integers(2008, 2022)),
          int(rng.integers(1, 13)),
          int(rng.integers(0, 360)),
        )
        pano = _panoid(rng)
        view(base, rng).save(
          os.path.join(img_dir, image_name(city, pid, year, month, north, lat, lon, pano)),
          quality=90,
        )
        rows.append([pid, year, month, north, city, lat, lon, pano])
    with open(os.path.join(root, "Dataframes", f"{city}.csv"), "w", newline="") as f:
      wr = csv.writer(f)
      wr.writerow(["place_id", "year", "month", "northdeg", "city_id", "lat", "lon", "panoid"])
      wr.writerows(rows)


def _write_eval(root: str, seed: int) -> None:
  for sub in ("database", "queries"):
    os.makedirs(os.path.join(root, sub))
  for p in range(EVAL_PLACES):
    rng = np.random.default_rng([seed, 1, p])
    base = scene(rng)
    east, north = 500_000.0 + 200.0 * (p % 10), 4_000_000.0 + 200.0 * (p // 10)  # 200 m apart
    for sub, n in (("database", 2), ("queries", 1)):
      for k in range(n):
        e, nn = east + rng.uniform(-5, 5), north + rng.uniform(-5, 5)
        name = f"@{e:.2f}@{nn:.2f}@demo@{p:03d}@{k}@.jpg"
        view(base, rng).save(os.path.join(root, sub, name), quality=90)


def ensure(gsv_root: str, seed: int = 0) -> str:
  """Generates the demo dataset next to `gsv_root` (= <base>/gsv) unless already there."""
  if os.path.basename(os.path.normpath(gsv_root)) != "gsv":
    raise UserError(
      f"config.data.root {gsv_root!r}: the demo's training set is the gsv/ folder "
      "of the demo dataset (it writes <dir>/gsv and <dir>/eval)",
      "use --config.data.root=<dir>/gsv, e.g. demo_data/gsv",
    )
  base = os.path.dirname(os.path.abspath(gsv_root))
  marker = os.path.join(base, MARKER)
  want = {"version": VERSION, "seed": seed}
  if os.path.isfile(marker):
    with open(marker) as f:
      if json.load(f) == want:
        return base
    raise FileExistsError(
      f"{base} holds a demo dataset of another version/seed; delete it or "
      "choose another --config.data.root"
    )
  if os.path.isdir(base) and os.listdir(base):
    raise FileExistsError(
      f"{base} exists and is not a demo dataset (no {MARKER}); choose another --config.data.root"
    )
  os.makedirs(os.path.dirname(base) or ".", exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".demo_tmp_", dir=os.path.dirname(base) or ".")
  try:
    print(f"generating the demo dataset in {base} (once, a few seconds) ...", flush=True)
    _write_train(os.path.join(tmp, "gsv"), seed)
    _write_eval(os.path.join(tmp, "eval"), seed)
    with open(os.path.join(tmp, MARKER), "w") as f:
      json.dump(want, f)
    if os.path.exists(base):
      if os.listdir(base):
        raise FileExistsError(f"{base} exists and is not a demo dataset; choose another root")
      os.rmdir(base)
    os.replace(tmp, base)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
  return base
