"""Position-embedding resampling that reproduces DINOv2's `interpolate_pos_encoding`.

DINOv2 stores a 37x37 grid of patch position embeddings (for 518x518 inputs) and resamples it
with `torch.nn.functional.interpolate(mode="bicubic")` for every other input size. Two paths:

* plain models (`interpolate_offset=0.1`, no antialias): a *scale_factor* of (H0 + 0.1) / 37 is
  passed, so torch maps output index d to source coordinate (d + 0.5) * 37 / (H0 + 0.1) - 0.5
  (computed in float32), Keys cubic with A = -0.75, taps clamped to the border.
* registers models (`interpolate_offset=0`, antialias): a *size* is passed; torch uses its
  antialiased separable filter (cubic with A = -0.5, support widened by the scale when
  downsampling, taps restricted to the image and renormalised).

Both are separable, so each is a small [out, 37] matrix per axis, built once per input size in
numpy (static shapes) and applied as P' = A_h . P . A_w^T. The result is exact and differentiable
with respect to the stored embedding.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np


def _keys_cubic(t: np.ndarray, a: float) -> tuple[np.ndarray, ...]:
  """Weights of the four taps floor(x)-1 .. floor(x)+2 for fractional offset t (float32)."""
  a = np.float32(a)
  one = np.float32(1.0)

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return far(t + one), near(t), near(one - t), far(2 * one - t)


@functools.lru_cache(maxsize=64)
def scale_factor_matrix(out_size: int, in_size: int, offset: float = 0.1) -> np.ndarray:
  """[out_size, in_size] bicubic matrix of torch's scale_factor=(out+offset)/in path (float32)."""
  # torch turns the float scale_factor into a float32 coordinate scale of 1/scale_factor.
  scale = np.float32(1.0 / ((out_size + offset) / in_size))
  mat = np.zeros((out_size, in_size), np.float32)
  for d in range(out_size):
    src = scale * np.float32(d + 0.5) - np.float32(0.5)
    base = int(np.floor(src))
    base = min(base, in_size - 1)
    t = np.float32(min(max(src - np.float32(base), np.float32(0.0)), np.float32(1.0)))
    for k, w in enumerate(_keys_cubic(t, -0.75)):
      mat[d, min(max(base - 1 + k, 0), in_size - 1)] += w
  return mat


@functools.lru_cache(maxsize=64)
def antialias_size_matrix(out_size: int, in_size: int) -> np.ndarray:
  """[out_size, in_size] matrix of torch's bicubic `size=` path with antialias=True (float32)."""
  scale = np.float32(in_size / out_size)
  support = np.float32(2.0) * scale if scale >= 1.0 else np.float32(2.0)
  invscale = np.float32(1.0) / scale if scale >= 1.0 else np.float32(1.0)
  a = np.float32(-0.5)
  mat = np.zeros((out_size, in_size), np.float32)
  for d in range(out_size):
    center = scale * np.float32(d + 0.5)
    lo = max(int(center - support + np.float32(0.5)), 0)
    hi = min(int(center + support + np.float32(0.5)), in_size)
    x = np.abs((np.arange(lo, hi, dtype=np.float32) - center + np.float32(0.5)) * invscale)
    w = np.where(
      x <= 1,
      ((a + 2) * x - (a + 3)) * x * x + 1,
      np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0),
    ).astype(np.float32)
    total = w.sum(dtype=np.float32)
    mat[d, lo:hi] = w / total if total != 0 else w
  return mat


def resample_matrices(
  grid_hw: tuple[int, int], src_grid: int, antialias: bool, offset: float
) -> tuple[np.ndarray, np.ndarray]:
  """The (rows, cols) resampling matrices DINOv2 uses for a patch grid of `grid_hw`."""
  h0, w0 = grid_hw
  if antialias and offset == 0:
    return antialias_size_matrix(h0, src_grid), antialias_size_matrix(w0, src_grid)
  if antialias or offset == 0:
    raise NotImplementedError(
      f"pos-embed resampling with antialias={antialias}, offset={offset} is not a DINOv2 "
      "hub configuration (plain: offset 0.1 without antialias; registers: offset 0 with antialias)"
    )
  return scale_factor_matrix(h0, src_grid, offset), scale_factor_matrix(w0, src_grid, offset)


def interpolate_pos_embed(
  pos_embed: jnp.ndarray, grid_hw: tuple[int, int], *, antialias: bool = False, offset: float = 0.1
) -> jnp.ndarray:
  """Resamples a DINOv2 `pos_embed` [1, 1 + M*M, D] to [1, 1 + H0*W0, D] as torch does.

  The 518x518 shortcut of the reference applies: a square grid of M x M returns the stored
  table unchanged. The resampling runs in float32 whatever the parameter dtype.
  """
  n = pos_embed.shape[1] - 1
  m = int(round(n**0.5))
  if m * m != n:
    raise ValueError(f"pos_embed holds {n} patch positions, not a square grid")
  h0, w0 = grid_hw
  if h0 * w0 == n and h0 == w0:
    return pos_embed
  a_h, a_w = resample_matrices((h0, w0), m, antialias, offset)
  dtype = pos_embed.dtype
  table = pos_embed.astype(jnp.float32)
  cls_pos, grid = table[:, :1], table[0, 1:].reshape(m, m, -1)
  hp = jnp.einsum("hm,mnd->hnd", jnp.asarray(a_h), grid, precision="highest")
  out = jnp.einsum("wn,hnd->hwd", jnp.asarray(a_w), hp, precision="highest")
  return jnp.concatenate([cls_pos, out.reshape(1, h0 * w0, -1)], axis=1).astype(dtype)
