"""Image decoding and the reference's transforms (PIL bilinear resize, ImageNet normalisation).

Decoding never touches PIL's process-global `ImageFile.LOAD_TRUNCATED_IMAGES`: evaluation and
`preprocess` reject a truncated or damaged file with an error naming it (`load_image`), while
training decodes it exactly as the reference does with that flag set (`decode(...,
damaged="allow")`), per call, so both can run in one process and in threads.

Every PIL mode becomes the RGB image it shows: 8-bit modes through PIL's own conversion (alpha
is dropped, as the reference's `convert("RGB")` does), 16-bit grayscale keeps its high byte
(PIL's `convert("RGB")` clips it to 255: nearly white images). Modes without an unambiguous
8-bit form (float, 32-bit integer) are an error naming the file.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from salad_jax.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # VPR-methods-evaluation's read_images_paths
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

# status of a decoded training image (counted by the pipeline)
OK, DAMAGED, UNREADABLE = 0, 1, 2
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class UnreadableImage(ValueError):
  """An image file that cannot be decoded into the RGB image it shows; the message names it."""


_EIGHT_BIT = {
  "1",
  "L",
  "LA",
  "P",
  "PA",
  "RGB",
  "RGBA",
  "RGBX",
  "RGBa",
  "CMYK",
  "YCbCr",
  "LAB",
  "HSV",
}
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}
_SIXTEEN_BIT_I = {"PNG", "PPM"}  # formats whose mode "I" holds 16-bit samples (0..65535)


def as_size(size) -> tuple[int, int]:
  """An int (square) or (h, w) -> (h, w)."""
  values = (size, size) if np.ndim(size) == 0 else tuple(np.ravel(size))
  try:
    ok = len(values) == 2 and all(int(v) == v and int(v) > 0 for v in values)
  except (TypeError, ValueError, OverflowError):
    ok = False
  if not ok:
    raise UserError(
      f"image size {size!r}: height and width must be positive integers",
      "give (height, width), or one integer for a square, e.g. size=(322, 322)",
    )
  return int(values[0]), int(values[1])


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
  """The RGB image a PIL image shows, or UnreadableImage naming `name` when that is ambiguous."""
  mode = image.mode
  if mode == "RGB":
    return image
  if mode in _EIGHT_BIT:
    return image.convert("RGB")
  if mode in _SIXTEEN_BIT or (mode == "I" and image.format in _SIXTEEN_BIT_I):
    high = (np.clip(np.asarray(image), 0, 65535) >> 8).astype(np.uint8)  # as PIL does for RGB;16
    return Image.fromarray(high, "L").convert("RGB")
  kind = {"F": "32-bit float", "I": "32-bit integer"}.get(mode, "")
  raise UnreadableImage(
    f"cannot read image {name}: PIL mode {mode}{f' ({kind})' if kind else ''} "
    "has no unambiguous 8-bit RGB form; save it as 8-bit RGB (JPEG/PNG)"
  )


def _open_like_load_truncated(data: bytes) -> Image.Image:
  """A damaged JPEG decoded as PIL does with LOAD_TRUNCATED_IMAGES=True, without the global.

  With the flag, PIL's JPEG reader appends an EOI marker at a premature end of data (libjpeg then
  fills the missing blocks with grey), stops reading when the data runs out even if the decoder
  wants more (progressive JPEGs), and ignores the decoder's final error code, keeping what was
  decoded. Here the marker is appended to the bytes, so the decoder sees the same stream; where
  PIL would raise instead of stopping, the image holds the same pixels and only PIL's pending
  work list (`tile`) is left: clearing it is what the flag's `break` does. The tests compare the
  result with PIL's own, flag set, in another process.
  """
  im = Image.open(io.BytesIO(data + b"\xff\xd9"))
  try:
    im.load()
  except OSError:
    im.tile = []  # keep what was decoded, as the flag does (nothing decoded: load raises)
    im.load()
  return im


def decode(data: bytes, name: str, damaged: str = "error") -> tuple[Image.Image, int]:
  """Encoded image bytes -> (RGB image, OK or DAMAGED).

  damaged="error": a truncated or damaged file raises UnreadableImage naming `name`.
  damaged="allow": a damaged JPEG decodes as the reference decodes it (PIL's
  LOAD_TRUNCATED_IMAGES), status DAMAGED; other damaged formats still raise.
  """
  try:
    im = Image.open(io.BytesIO(data))
  except DECODE_ERRORS as e:
    raise UnreadableImage(f"cannot read image {name}: {e}") from e
  status = OK
  try:
    im.load()
  except DECODE_ERRORS as e:
    if damaged != "allow" or im.format != "JPEG":
      raise UnreadableImage(f"cannot read image {name}: {e}") from e
    try:
      im, status = _open_like_load_truncated(data), DAMAGED
    except DECODE_ERRORS as e2:
      raise UnreadableImage(f"cannot read image {name}: {e2}") from e2
  return to_rgb(im, name), status


def read_file(path: str) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read()
  except FileNotFoundError:
    raise FileNotFoundError(f"image not found: {path}") from None
  except IsADirectoryError:
    raise IsADirectoryError(f"expected an image file, found a directory: {path}") from None


def load_image(path: str) -> Image.Image:
  """Opens an image file as RGB; a missing, truncated, damaged or ambiguous file is an error
  naming it (evaluation and `preprocess`)."""
  return decode(read_file(path), path)[0]


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


def available_memory() -> int | None:
  """Bytes of memory available to a new allocation (Linux MemAvailable, else physical), or None."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return None


def check_batch_memory(image_size, batch_size: int, flag: str = "--image_size") -> None:
  """A batch of images (float32, as the model takes it) that alone would not fit in memory is an
  error before loading anything (at 322x322 a batch of 32 is 40 MB)."""
  h, w = image_size
  need = batch_size * h * w * 3 * 4
  have = available_memory()
  if have is not None and need > have:
    raise UserError(
      f"{flag} {h} {w} with --batch_size {batch_size}: one batch of images is "
      f"{need / 2**30:.1f} GiB, more than the {have / 2**30:.1f} GiB of memory "
      "available here",
      "the paper evaluates at 322 322; use a smaller --image_size (or --batch_size)",
    )
