"""RandAugment with torchvision 0.16 semantics on PIL images, written without torchvision.

`T.RandAugment(num_ops=3, magnitude=9, num_magnitude_bins=31, interpolation=BILINEAR, fill=None)`
as the SALAD recipe uses it on 224x224 images: `num_ops` ops drawn uniformly with replacement from
14, each applied at the fixed magnitude index with a random sign for signed ops. torchvision's PIL
backend is a thin layer over Pillow; the same Pillow calls are made here, with the same arguments
(affine matrices, black fill, bilinear sampling). The random stream is numpy's, not torch's.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

OPS = (
  "Identity",
  "ShearX",
  "ShearY",
  "TranslateX",
  "TranslateY",
  "Rotate",
  "Brightness",
  "Color",
  "Contrast",
  "Sharpness",
  "Posterize",
  "Solarize",
  "AutoContrast",
  "Equalize",
)
SIGNED = {
  "ShearX",
  "ShearY",
  "TranslateX",
  "TranslateY",
  "Rotate",
  "Brightness",
  "Color",
  "Contrast",
  "Sharpness",
}
FILL = (0, 0, 0)


def _linspace_f32(start: float, end: float, steps: int, i: int) -> float:
  """torch.linspace(start, end, steps)[i] computed in float32 as the ATen CPU kernel does."""
  f = np.float32
  step = (f(end) - f(start)) / f(steps - 1)
  if i < steps // 2:
    return float(f(start) + step * f(i))
  return float(f(end) - step * f(steps - 1 - i))


def magnitude_of(
  op: str, image_hw: tuple[int, int], magnitude: int = 9, num_bins: int = 31
) -> float:
  """Unsigned magnitude of `op` at bin `magnitude` (torchvision `_augmentation_space`)."""
  h, w = image_hw
  if op in ("Identity", "AutoContrast", "Equalize"):
    return 0.0
  if op in ("ShearX", "ShearY"):
    return _linspace_f32(0.0, 0.3, num_bins, magnitude)
  if op == "TranslateX":
    return _linspace_f32(0.0, 150.0 / 331.0 * w, num_bins, magnitude)
  if op == "TranslateY":
    return _linspace_f32(0.0, 150.0 / 331.0 * h, num_bins, magnitude)
  if op == "Rotate":
    return _linspace_f32(0.0, 30.0, num_bins, magnitude)
  if op in ("Brightness", "Color", "Contrast", "Sharpness"):
    return _linspace_f32(0.0, 0.9, num_bins, magnitude)
  if op == "Posterize":  # 8 - (arange(bins) / ((bins - 1) / 4)).round()
    return float(8 - int(np.round(np.float32(magnitude) / np.float32((num_bins - 1) / 4.0))))
  if op == "Solarize":
    return _linspace_f32(255.0, 0.0, num_bins, magnitude)
  raise ValueError(f"unknown RandAugment op {op!r}")


def inverse_affine_matrix(center, angle, translate, scale, shear) -> list[float]:
  """torchvision `_get_inverse_affine_matrix` (degrees), the output->input map Pillow expects."""
  rot = math.radians(angle)
  sx, sy = math.radians(shear[0]), math.radians(shear[1])
  cx, cy = center
  tx, ty = translate
  a = math.cos(rot - sy) / math.cos(sy)
  b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
  c = math.sin(rot - sy) / math.cos(sy)
  d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
  m = [d, -b, 0.0, -c, a, 0.0]
  m = [x / scale for x in m]
  m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty)
  m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty)
  m[2] += cx
  m[5] += cy
  return m


def _affine(img: Image.Image, center, translate=(0, 0), shear=(0.0, 0.0)) -> Image.Image:
  matrix = inverse_affine_matrix(center, 0.0, translate, 1.0, shear)
  return img.transform(img.size, Image.AFFINE, matrix, Image.BILINEAR, fillcolor=FILL)


def apply_op(img: Image.Image, op: str, mag: float) -> Image.Image:
  """One RandAugment op on an RGB PIL image with a signed magnitude (torchvision `_apply_op`)."""
  w, h = img.size
  if op == "Identity":
    return img
  if op == "ShearX":
    return _affine(img, (0, 0), shear=(math.degrees(math.atan(mag)), 0.0))
  if op == "ShearY":
    return _affine(img, (0, 0), shear=(0.0, math.degrees(math.atan(mag))))
  if op == "TranslateX":
    return _affine(img, (w * 0.5, h * 0.5), translate=(int(mag), 0))
  if op == "TranslateY":
    return _affine(img, (w * 0.5, h * 0.5), translate=(0, int(mag)))
  if op == "Rotate":
    return img.rotate(mag, Image.BILINEAR, expand=False, center=None, fillcolor=FILL)
  if op == "Brightness":
    return ImageEnhance.Brightness(img).enhance(1.0 + mag)
  if op == "Color":
    return ImageEnhance.Color(img).enhance(1.0 + mag)
  if op == "Contrast":
    return ImageEnhance.Contrast(img).enhance(1.0 + mag)
  if op == "Sharpness":
    return ImageEnhance.Sharpness(img).enhance(1.0 + mag)
  if op == "Posterize":
    return ImageOps.posterize(img, int(mag))
  if op == "Solarize":
    return ImageOps.solarize(img, mag)
  if op == "AutoContrast":
    return ImageOps.autocontrast(img)
  if op == "Equalize":
    return ImageOps.equalize(img)
  raise ValueError(f"unknown RandAugment op {op!r}")


# ------------------------------------------------------------------------------ the fast path
# Each fast op returns the same bytes as `apply_op` (tests/test_augment.py compares them on random
# images for every op and sign). Measured on 224x224 (process CPU time, loaded 2-core machine):
# Translate 0.98 ms -> crop+paste (an integer shift: PIL's bilinear samples exact pixel centres);
# the LUT ops (Brightness, Contrast, Posterize, Solarize, AutoContrast, Equalize) skip PIL's
# Python-side table building (cached or built with numpy) and blend a 256-value gradient instead
# of the whole image, so PIL's own C arithmetic makes the table; Color and Sharpness call the
# same PIL functions without ImageEnhance's wrapper. Shear and Rotate stay PIL's affine transform:
# an exact numpy port of its per-pixel bilinear sampling measured 5x slower (5.0 vs 1.1 ms).
_GRADIENT = Image.fromarray(np.arange(256, dtype=np.uint8)[None, :], "L")
_LUT_CACHE: dict = {}


def _blend_lut(degenerate: int, factor: float) -> list[int]:
  """Image.blend(constant `degenerate`, v, factor) for every byte value v, by PIL itself."""
  key = ("blend", degenerate, factor)
  lut = _LUT_CACHE.get(key)
  if lut is None:
    flat = Image.blend(Image.new("L", (256, 1), degenerate), _GRADIENT, factor)
    lut = _LUT_CACHE[key] = np.asarray(flat)[0].tolist() * 3
  return lut


def _posterize_lut(bits: int) -> list[int]:
  key = ("posterize", bits)
  if key not in _LUT_CACHE:
    if not 1 <= bits <= 8:
      raise ValueError("bits must be between or equal to 1 and 8")
    mask = ~(2 ** (8 - bits) - 1)
    _LUT_CACHE[key] = [i & mask for i in range(256)] * 3
  return _LUT_CACHE[key]


def _solarize_lut(threshold: float) -> list[int]:
  key = ("solarize", threshold)
  if key not in _LUT_CACHE:
    _LUT_CACHE[key] = [i if i < threshold else 255 - i for i in range(256)] * 3
  return _LUT_CACHE[key]


_RAMP = np.arange(256)


def _autocontrast_lut(hist: np.ndarray) -> list[int]:
  """ImageOps.autocontrast's table (cutoff 0, no ignore), band by band."""
  lut = []
  for h in hist.reshape(-1, 256):
    nz = np.flatnonzero(h)
    lo, hi = (int(nz[0]), int(nz[-1])) if len(nz) else (255, 0)  # PIL's loops end at 255 and 0
    if hi <= lo:
      lut.append(_RAMP)
      continue
    scale = 255.0 / (hi - lo)
    offset = -lo * scale
    lut.append(np.clip((_RAMP * scale + offset).astype(np.int64), 0, 255))  # int() truncates
  return np.concatenate(lut).tolist()


def _equalize_lut(hist: np.ndarray) -> list[int]:
  """ImageOps.equalize's table, band by band."""
  lut = []
  for h in hist.reshape(-1, 256):
    nz = h[h > 0]
    step = (int(nz.sum()) - int(nz[-1])) // 255 if len(nz) > 1 else 0
    if not step:
      lut.append(_RAMP)
      continue
    n = step // 2 + np.concatenate([[0], np.cumsum(h[:-1])])
    lut.append(n // step)
  return np.concatenate(lut).tolist()


def _translate(img: Image.Image, tx: int, ty: int) -> Image.Image:
  """Output pixel (x, y) = input (x - tx, y - ty), black outside: the affine transform's result
  for an integer shift (every sample falls on a pixel centre)."""
  w, h = img.size
  out = Image.new(img.mode, (w, h))
  box = (max(0, -tx), max(0, -ty), min(w, w - tx), min(h, h - ty))
  if box[0] < box[2] and box[1] < box[3]:
    out.paste(img.crop(box), (max(0, tx), max(0, ty)))
  return out


def apply_op_fast(img: Image.Image, op: str, mag: float) -> Image.Image:
  """`apply_op`, byte for byte, with less work per op (RGB images; others take `apply_op`)."""
  if img.mode != "RGB":
    return apply_op(img, op, mag)
  if op == "Identity":
    return img
  if op == "TranslateX":
    return _translate(img, int(mag), 0)
  if op == "TranslateY":
    return _translate(img, 0, int(mag))
  if op == "Brightness":
    return img.point(_blend_lut(0, 1.0 + mag))
  if op == "Contrast":
    hist = np.asarray(img.convert("L").histogram(), np.int64)
    mean = int(int(hist @ _RAMP) / int(hist.sum()) + 0.5)  # ImageStat: integer sum / count
    return img.point(_blend_lut(mean, 1.0 + mag))
  if op == "Color":
    return Image.blend(img.convert("L").convert("RGB"), img, 1.0 + mag)
  if op == "Sharpness":
    return Image.blend(img.filter(ImageFilter.SMOOTH), img, 1.0 + mag)
  if op == "Posterize":
    return img.point(_posterize_lut(int(mag)))
  if op == "Solarize":
    return img.point(_solarize_lut(mag))
  if op == "AutoContrast":
    return img.point(_autocontrast_lut(np.asarray(img.histogram(), np.int64)))
  if op == "Equalize":
    return img.point(_equalize_lut(np.asarray(img.histogram(), np.int64)))
  return apply_op(img, op, mag)  # ShearX, ShearY, Rotate: PIL's affine transform


def rand_augment(
  img: Image.Image,
  rng: np.random.Generator,
  num_ops: int = 3,
  magnitude: int = 9,
  num_bins: int = 31,
  fast: bool = True,
) -> Image.Image:
  """RandAugment: `num_ops` ops, uniform with replacement; a signed op is negated on a coin flip.

  fast=True uses `apply_op_fast` (same bytes, less time); fast=False the PIL reference ops.
  """
  op_fn = apply_op_fast if fast else apply_op
  hw = (img.size[1], img.size[0])
  for _ in range(num_ops):
    op = OPS[int(rng.integers(len(OPS)))]
    mag = magnitude_of(op, hw, magnitude, num_bins)
    if op in SIGNED and rng.integers(2):
      mag = -mag
    img = op_fn(img, op, mag)
  return img
