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
from PIL import Image, ImageEnhance, ImageOps

OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
       "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
SIGNED = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
          "Contrast", "Sharpness"}
FILL = (0, 0, 0)


def _linspace_f32(start: float, end: float, steps: int, i: int) -> float:
  """torch.linspace(start, end, steps)[i] computed in float32 as the ATen CPU kernel does."""
  f = np.float32
  step = (f(end) - f(start)) / f(steps - 1)
  if i < steps // 2:
    return float(f(start) + step * f(i))
  return float(f(end) - step * f(steps - 1 - i))


def magnitude_of(op: str, image_hw: tuple[int, int], magnitude: int = 9, num_bins: int = 31) -> float:
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


def rand_augment(img: Image.Image, rng: np.random.Generator, num_ops: int = 3, magnitude: int = 9,
                 num_bins: int = 31) -> Image.Image:
  """RandAugment: `num_ops` ops, uniform with replacement; a signed op is negated on a coin flip."""
  hw = (img.size[1], img.size[0])
  for _ in range(num_ops):
    op = OPS[int(rng.integers(len(OPS)))]
    mag = magnitude_of(op, hw, magnitude, num_bins)
    if op in SIGNED and rng.integers(2):
      mag = -mag
    img = apply_op(img, op, mag)
  return img
