"""Image decoding and the reference's transforms (PIL bilinear resize, ImageNet normalisation)."""

from __future__ import annotations

import numpy as np
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def as_size(size) -> tuple[int, int]:
  """An int (square) or (h, w) -> (h, w)."""
  if isinstance(size, int):
    return size, size
  h, w = size
  return int(h), int(w)


def load_image(path: str) -> Image.Image:
  """Opens an image file as RGB, with errors that name the file."""
  try:
    with Image.open(path) as im:
      return im.convert("RGB")
  except FileNotFoundError:
    raise FileNotFoundError(f"image not found: {path}") from None
  except (OSError, Image.UnidentifiedImageError, SyntaxError, ValueError) as e:
    raise ValueError(f"cannot read image {path}: {e}") from e


def resize(image: Image.Image, size) -> Image.Image:
  """torchvision Resize((h, w), BILINEAR) on a PIL image: PIL's antialiased bilinear."""
  h, w = as_size(size)
  if image.size == (w, h):
    return image
  return image.resize((w, h), Image.BILINEAR)


def normalize(image) -> np.ndarray:
  """uint8 HWC RGB -> float32 HWC: ToTensor (/255) then Normalize(ImageNet mean, std)."""
  x = np.asarray(image, dtype=np.float32) / np.float32(255.0)
  return (x - IMAGENET_MEAN) / IMAGENET_STD
