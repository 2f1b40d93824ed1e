"""Retrieval outputs: the paths --save_descriptors writes beside its rows, and pair pictures that
explain a match (similarity, each cluster's share of it, the top clusters coloured)."""

import os

import numpy as np
import pytest
from PIL import Image

import salad_jax
from salad_jax import visualize
from salad_jax.data import eval_sets
from salad_jax.errors import UserError
from salad_jax.evaluation.evaluate import evaluate_checkpoint


def _png(path, rng, size=(42, 56)):
  Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
  return salad_jax.load(tiny_model_dir)


# ------------------------------------------------------------------------------ --save_descriptors
def test_save_descriptors_writes_the_paths_of_its_rows(tiny_model_dir, model, tmp_path):
  rng = np.random.default_rng(0)
  for sub, n in (("database", 4), ("queries", 2)):
    os.makedirs(tmp_path / sub)
    for i in range(n):  # UTM names; one with a space and a non-ASCII letter
      _png(tmp_path / sub / f"@{100 * i}@0@{sub[0]}{i} é@.png", rng)
  s = eval_sets.folder_set(str(tmp_path / "database"), str(tmp_path / "queries"))
  out = tmp_path / "out"
  evaluate_checkpoint(
    tiny_model_dir, [s], str(out), image_size=(56, 56), num_workers=0, save_descriptors=True
  )
  for name, files in (("database", s.database_paths), ("queries", s.query_paths)):
    listed = (out / f"{name}_paths.txt").read_text("utf-8").splitlines()
    assert listed == list(files) and len(listed) == (4 if name == "database" else 2)
    rows = np.load(out / f"{name}_descriptors.npy")
    # row i is the descriptor of the image on line i
    want = model.describe(salad_jax.preprocess(listed, size=(56, 56)))
    np.testing.assert_allclose(rows, want, atol=1e-5)
  # written the same way as the descriptors: claimed, so a file of yours there is refused
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "queries_paths.txt").write_text("my list")
  with pytest.raises(UserError, match="queries_paths.txt exists and was not written by"):
    evaluate_checkpoint(
      tiny_model_dir, [s], str(mine), image_size=(56, 56), num_workers=0, save_descriptors=True
    )
  assert (mine / "queries_paths.txt").read_text() == "my list"
