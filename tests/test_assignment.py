"""SALAD's assignment maps: the model's Sinkhorn assignment, its pictures, and the CLI."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

import salad_jax
from salad_jax import drawing, explain, visualize
from salad_jax.models.sinkhorn import log_assignment

from helpers import torch_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  d = tmp_path_factory.mktemp("pics")
  for name, color in (("q.jpg", (200, 30, 30)), ("db.png", (20, 160, 90))):
    noise = np.random.default_rng(len(name)).integers(0, 60, (60, 90, 3))
    Image.fromarray(np.clip(np.array(color) + noise, 0, 255).astype(np.uint8)).save(d / name)
  return d


@pytest.fixture(scope="module")
def model_and_q(tiny_model_dir, images):
  model = salad_jax.load(tiny_model_dir)
  x = salad_jax.preprocess(str(images / "q.jpg"), (56, 56))[None]
  return model, x, model.assignment(x)


def test_assignment_is_the_one_the_descriptor_is_computed_from(model_and_q):
  model, x, a = model_and_q
  m = model.config.num_clusters
  assert a.shape == (1, m + 1, 4, 4)
  # rows 0..m-1: the head's sown intermediate of the forward pass that makes the descriptor
  is_score = lambda mdl, method: mdl.name == "score_3"  # noqa: E731
  desc, state = jax.jit(
    lambda p, x: model.module.apply(
      {"params": p}, x, mutable=["intermediates"], capture_intermediates=is_score
    )
  )(model.params, x)
  assert desc.shape == (1, model.descriptor_dim)  # the same pass made the descriptor
  inter = state["intermediates"]["aggregator"]
  np.testing.assert_array_equal(a[:, :m], np.asarray(inter["assignment"][0]).reshape(1, m, 4, 4))
  # the dustbin row: Sinkhorn recomputed independently from the head's scores
  scores = inter["score_3"]["__call__"][0]
  full = np.exp(
    np.asarray(
      log_assignment(jnp.swapaxes(scores, 1, 2), model.params["aggregator"]["dust_bin"], 3)
    )
  )
  np.testing.assert_allclose(a[:, m], full[:, m].reshape(1, 4, 4), atol=1e-6)
  np.testing.assert_allclose(a.sum(axis=1), 1.0, atol=1e-6)
  with pytest.raises(ValueError, match="multiples of 14"):
    model.assignment(x[:, :50])
  with pytest.raises(ValueError, match="uint8"):  # the same input checks as describe()
    model.assignment(np.zeros((1, 56, 56, 3), np.uint8))
  with pytest.raises(ValueError, match="range of ImageNet-normalised"):
    model.assignment(x * 100)


def test_pictures_draw_the_values_with_one_colour_per_cluster():
  rng = np.random.default_rng(1)
  m, gh, gw = 6, 4, 5
  a = rng.dirichlet(np.ones(m + 1), size=(gh, gw)).transpose(2, 0, 1).astype(np.float32)
  b = a[:, ::-1, ::-1].copy()  # the same patches, mirrored
  image = Image.fromarray(rng.integers(0, 255, (56, 70, 3), dtype=np.uint8))
  colors = drawing.cluster_colors(m)
  assert len({tuple(c) for c in colors}) == m and (colors == drawing.cluster_colors(m)).all()
  clusters = drawing.argmax_clusters(a)
  np.testing.assert_array_equal(clusters, a[:m].argmax(axis=0))
  pic = np.asarray(visualize.assignment_picture(image, a))
  scale = drawing.scale(image)
  panel_w, top = 70 * scale + visualize.GAP, 2 * visualize.LABEL_H
  for i, j in ((0, 0), (3, 4)):  # patch (i, j) of panel (b): image blended with its cluster colour
    y, x = top + (14 * i + 7) * scale, 2 * panel_w + (14 * j + 7) * scale
    want = (
      0.4 * np.asarray(image, np.float32)[14 * i + 7, 14 * j + 7] + 0.6 * colors[clusters[i, j]]
    )
    np.testing.assert_allclose(pic[y, x], want, atol=2)
  # (a): the patch with the most dustbin mass is the lightest on the heat scale
  hi = np.unravel_index(a[m].argmax(), a[m].shape)
  np.testing.assert_array_equal(drawing.heat_colors(np.array([1.0]))[0], drawing.HEAT[-1])
  assert hi is not None
  d = rng.standard_normal((2, 3 + 2 * m))
  ex = explain.explain(d[0], d[1], m, 3)
  pair = np.asarray(explain.pair_picture(image, a, image, b, ex))
  assert pair.shape == (2 * (56 * scale + top), 3 * 70 * scale + 2 * visualize.GAP, 3)


def _run(args):
  return subprocess.run(
    [sys.executable, "-m", "salad_jax.visualize"] + args,
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=600,
  )


def test_visualize_cli_writes_maps_and_refuses_what_it_cannot_show(
  tiny_model_dir, images, model_and_q, tmp_path
):
  out = tmp_path / "out"
  r = _run(
    [
      "--checkpoint",
      tiny_model_dir,
      "--images",
      str(images / "q.jpg"),
      str(images / "db.png"),
      "--image_size",
      "56",
      "--output_dir",
      str(out),
      "--pair",
    ]
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert sorted(os.listdir(out)) == [
    ".salad_jax_outputs.json",
    "assignments.npz",
    "db_assignment.png",
    "pair_q_db.json",
    "pair_q_db.png",
    "q_assignment.png",
  ]  # and the list of them
  z = np.load(out / "assignments.npz")  # names and assignments in one order (no name as a key)
  assert list(z["names"]) == [str(images / "q.jpg"), str(images / "db.png")]
  np.testing.assert_allclose(z["assignments"][0], model_and_q[2][0], atol=1e-6)
  assert Image.open(out / "q_assignment.png").size[0] > 3 * 56
  # a DINOv2 backbone without a SALAD head; a size the model cannot take: one line each
  torch.save(torch_model("Nano/14").backbone.model.state_dict(), tmp_path / "dinov2.pth")
  for args, words in (
    (["--checkpoint", str(tmp_path / "dinov2.pth"), "--image_size", "56"], "without a SALAD head"),
    (["--checkpoint", tiny_model_dir, "--image_size", "28"], "more patches than its 8 clusters"),
  ):
    r = _run(args + ["--images", str(images / "q.jpg"), "--output_dir", str(out)])
    assert r.returncode == 2 and "Traceback" not in r.stderr and words in r.stderr, r.stderr[-2000:]
  # no image (was rc 0 and an empty assignments.npz); a file of yours where a picture would go
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "assignments.npz").write_text("mine")
  for args, words in (
    (["--images", ""], "--images is empty"),
    (
      ["--images", str(images / "q.jpg"), "--output_dir", str(tmp_path / "mine")],
      "assignments.npz exists and was not written by salad_jax.visualize",
    ),
  ):
    r = _run(["--checkpoint", tiny_model_dir, "--image_size", "56"] + args)
    assert r.returncode == 2 and "Traceback" not in r.stderr and words in r.stderr, r.stderr[-2000:]
  assert (tmp_path / "mine" / "assignments.npz").read_text() == "mine"


def test_pictures_of_images_with_one_name_never_replace_each_other():
  from salad_jax import visualize

  for paths in (["a/x.jpg", "b/x.jpg", "00_x.jpg"], ["x.jpg", "x.png"], ["a.jpg", "b.jpg"]):
    files = visualize.assignment_files(paths)
    assert len(set(files)) == len(files) == len(paths) + 1, files
  assert visualize.assignment_files(["a.jpg", "b.jpg"]) == [
    "a_assignment.png",
    "b_assignment.png",
    "assignments.npz",
  ]
