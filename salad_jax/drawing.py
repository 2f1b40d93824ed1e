"""Drawing primitives of the assignment and pair pictures (`visualize`, `explain`): one fixed
colour per cluster, a dark-to-light heat scale with its colour bar, patch grids laid over an
image, labelled panels side by side. Pictures only: no model, no files."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

GAP = 16  # between panels
LABEL_H = 24  # a panel's label line height (two lines above each panel)

HEAT = np.array(
  [[0, 0, 4], [120, 28, 109], [237, 105, 37], [252, 255, 164]], np.float32
)  # dark -> light
GREY = (128, 128, 128)


def cluster_colors(num_clusters: int) -> np.ndarray:
  """[m, 3] uint8: cluster k always gets the same colour (golden-ratio hues, two brightnesses)."""
  hues = (np.arange(num_clusters) * 0.6180339887) % 1.0
  out = []
  for k, h in enumerate(hues):
    im = Image.new("HSV", (1, 1), (int(h * 255), 220, 255 if k % 2 == 0 else 185))
    out.append(im.convert("RGB").getpixel((0, 0)))
  return np.asarray(out, np.uint8)


def heat_colors(values: np.ndarray) -> np.ndarray:
  """Values in [0, 1] -> uint8 RGB on a dark-to-light scale."""
  x = np.clip(np.asarray(values, np.float32), 0.0, 1.0) * (len(HEAT) - 1)
  lo = np.minimum(np.floor(x).astype(int), len(HEAT) - 2)
  t = (x - lo)[..., None]
  return np.round(HEAT[lo] * (1 - t) + HEAT[lo + 1] * t).astype(np.uint8)


def colour_bar(lo: float, hi: float, size: tuple[int, int]) -> Image.Image:
  """The heat scale as a vertical bar (light = `hi` at the top) with five values beside it."""
  w, h = size
  bar_w, top, bottom = max(12, w // 6), 8, h - 8
  t = np.linspace(1.0, 0.0, bottom - top)[:, None]
  strip = np.repeat(heat_colors(t), bar_w, axis=1)
  im = Image.new("RGB", (w, h), "white")
  im.paste(Image.fromarray(strip), (4, top))
  d = ImageDraw.Draw(im)
  for f in np.linspace(0.0, 1.0, 5):
    y = int(round(bottom - 1 - f * (bottom - top - 1)))
    d.line([4 + bar_w, y, 8 + bar_w, y], fill=(0, 0, 0))
    d.text((12 + bar_w, y - 6), f"{lo + f * (hi - lo):.3f}", fill=(0, 0, 0))
  return im


def argmax_clusters(assign: np.ndarray) -> np.ndarray:
  """[m+1, gh, gw] -> [gh, gw] the cluster (0..m-1) that receives most of each patch's mass.

  The dustbin row is left out: by SALAD's marginals it holds (n-m)/n of all mass on average,
  so it outweighs every cluster on most patches; panel (a) shows it.
  """
  return assign[:-1].argmax(axis=0)


def grid_rgb(clusters: np.ndarray, colors: np.ndarray, keep=None) -> np.ndarray:
  """A patch grid of cluster ids -> their colours; clusters not in `keep` grey."""
  rgb = np.empty(clusters.shape + (3,), np.uint8)
  rgb[...] = GREY
  on = np.ones(clusters.shape, bool) if keep is None else np.isin(clusters, list(keep))
  rgb[on] = colors[clusters[on]]
  return rgb


def blend(image: Image.Image, grid: np.ndarray, alpha: float) -> Image.Image:
  """A patch grid of colours laid over `image`."""
  layer = Image.fromarray(grid).resize(image.size, Image.NEAREST)
  return Image.blend(image, layer, alpha)


def panels(items: list[tuple[str, Image.Image]], factor: int) -> Image.Image:
  """Labelled pictures side by side, each enlarged `factor` times (nearest neighbour)."""
  w, h = items[0][1].size
  w, h = w * factor, h * factor
  canvas = Image.new("RGB", (len(items) * w + (len(items) - 1) * GAP, h + 2 * LABEL_H), "white")
  d = ImageDraw.Draw(canvas)
  for i, (label, im) in enumerate(items):
    x = i * (w + GAP)
    for j, line in enumerate(label.split("\n")[:2]):
      d.text((x + 2, 2 + 12 * j), line, fill=(0, 0, 0))
    canvas.paste(im.resize((w, h), Image.NEAREST), (x, 2 * LABEL_H))
  return canvas


def scale(image: Image.Image) -> int:
  """The enlargement that brings a small picture to ~256 pixels."""
  return max(1, -(-256 // max(image.size)))
