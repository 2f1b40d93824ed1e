"""RandAugment ops against the documented formulas (torchvision 0.16 on PIL, Pillow semantics)."""

import math

import numpy as np
import pytest
from PIL import Image

from salad_jax.data import augment

RNG = np.random.default_rng(0)
ARR = RNG.integers(0, 256, (224, 224, 3), dtype=np.uint8)
IMG = Image.fromarray(ARR)


def test_magnitudes_at_bin_9_of_31():
  hw = (224, 224)
  assert augment.magnitude_of("ShearX", hw) == pytest.approx(0.09, abs=1e-7)
  assert int(augment.magnitude_of("TranslateX", hw)) == 30
  assert augment.magnitude_of("TranslateX", hw) == pytest.approx(150 / 331 * 224 * 9 / 30, rel=1e-6)
  assert augment.magnitude_of("Rotate", hw) == 9.0
  assert augment.magnitude_of("Brightness", hw) == pytest.approx(0.27, abs=1e-7)
  assert augment.magnitude_of("Posterize", hw) == 7
  assert augment.magnitude_of("Solarize", hw) == 178.5
  assert augment.magnitude_of("Equalize", hw) == 0.0
  assert len(augment.OPS) == 14 and "Invert" not in augment.OPS


@pytest.mark.parametrize(
  "op,dx,dy", [("TranslateX", 30, 0), ("TranslateX", -30, 0), ("TranslateY", 0, 30)]
)
def test_translate_is_an_integer_shift_with_black_fill(op, dx, dy):
  d = float(dx or dy)
  out = np.asarray(augment.apply_op(IMG, op, d + 0.45 * np.sign(d)))  # int() truncates toward 0
  want = np.zeros_like(ARR)
  h, w = ARR.shape[:2]
  ys, xs = slice(max(dy, 0), h + min(dy, 0)), slice(max(dx, 0), w + min(dx, 0))
  ys_src, xs_src = slice(max(-dy, 0), h + min(-dy, 0)), slice(max(-dx, 0), w + min(-dx, 0))
  want[ys, xs] = ARR[ys_src, xs_src]
  np.testing.assert_array_equal(out, want)


def _bilinear_trunc(arr, xs, ys):
  """Pillow's AFFINE bilinear sample at source (xs, ys) (pixel-centre coordinates), truncated."""
  h, w = arr.shape[:2]
  if xs < 0 or xs >= w or ys < 0 or ys >= h:
    return np.zeros(3)
  xs, ys = xs - 0.5, ys - 0.5
  x0, y0 = math.floor(xs), math.floor(ys)
  dx, dy = xs - x0, ys - y0
  cx = lambda x: min(max(x, 0), w - 1)  # noqa: E731
  y1 = y0 + 1 if 0 <= y0 + 1 <= h - 1 else y0
  y0c = min(max(y0, 0), h - 1)
  y1 = min(max(y1, 0), h - 1)
  p = arr.astype(np.float64)
  top = p[y0c, cx(x0)] + (p[y0c, cx(x0 + 1)] - p[y0c, cx(x0)]) * dx
  bot = p[y1, cx(x0)] + (p[y1, cx(x0 + 1)] - p[y1, cx(x0)]) * dx
  return np.floor(top + (bot - top) * dy)


@pytest.mark.parametrize("op,mag", [("ShearX", 0.09), ("ShearX", -0.09), ("ShearY", 0.09)])
def test_shear_about_the_top_left_corner(op, mag):
  out = np.asarray(augment.apply_op(IMG, op, mag)).astype(np.float64)
  k = math.tan(math.radians(math.degrees(math.atan(mag))))
  for y, x in [(0, 0), (10, 200), (100, 50), (223, 5), (150, 150), (200, 220)]:
    if op == "ShearX":
      xs, ys = (x + 0.5) + k * (y + 0.5), y + 0.5
    else:
      xs, ys = x + 0.5, (y + 0.5) + k * (x + 0.5)
    assert np.abs(out[y, x] - _bilinear_trunc(ARR, xs, ys)).max() <= 1, (y, x)


@pytest.mark.parametrize("angle", [9.0, -9.0])
def test_rotate_counter_clockwise_about_the_centre(angle):
  out = np.asarray(augment.apply_op(IMG, "Rotate", angle)).astype(np.float64)
  t = math.radians(angle)
  for y, x in [(112, 112), (0, 0), (50, 180), (200, 30), (112, 220)]:
    X, Y = x + 0.5 - 112, y + 0.5 - 112
    xs = math.cos(t) * X - math.sin(t) * Y + 112  # Pillow's inverse map for a CCW rotation
    ys = math.sin(t) * X + math.cos(t) * Y + 112
    assert np.abs(out[y, x] - _bilinear_trunc(ARR, xs, ys)).max() <= 1, (y, x)


def _blend(degenerate, img, factor):
  a = np.float32(factor)
  v = degenerate.astype(np.float32) + a * (img.astype(np.float32) - degenerate.astype(np.float32))
  return np.floor(np.clip(v, 0, 255)).astype(np.uint8)


def _gray(arr):
  r, g, b = (arr[..., i].astype(np.int64) for i in range(3))
  return ((19595 * r + 38470 * g + 7471 * b + 0x8000) >> 16).astype(np.uint8)


@pytest.mark.parametrize("sign", [1, -1])
def test_colour_ops_blend_with_their_degenerate_image(sign):
  mag = sign * augment.magnitude_of("Brightness", (224, 224))
  f = 1.0 + mag
  got = lambda op: np.asarray(augment.apply_op(IMG, op, mag))  # noqa: E731
  np.testing.assert_array_equal(got("Brightness"), _blend(np.zeros_like(ARR), ARR, f))
  gray = np.repeat(_gray(ARR)[..., None], 3, axis=2)
  np.testing.assert_array_equal(got("Color"), _blend(gray, ARR, f))
  hist = np.bincount(_gray(ARR).ravel(), minlength=256)
  mean = int(float((np.arange(256) * hist).sum()) / hist.sum() + 0.5)
  np.testing.assert_array_equal(got("Contrast"), _blend(np.full_like(ARR, mean), ARR, f))


def test_sharpness_blends_with_a_3x3_smooth_keeping_the_border():
  mag = augment.magnitude_of("Sharpness", (224, 224))
  out = np.asarray(augment.apply_op(IMG, "Sharpness", mag))
  k = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float64) / 13
  p = ARR.astype(np.float64)
  smooth = ARR.copy()
  inner = sum(k[i, j] * p[i : 222 + i, j : 222 + j] for i in range(3) for j in range(3))
  smooth[1:-1, 1:-1] = np.clip(np.floor(inner + 0.5), 0, 255).astype(np.uint8)
  want = _blend(smooth, ARR, 1.0 + mag)
  assert np.abs(out.astype(int) - want.astype(int)).max() <= 1  # float32 vs float64 rounding
  np.testing.assert_array_equal(out[0], _blend(ARR[0], ARR[0], 1.0 + mag))  # border unchanged


def test_posterize_solarize_autocontrast_equalize_luts():
  np.testing.assert_array_equal(np.asarray(augment.apply_op(IMG, "Posterize", 7.0)), ARR & 0xFE)
  sol = np.where(ARR >= 179, 255 - ARR, ARR)
  np.testing.assert_array_equal(np.asarray(augment.apply_op(IMG, "Solarize", 178.5)), sol)
  low = (ARR // 2 + 40).astype(np.uint8)  # occupies [40, 167]
  ac = np.asarray(augment.apply_op(Image.fromarray(low), "AutoContrast", 0.0))
  for c in range(3):
    lo, hi = low[..., c].min(), low[..., c].max()
    scale = 255.0 / (hi - lo)
    lut = np.clip([int(i * scale - lo * scale) for i in range(256)], 0, 255)
    np.testing.assert_array_equal(ac[..., c], np.asarray(lut)[low[..., c]])
  eq = np.asarray(augment.apply_op(Image.fromarray(low), "Equalize", 0.0))
  for c in range(3):
    h = np.bincount(low[..., c].ravel(), minlength=256)
    histo = h[h > 0]
    step = (histo.sum() - histo[-1]) // 255
    n, lut = step // 2, []
    for i in range(256):
      lut.append(min(n // step, 255))
      n += h[i]
    np.testing.assert_array_equal(eq[..., c], np.asarray(lut)[low[..., c]])


def test_rand_augment_applies_num_ops_ops_deterministically():
  a = np.asarray(augment.rand_augment(IMG, np.random.default_rng(5)))
  b = np.asarray(augment.rand_augment(IMG, np.random.default_rng(5)))
  np.testing.assert_array_equal(a, b)
  assert a.shape == ARR.shape and a.dtype == np.uint8
  seen = set()
  for s in range(200):
    rng = np.random.default_rng(s)
    seen |= {augment.OPS[int(rng.integers(14))] for _ in range(3)}
  assert seen == set(augment.OPS)


def _images_for_fast_path():
  rng = np.random.default_rng(1)
  out = [
    IMG,
    Image.fromarray(rng.integers(0, 256, (97, 131, 3), dtype=np.uint8)),
    Image.fromarray((rng.integers(0, 256, (224, 224, 3)) // 3 + 60).astype(np.uint8)),
    Image.new("RGB", (50, 40), (10, 200, 30)),  # constant: degenerate histograms
    Image.fromarray(np.where(rng.random((31, 17, 3)) < 0.5, 3, 250).astype(np.uint8)),
  ]
  y, x = np.mgrid[:112, :112]  # smooth gradients: values near LUT and rounding boundaries
  out.append(Image.fromarray(np.stack([x * 2, y * 2, (x + y) % 256], -1).astype(np.uint8)))
  return out


@pytest.mark.parametrize("op", augment.OPS)
def test_fast_path_is_byte_identical_to_pil_for_every_op_and_sign(op):
  for img in _images_for_fast_path():
    hw = (img.size[1], img.size[0])
    for sign in (1, -1) if op in augment.SIGNED else (1,):
      for magnitude in (9, 30, 1):
        mag = sign * augment.magnitude_of(op, hw, magnitude)
        if op == "Posterize" and not 1 <= int(mag) <= 8:
          continue
        want = np.asarray(augment.apply_op(img, op, mag))
        got = np.asarray(augment.apply_op_fast(img, op, mag))
        np.testing.assert_array_equal(got, want, err_msg=f"{op} {mag} on {img.size}")


def test_rand_augment_fast_equals_the_pil_path():
  rng = np.random.default_rng(2)
  for s in range(40):
    img = Image.fromarray(rng.integers(0, 256, (56, 48, 3), dtype=np.uint8))
    a = augment.rand_augment(img, np.random.default_rng(s))
    b = augment.rand_augment(img, np.random.default_rng(s), fast=False)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
