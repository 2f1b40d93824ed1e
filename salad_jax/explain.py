"""Why two images match: their descriptor similarity split exactly into the global token's part
and each cluster's part, and the pair picture that shows it (`python -m salad_jax.visualize
--pair`).

A SALAD descriptor is L2norm(concat(L2norm(token) [g], flatten(V) [l * m])), V [l, m] with each
cluster's column L2-normalised and flattened channel-major: cluster k holds dims g + c * m + k,
c = 0..l-1 (not a contiguous block). The similarity of two unit descriptors is their dot product,
a sum over dims: grouping those dims gives the token's share and each cluster's share, which add
up to the similarity (up to float rounding). Each part is at most 1 / (m + 1): an image with
itself gives exactly that for every cluster with mass.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw

from salad_jax import drawing

SHARE = 0.5  # default: colour the fewest clusters that give half of the clusters' positive part


@dataclasses.dataclass(frozen=True)
class Explanation:
  """A pair's similarity and its parts; `top`: the coloured clusters, largest part first."""

  similarity: float  # dot product of the two (unit) descriptors
  token: float  # the global token's part
  clusters: np.ndarray  # [m] float64: each cluster's part; token + clusters.sum() == similarity
  top: tuple[int, ...]

  @property
  def top_part(self) -> float:
    return float(self.clusters[list(self.top)].sum()) if self.top else 0.0

  def to_json(self) -> dict:
    return {
      "similarity": self.similarity,
      "token": self.token,
      "clusters": [float(c) for c in self.clusters],
      "top": list(self.top),
    }


def contributions(desc_a, desc_b, num_clusters: int, token_dim: int) -> tuple[float, np.ndarray]:
  """(the token's part, [m] the clusters' parts) of desc_a . desc_b, in float64."""
  a, b = np.asarray(desc_a, np.float64), np.asarray(desc_b, np.float64)
  if a.shape != b.shape or a.ndim != 1 or (a.size - token_dim) % num_clusters:
    raise ValueError(
      f"descriptors {a.shape} and {b.shape}: expected two [g + l * m] vectors with "
      f"g={token_dim}, m={num_clusters}"
    )
  prod = a * b
  per_cluster = prod[token_dim:].reshape(-1, num_clusters)  # [l, m]: channel-major (see above)
  return float(prod[:token_dim].sum()), per_cluster.sum(axis=0)


def top_clusters(clusters: np.ndarray, share: float = SHARE, top_k: int | None = None):
  """The clusters to colour, largest part first: the `top_k` largest, or the fewest whose parts
  reach `share` of the clusters' positive parts (none when no part is positive)."""
  order = np.argsort(-clusters, kind="stable")
  if top_k:
    return tuple(int(k) for k in order[:top_k])
  positive = clusters[clusters > 0].sum()
  if positive <= 0:
    return ()
  n = int(np.searchsorted(np.cumsum(clusters[order]), share * positive * (1 - 1e-12))) + 1
  return tuple(int(k) for k in order[: min(n, len(order))])


def explain(
  desc_a, desc_b, num_clusters: int, token_dim: int, share: float = SHARE, top_k=None
) -> Explanation:
  token, clusters = contributions(desc_a, desc_b, num_clusters, token_dim)
  sim = float(np.dot(np.asarray(desc_a, np.float64), np.asarray(desc_b, np.float64)))
  return Explanation(sim, token, clusters, top_clusters(clusters, share, top_k))


# ------------------------------------------------------------------------------ the picture
def _chart(ex: Explanation, colors: np.ndarray, size: tuple[int, int]) -> Image.Image:
  """Bars of the parts: each coloured cluster, the other clusters (their mean), the global token.
  A full bar is 1 / (m + 1), the most one part can give (the same image twice)."""
  w, h = size
  m = len(ex.clusters)
  shown = list(ex.top[: max(1, h // 14 - 2)])
  rest = [k for k in range(m) if k not in shown]
  rows = [(f"cluster {k}", ex.clusters[k], 1, tuple(int(v) for v in colors[k])) for k in shown]
  if rest:
    rows.append((f"{len(rest)} other clusters", ex.clusters[rest].sum(), len(rest), drawing.GREY))
  rows.append(("global token", ex.token, 1, (60, 60, 60)))
  im = Image.new("RGB", (w, h), "white")
  d = ImageDraw.Draw(im)
  row_h = min(28, h // len(rows))
  for i, (label, value, n, color) in enumerate(rows):
    y = i * row_h
    pct = f" ({100 * value / ex.similarity:.0f}%)" if ex.similarity > 0 else ""
    mean = f", mean {value / n:.4f}" if n > 1 else ""
    d.text((2, y), f"{label}: {value:.4f}{pct}{mean}", fill=(0, 0, 0))
    bar = int((w - 4) * min(max(value / n * (m + 1), 0.0), 1.0))
    d.rectangle([2, y + 12, 2 + max(bar, 1), y + row_h - 3], fill=color)
  return im


def pair_panels(
  image_a: Image.Image,
  assign_a: np.ndarray,
  image_b: Image.Image,
  assign_b: np.ndarray,
  ex: Explanation,
  names: tuple[str, str] = ("A", "B"),
) -> list[list[tuple[str, Image.Image]]]:
  """The pair picture's rows of (title, panel). Row 1: both images with the patches of the top
  clusters (arg-max cluster per patch) in their colours and the rest grey, and the parts of the
  similarity; row 2: the dustbin mass per patch of both images on one scale, and its colour bar."""
  m = assign_a.shape[0] - 1
  colors = drawing.cluster_colors(m)
  top = set(ex.top)
  grids = [drawing.grid_rgb(drawing.argmax_clusters(a), colors, top) for a in (assign_a, assign_b)]
  dust = np.stack([assign_a[m], assign_b[m]])
  lo, hi = float(dust.min()), float(dust.max())
  heat = [drawing.heat_colors((x - lo) / max(hi - lo, 1e-6)) for x in dust]
  scale = drawing.scale(image_a)
  size = (image_a.size[0] * scale, image_a.size[1] * scale)
  pct = f", {100 * ex.top_part / ex.similarity:.0f}% of it" if ex.similarity > 0 else ""
  return [
    [
      (
        f"A: {names[0]}\ntop {len(top)} of {m} clusters{pct}",
        drawing.blend(image_a, grids[0], 0.6),
      ),
      (f"B: {names[1]}\nother clusters grey", drawing.blend(image_b, grids[1], 0.6)),
      (f"similarity {ex.similarity:.4f}\nits parts", _chart(ex, colors, size)),
    ],
    [
      (f"A: {names[0]}\ndustbin mass per patch", drawing.blend(image_a, heat[0], 0.8)),
      (f"B: {names[1]}\ndustbin mass per patch", drawing.blend(image_b, heat[1], 0.8)),
      ("dustbin mass\n(both, one scale)", drawing.colour_bar(lo, hi, size)),
    ],
  ]


def pair_picture(image_a, assign_a, image_b, assign_b, ex, names=("A", "B")) -> Image.Image:
  """`pair_panels` drawn: two rows of three panels, titles above each."""
  scale = drawing.scale(image_a)
  rows = pair_panels(image_a, assign_a, image_b, assign_b, ex, names)
  pictures = [drawing.panels(row, scale) for row in rows]
  canvas = Image.new("RGB", (pictures[0].width, sum(p.height for p in pictures)), "white")
  for i, p in enumerate(pictures):
    canvas.paste(p, (0, i * pictures[0].height))
  return canvas
