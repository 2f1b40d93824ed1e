"""The public inference API: preprocess, describe/features, bf16, and clear errors on bad input."""

import numpy as np
import pytest
from PIL import Image

import salad_jax

from helpers import images as random_images
from helpers import torch_describe, twin


def images(n=2, hw=(224, 224), seed=0):
  """Random images within the value range of ImageNet-normalised ones (what describe accepts)."""
  return np.clip(random_images(n, hw, seed), -2.1, 2.6)


@pytest.fixture(scope="module")
def s14():
  tm, params, config = twin("S/14", seed=4)
  return tm, salad_jax.SaladModel(params, config)


def test_preprocess_is_pil_bilinear_resize_then_imagenet_normalisation(tmp_path):
  rng = np.random.default_rng(0)
  arr = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
  path = tmp_path / "img.jpg"
  Image.fromarray(arr).save(path, quality=95)
  decoded = Image.open(path).convert("RGB")
  want = np.asarray(decoded.resize((322, 322), Image.BILINEAR), np.float32) / 255.0
  want = (want - [0.485, 0.456, 0.406]) / np.array([0.229, 0.224, 0.225])
  got = salad_jax.preprocess(str(path), size=(322, 322))
  assert got.shape == (322, 322, 3) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-6)
  np.testing.assert_allclose(salad_jax.preprocess(decoded, 322), got)
  batch = salad_jax.preprocess([path, path], size=(224, 322))
  assert batch.shape == (2, 224, 322, 3)
  assert salad_jax.preprocess(arr, size=None).shape == (300, 400, 3)


def test_preprocess_of_a_16_bit_pil_image_keeps_its_grey_levels():
  """A 16-bit greyscale PIL image shows its high byte, as a file does (not clipped to white)."""
  ramp = (np.arange(56 * 56, dtype=np.uint32).reshape(56, 56) * 20).astype(np.uint16)
  x = salad_jax.preprocess(Image.fromarray(ramp), size=None)
  want = salad_jax.preprocess(
    np.repeat((ramp >> 8).astype(np.uint8)[..., None], 3, axis=2), size=None
  )
  np.testing.assert_array_equal(x, want)


def test_preprocess_errors_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.jpg"):
    salad_jax.preprocess(str(tmp_path / "missing.jpg"))
  bad = tmp_path / "corrupt.jpg"
  bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
  with pytest.raises(ValueError, match="corrupt.jpg"):
    salad_jax.preprocess(str(bad))


def test_describe_any_batch_size_unit_norm_and_matches_torch(s14):
  tm, model = s14
  for n in (1, 3, 5):
    x = images(n, (224, 224), seed=n)
    d = model.describe(x)
    assert d.shape == (n, 8448) and d.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-6)
    assert np.abs(d - torch_describe(tm, x)).max() <= 1e-6
  # the token block is unit-norm inside: norm 1/sqrt(65) of the total
  np.testing.assert_allclose(np.linalg.norm(d[:, :256], axis=1), 65**-0.5, atol=1e-6)


def test_one_image_in_one_descriptor_out(tmp_path, s14):
  """preprocess(path) -> [H, W, 3] -> describe -> [D]: what numpy users expect of one image; a
  list of paths -> [N, H, W, 3] -> [N, D]; the same numbers as in a batch."""
  _, model = s14
  rng = np.random.default_rng(3)
  files = []
  for i, size in enumerate([(300, 200), (180, 240)]):
    files.append(tmp_path / f"{i}.jpg")
    Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(files[-1])
  one = salad_jax.preprocess(files[0], size=(224, 224))
  batch = salad_jax.preprocess(files, size=(224, 224))
  assert one.shape == (224, 224, 3) and batch.shape == (2, 224, 224, 3)
  d1, dn = model.describe(one), model.describe(batch)
  assert d1.shape == (8448,) and dn.shape == (2, 8448)
  np.testing.assert_allclose(d1, dn[0], atol=1e-6)
  f, t = model.features(one)
  assert f.shape == (16, 16, 384) and t.shape == (384,)


def test_describe_folder_method_and_public_index(tmp_path, tiny_model_dir):
  """model.describe_folder -> salad_jax.Index -> search finds every image by its own
  descriptor; a query made with preprocess + describe of one image finds its file."""
  rng = np.random.default_rng(1)
  for i in range(3):
    Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
  model = salad_jax.load(tiny_model_dir)
  desc, paths = model.describe_folder(tmp_path, image_size=(56, 56), batch_size=2, progress=False)
  assert desc.shape == (3, model.descriptor_dim) and [p[-5:] for p in paths] == [
    "0.png",
    "1.png",
    "2.png",
  ]
  index = salad_jax.Index(desc, paths)
  q = model.describe(salad_jax.preprocess(paths[1], size=(56, 56)))
  found, dist = index.search(q, k=2)
  assert found[0] == paths[1] and dist.shape == (2,) and dist[0] < 1e-8
  assert "Index" in salad_jax.__all__ and "fit_pca" in salad_jax.__all__


def test_compiled_once_per_shape(s14):
  _, model = s14
  before = model._describe._cache_size()
  for _ in range(3):
    model.describe(images(2, (252, 252)))
  assert model._describe._cache_size() == before + 1


def test_bf16_compute_close_to_fp32(s14):
  _, model = s14
  bf16 = salad_jax.SaladModel(model.params, model.config.replace(dtype="bfloat16"))
  x = images(3, (322, 322), seed=9)
  a, b = model.describe(x), bf16.describe(x)
  cos = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
  assert cos.min() >= 0.999, cos


@pytest.mark.parametrize(
  "shape,match",
  [
    ((1, 320, 320, 3), r"image 320x320: height and width must be multiples of 14 \(try 322x322\)"),
    ((1, 224, 230, 3), r"multiples of 14 \(try 224x224\)"),
    ((224, 224), r"one image \[H, W, 3\] or a batch \[B, H, W, 3\]"),
    ((1, 1, 224, 224, 3), r"one image \[H, W, 3\] or a batch"),
    ((224, 230, 3), r"multiples of 14"),  # one image: checked as a batch of one
    ((1, 3, 224, 224), r"3 channels last"),
    ((1, 224, 224, 1), r"3 channels last"),
    ((1, 112, 112, 3), r"gives 64 patches.*64 clusters.*126x126"),
    ((1, 98, 98, 3), r"gives 49 patches"),
    ((0, 224, 224, 3), r"empty batch"),
  ],
)
def test_bad_image_shapes_are_clear_value_errors(s14, shape, match):
  _, model = s14
  with pytest.raises(ValueError, match=match):
    model.describe(np.zeros(shape, np.float32))


def test_features_allow_small_images_but_describe_does_not(s14):
  _, model = s14
  f, t = model.features(np.zeros((1, 112, 112, 3), np.float32))
  assert f.shape == (1, 8, 8, 384) and t.shape == (1, 384)


def test_nan_input_is_an_error_not_a_silent_nan(s14):
  _, model = s14
  x = images(2, (224, 224))
  x[1, 5, 5, 0] = np.nan
  with pytest.raises(ValueError, match="NaN or Inf"):
    model.describe(x)


@pytest.mark.parametrize(
  "images, size, words",
  [
    ([], (56, 56), "empty list of images"),  # was numpy's "need at least one array to stack"
    (np.zeros((20, 20, 3), np.uint8), (112.5, 112), r"image size \(112.5, 112\)"),  # was 112x112
    ([np.zeros((20, 20, 3), np.uint8)], (0, 28), "positive integers"),
  ],
)
def test_preprocess_refuses_empty_lists_and_sizes_that_are_not_positive_integers(
  images, size, words
):
  with pytest.raises(salad_jax.errors.UserError, match=words):
    salad_jax.preprocess(images, size=size)
