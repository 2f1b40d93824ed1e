"""Retrieval outputs: the paths --save_descriptors writes beside its rows, and pair pictures that
explain a match (similarity, each cluster's share of it, the top clusters coloured)."""

import json
import os

import numpy as np
import pytest
from PIL import Image

import salad_jax
from salad_jax import drawing, explain, visualize
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


# ------------------------------------------------------------------------------ pair pictures
@pytest.fixture(scope="module")
def pair(tmp_path_factory, model):
  d = tmp_path_factory.mktemp("pair")
  rng = np.random.default_rng(7)
  base = rng.integers(0, 256, (60, 80, 3))
  files = [d / "query_0001.jpg", d / "db_0042.png"]
  for i, f in enumerate(files):  # the same scene, the second one noisier
    noise = rng.integers(-30 * (i + 1), 30 * (i + 1), base.shape)
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(f)
  x = [salad_jax.preprocess(f, size=(56, 56)) for f in files]
  return files, [model.describe(xi) for xi in x], [model.assignment(xi) for xi in x]


def test_pair_parts_add_up_to_the_similarity_and_follow_the_layout(model, pair):
  _, (da, db), _ = pair
  c = model.config
  m, g, l = c.num_clusters, c.token_dim, c.cluster_dim
  ex = explain.explain(da, db, m, g)
  sim = float(np.dot(da.astype(np.float64), db.astype(np.float64)))  # unit descriptors: cosine
  assert abs(ex.similarity - sim) < 1e-12 and 0 < sim < 1
  assert ex.clusters.shape == (m,)
  assert abs(ex.token + ex.clusters.sum() - sim) < 1e-6
  # numpy from the layout: token dims first, then V [l, m] channel-major
  v = (da[g:].astype(np.float64) * db[g:]).reshape(l, m).sum(axis=0)
  np.testing.assert_allclose(ex.clusters, v, atol=1e-12)
  # an image with itself: every part is 1 / (m + 1) (each block unit-norm inside, / sqrt(m+1));
  # grouping the dims cluster-major instead would not give equal parts
  self_ex = explain.explain(da, da, m, g)
  np.testing.assert_allclose(self_ex.clusters, 1 / (m + 1), atol=1e-6)
  assert abs(self_ex.token - 1 / (m + 1)) < 1e-6
  wrong = (da[g:].astype(np.float64) ** 2).reshape(m, l).sum(axis=1)
  assert np.abs(wrong - 1 / (m + 1)).max() > 1e-3
  # the coloured clusters: the fewest reaching half of the positive parts, fewer than all
  order = list(np.argsort(-ex.clusters))
  assert list(ex.top) == order[: len(ex.top)] and 0 < len(ex.top) < m
  positive = ex.clusters[ex.clusters > 0].sum()
  assert ex.top_part >= 0.5 * positive - 1e-12
  assert ex.top_part - ex.clusters[ex.top[-1]] < 0.5 * positive  # one fewer would not reach it
  assert explain.explain(da, db, m, g, top_k=2).top == tuple(order[:2])


def test_pair_picture_file_names_greyed_patches_and_written_files(model, pair, tmp_path):
  files, (da, db), (aa, ab) = pair
  c = model.config
  ex = explain.explain(da, db, c.num_clusters, c.token_dim)
  ims = [visualize.resize(visualize.load_image(str(f)), (56, 56)) for f in files]
  rows = explain.pair_panels(ims[0], aa, ims[1], ab, ex, ("query_0001.jpg", "db_0042.png"))
  titles = [t for row in rows for t, _ in row]
  assert titles[0].startswith("A: query_0001.jpg") and titles[1].startswith("B: db_0042.png")
  assert f"top {len(ex.top)} of {c.num_clusters} clusters" in titles[0]
  assert f"similarity {ex.similarity:.4f}" in titles[2]
  assert "dustbin" in titles[5]
  # patches of other clusters grey, those of the top clusters in their colours
  grid = drawing.grid_rgb(drawing.argmax_clusters(aa), drawing.cluster_colors(8), ex.top)
  is_top = np.isin(drawing.argmax_clusters(aa), ex.top)
  assert (grid[~is_top] == drawing.GREY).all() and not (grid[is_top] == drawing.GREY).all()
  # the files the CLI writes: the picture and its numbers, under the images' names
  out = tmp_path / "out"
  out.mkdir()
  written = visualize.assignment_maps(model, [str(f) for f in files], (56, 56), str(out), True)
  assert [os.path.basename(p) for p in written] == [
    "query_0001_assignment.png",
    "db_0042_assignment.png",
    "pair_query_0001_db_0042.png",
    "pair_query_0001_db_0042.json",
    "assignments.npz",
  ]
  with Image.open(out / "pair_query_0001_db_0042.png") as im:
    assert im.size == explain.pair_picture(ims[0], aa, ims[1], ab, ex).size
  data = json.loads((out / "pair_query_0001_db_0042.json").read_text())
  assert data["images"] == [str(f) for f in files] and data["top"] == list(ex.top)
  assert abs(data["token"] + sum(data["clusters"]) - data["similarity"]) < 1e-6
  assert abs(data["similarity"] - ex.similarity) < 1e-6
