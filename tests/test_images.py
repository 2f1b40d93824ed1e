"""Image decoding: every PIL mode to the RGB it shows, and damaged JPEGs without PIL's global flag."""

import io
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image, ImageFile

import salad_jax.data.pipeline  # noqa: F401 - it used to set PIL's global LOAD_TRUNCATED_IMAGES
from salad_jax.data import images

RNG = np.random.default_rng(0)
G16 = RNG.integers(0, 65536, (6, 5)).astype(np.uint16)
RGB8 = RNG.integers(0, 256, (6, 5, 3), dtype=np.uint8)


def _save(tmp_path, name, im, fmt, **kw):
  path = str(tmp_path / name)
  im.save(path, fmt, **kw)
  return path


def _ppm16(tmp_path):
  path = str(tmp_path / "g16.pgm")
  with open(path, "wb") as f:
    f.write(b"P5 5 6 65535\n" + G16.astype(">u2").tobytes())
  return path


# (file name, writer, expected RGB or an error pattern)
GRAY16 = np.repeat((G16 >> 8).astype(np.uint8)[..., None], 3, axis=2)
CASES = {
  "png 16-bit gray (I;16)": (lambda t: _save(t, "g16.png", Image.fromarray(G16), "PNG"), GRAY16),
  "tiff 16-bit gray (I;16)": (lambda t: _save(t, "g16.tif", Image.fromarray(G16), "TIFF"), GRAY16),
  "pgm 16-bit gray (I)": (_ppm16, GRAY16),
  "png RGB": (lambda t: _save(t, "rgb.png", Image.fromarray(RGB8), "PNG"), RGB8),
  "png L": (
    lambda t: _save(t, "l.png", Image.fromarray(RGB8[..., 0]), "PNG"),
    np.repeat(RGB8[..., :1], 3, axis=2),
  ),
  "png 1-bit": (
    lambda t: _save(t, "b.png", Image.fromarray(RGB8[..., 0] > 127), "PNG"),
    np.repeat(np.where(RGB8[..., :1] > 127, 255, 0).astype(np.uint8), 3, axis=2),
  ),
  "png RGBA (alpha dropped)": (
    lambda t: _save(
      t, "rgba.png", Image.fromarray(np.concatenate([RGB8, RGB8[..., :1]], axis=2)), "PNG"
    ),
    RGB8,
  ),
  "png LA": (
    lambda t: _save(
      t, "la.png", Image.fromarray(np.stack([RGB8[..., 0], RGB8[..., 1]], axis=2), "LA"), "PNG"
    ),
    np.repeat(RGB8[..., :1], 3, axis=2),
  ),
  "png P": (
    lambda t: _save(t, "p.png", Image.fromarray(RGB8).quantize(256), "PNG"),
    np.asarray(Image.fromarray(RGB8).quantize(256).convert("RGB")),
  ),
  "tiff 32-bit float (F)": (
    lambda t: _save(t, "f.tif", Image.fromarray(G16.astype(np.float32) / 65535), "TIFF"),
    r"f\.tif.*mode F \(32-bit float\)",
  ),
  "tiff 32-bit int (I)": (
    lambda t: _save(t, "i.tif", Image.fromarray(G16.astype(np.int32)), "TIFF"),
    r"i\.tif.*mode I \(32-bit integer\)",
  ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_mode_decodes_to_the_rgb_it_shows_or_names_the_file(case, tmp_path):
  write, want = CASES[case]
  path = write(tmp_path)
  if isinstance(want, str):
    with pytest.raises(images.UnreadableImage, match=want):
      images.load_image(path)
    return
  got = np.asarray(images.load_image(path))
  assert got.dtype == np.uint8 and got.shape == want.shape
  np.testing.assert_array_equal(got, want)


def test_cmyk_and_lab_use_pils_colour_conversion():
  for mode, value in (
    ("CMYK", (0, 255, 255, 0)),
    ("LAB", (136, 208, 195)),
    ("YCbCr", (76, 85, 255)),
  ):
    im = Image.new(mode, (2, 2), value)
    assert images.to_rgb(im).getpixel((0, 0)) == im.convert("RGB").getpixel((0, 0))
  assert images.to_rgb(Image.new("LAB", (1, 1), (136, 208, 195))).getpixel((0, 0))[0] > 200  # red


def _jpeg(w, h, seed, **kw):
  rng = np.random.default_rng(seed)
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", **kw)
  return buf.getvalue()


def _damaged_jpegs():
  out = {}
  for name, data in (
    ("baseline", _jpeg(120, 90, 0, quality=90)),
    ("large", _jpeg(400, 300, 1, quality=95)),  # > one 64 KiB read block
    ("progressive", _jpeg(160, 120, 2, progressive=True)),
  ):
    for frac in (0.3, 0.8, 0.999):
      out[f"{name} cut at {frac}"] = data[: int(len(data) * frac)]
    broken = bytearray(data)
    mid = len(broken) // 2
    broken[mid : mid + 200] = np.random.default_rng(3).integers(0, 256, 200, np.uint8).tobytes()
    out[f"{name} with broken data"] = bytes(broken)
  return out


DAMAGED = _damaged_jpegs()


@pytest.fixture(scope="module")
def flag_on_decodes(tmp_path_factory):
  """What PIL decodes with LOAD_TRUNCATED_IMAGES=True, computed in another process."""
  d = tmp_path_factory.mktemp("damaged")
  for i, data in enumerate(DAMAGED.values()):
    (d / f"{i}.jpg").write_bytes(data)
  code = (
    "import sys, numpy as np\nfrom PIL import Image, ImageFile\n"
    "ImageFile.LOAD_TRUNCATED_IMAGES = True\n"
    "for p in sys.argv[1:]:\n"
    "  np.save(p + '.npy', np.asarray(Image.open(p).convert('RGB')))\n"
  )
  paths = [str(d / f"{i}.jpg") for i in range(len(DAMAGED))]
  subprocess.run([sys.executable, "-c", code, *paths], check=True)
  return {name: np.load(p + ".npy") for name, p in zip(DAMAGED, paths)}


def test_damaged_jpegs_decode_exactly_as_with_load_truncated_images(flag_on_decodes):
  for name, data in DAMAGED.items():
    im, status = images.decode(data, name, damaged="allow")
    assert status == images.DAMAGED, name
    np.testing.assert_array_equal(np.asarray(im), flag_on_decodes[name], err_msg=name)


def test_evaluation_and_preprocess_reject_a_truncated_jpeg_naming_it(tmp_path):
  import salad_jax

  path = str(tmp_path / "cut.jpg")
  with open(path, "wb") as f:
    f.write(DAMAGED["baseline cut at 0.8"])
  assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # no salad_jax module sets the global
  with pytest.raises(images.UnreadableImage, match="cut.jpg.*truncated"):
    images.load_image(path)
  with pytest.raises(ValueError, match="cut.jpg"):
    salad_jax.preprocess(path, (28, 28))
  ok = str(tmp_path / "ok.jpg")
  Image.fromarray(RGB8).save(ok)
  assert images.decode(open(ok, "rb").read(), ok, damaged="allow")[1] == images.OK


def test_strict_and_lenient_decoding_run_side_by_side_in_threads():
  """Training (lenient) and evaluation (strict) share a process and run in threads: a
  process-wide toggle would let the strict reader accept damaged files at random."""
  data, want = DAMAGED["large cut at 0.8"], None
  strict_ok, lenient = [], []

  def strict():
    for _ in range(15):
      try:
        images.decode(data, "x")
        strict_ok.append(1)
      except images.UnreadableImage:
        pass

  def allow():
    for _ in range(15):
      lenient.append(np.asarray(images.decode(data, "x", damaged="allow")[0]))

  threads = [threading.Thread(target=f) for f in (strict, allow, strict, allow)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not strict_ok
  want = lenient[0]
  assert len(lenient) == 30 and all(np.array_equal(x, want) for x in lenient)


def test_non_jpeg_damage_and_missing_files_are_errors_naming_the_file(tmp_path):
  buf = io.BytesIO()
  Image.fromarray(RGB8).save(buf, "PNG")
  with pytest.raises(images.UnreadableImage, match="cut.png"):
    images.decode(buf.getvalue()[:-30], "cut.png", damaged="allow")
  with pytest.raises(FileNotFoundError, match="nope.jpg"):
    images.load_image(str(tmp_path / "nope.jpg"))
  os.makedirs(tmp_path / "dir.jpg")
  with pytest.raises(IsADirectoryError, match="dir.jpg"):
    images.load_image(str(tmp_path / "dir.jpg"))
