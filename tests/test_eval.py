"""Eval sets, kNN search, Recall@K, the challenge file, and evaluate.py end to end."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import salad_jax
from salad_jax import errors, sharding
from salad_jax.data import benchmarks, eval_sets
from salad_jax.evaluation import descriptors, evaluate, recall, search

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_recalls_match_brute_force():
  rng = np.random.default_rng(0)
  preds = np.stack([rng.permutation(50)[:25] for _ in range(40)])
  positives = [rng.choice(50, rng.integers(0, 4), replace=False) for _ in range(40)]
  got = recall.recalls(preds, positives, (1, 5, 10, 20))
  for k in (1, 5, 10, 20):
    want = 100 * np.mean([len(set(p[:k]) & set(pos)) > 0 for p, pos in zip(preds, positives)])
    assert got[f"R@{k}"] == pytest.approx(want)


def _write(path, color=(0, 0, 0), size=(40, 30)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", size, color).save(path)


def test_folder_set_ground_truth_is_a_25m_radius(tmp_path):
  rng = np.random.default_rng(1)
  db_utm = rng.uniform(0, 200, (60, 2))
  q_utm = rng.uniform(0, 200, (15, 2))
  for i, (e, n) in enumerate(db_utm):
    _write(str(tmp_path / "database" / f"@{e:.3f}@{n:.3f}@db{i}@.jpg"))
  for i, (e, n) in enumerate(q_utm):
    _write(str(tmp_path / "queries" / "sub" / f"@{e:.3f}@{n:.3f}@q{i}@.png"))
  s = eval_sets.folder_set(str(tmp_path / "database"), str(tmp_path / "queries"))
  assert s.database_paths == sorted(s.database_paths) and s.num_queries == 15
  db = eval_sets.utm_of(s.database_paths)
  for qi, q in enumerate(eval_sets.utm_of(s.query_paths)):
    want = np.flatnonzero(np.linalg.norm(db - q, axis=1) <= 25)
    np.testing.assert_array_equal(s.positives[qi], want)
  s50 = eval_sets.folder_set(str(tmp_path / "database"), str(tmp_path / "queries"), 50)
  assert sum(map(len, s50.positives)) > sum(map(len, s.positives))


def test_folder_errors_are_clear(tmp_path):
  _write(str(tmp_path / "db" / "plain_name.jpg"))
  _write(str(tmp_path / "q" / "@1@2@.jpg"))
  with pytest.raises(ValueError, match="plain_name.jpg has no UTM coordinates"):
    eval_sets.folder_set(str(tmp_path / "db"), str(tmp_path / "q"))
  assert (
    eval_sets.folder_set(str(tmp_path / "db"), str(tmp_path / "q"), use_labels=False).positives
    is None
  )
  os.makedirs(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="contains no images"):
    eval_sets.folder_set(str(tmp_path / "empty"), str(tmp_path / "q"))
  with pytest.raises(errors.UserError, match="does not exist") as e:
    eval_sets.folder_set(str(tmp_path / "nope"), str(tmp_path / "q"))
  assert "check the path" in e.value.hint


def _layout(root, spec):
  """spec: name -> None (an image), "->target" (a link), "text:..." (a text file)."""
  for name, what in spec.items():
    path = root / name
    os.makedirs(path.parent, exist_ok=True)
    if what is None:
      Image.new("RGB", (8, 8)).save(
        path, format={"jpg": "JPEG", "tif": "TIFF"}.get(name.rsplit(".", 1)[-1].lower(), None)
      )
    elif what.startswith("->"):
      os.symlink(what[2:].replace("ROOT", str(root)), path)
    else:
      path.write_text(what[len("text:") :])


@pytest.mark.parametrize(
  "spec, want, words",
  [
    # other image formats: not read (as VPR-methods-evaluation), but named in one warning
    (
      {
        "db/@1@2@a.jpg": None,
        "db/@1@2@b.JPG": None,
        "db/@1@2@c.webp": None,
        "db/s/@1@2@d.tif": None,
      },
      2,
      "warning: .*2 image files not used \\(1 .tif, 1 .webp\\)",
    ),
    # a link loop: each image once (was 40 times), and a note
    (
      {"db/@1@2@a.jpg": None, "db/@1@2@b.png": None, "db/sub/loop": "->ROOT/db"},
      2,
      "note: .*1 linked folder.* not followed again.*loop",
    ),
    # two links to one folder: read once
    ({"real/@1@2@a.jpg": None, "db/x": "->ROOT/real", "db/y": "->ROOT/real"}, 1, "not followed"),
    # a dangling image link: an error naming it (was skipped silently)
    (
      {"db/@1@2@a.jpg": None, "db/@3@4@b.jpg": "->ROOT/gone.jpg"},
      FileNotFoundError,
      "@3@4@b.jpg is a link",
    ),
    # one file under two names: an error (the names may carry different coordinates)
    (
      {"db/@1@2@a.jpg": None, "db/@9@9@b.jpg": "->ROOT/db/@1@2@a.jpg"},
      errors.UserError,
      "same image file twice",
    ),
    # a stale <folder>_images_paths.txt: used, as the reference does, with a note giving both counts
    (
      {
        "db/@1@2@a.jpg": None,
        "db/@1@2@b.jpg": None,
        "db/@1@2@c.jpg": None,
        "db_images_paths.txt": "text:@1@2@a.jpg\n",
      },
      1,
      "note: .*using the 1 images listed in .*db_images_paths.txt.*3 image files",
    ),
    (
      {"db/@1@2@a.jpg": None, "db_images_paths.txt": "text:@1@2@a.jpg\n./@1@2@a.jpg\n"},
      errors.UserError,
      "same image file twice",
    ),
  ],
)
def test_image_folders_are_read_once_each_and_what_is_left_out_is_said(
  tmp_path, capsys, spec, want, words
):
  _layout(tmp_path, spec)
  if isinstance(want, int):
    paths = eval_sets.read_image_paths(str(tmp_path / "db"))
    assert len(paths) == want and len({os.path.realpath(p) for p in paths}) == want
    err = capsys.readouterr().err
    assert re.search(words, err) and len(err.strip().splitlines()) == 1, err
  else:
    with pytest.raises(want, match=words):
      eval_sets.read_image_paths(str(tmp_path / "db"))


@pytest.mark.parametrize(
  "db, q, kw, want, words",
  [
    # queries = the database (same real folder, through a link): every query finds itself
    (
      ["@0@0@a.jpg", "@500@0@b.jpg"],
      "->ROOT/db",
      {},
      errors.UserError,
      "same folder .*find itself",
    ),
    (
      ["@0@0@a.jpg", "@500@0@b.jpg"],
      ["@500@0@b.jpg->ROOT/db/@500@0@b.jpg", "@0@300@c.jpg"],
      {},
      errors.UserError,
      "1 of 2 queries are also database images",
    ),
    (
      ["@0@0@a.jpg", "@500@0@b.jpg"],
      "->ROOT/db",
      {"use_labels": False},
      "warning",
      "same folder .*retrieval only",
    ),
    # latitude/longitude degrees instead of UTM metres: a warning
    (
      ["@45.1@7.4@a.jpg", "@45.2@7.5@b.jpg"],
      ["@45.1@7.4@q.jpg"],
      {},
      "warning",
      "look like degrees",
    ),
    (["@0@0@a.jpg", "@500@0@b.jpg"], ["@10@0@q.jpg"], {}, "", ""),  # metres: nothing said
    # NaN / inf in a name: an error naming the file (was scipy's "data must be finite")
    (
      ["@0@0@a.jpg", "@nan@0@b.jpg"],
      ["@10@0@q.jpg"],
      {},
      errors.UserError,
      "@nan@0@b.jpg: its UTM",
    ),
    (["@0@0@a.jpg"], ["@10@inf@q.jpg"], {}, errors.UserError, "@10@inf@q.jpg: its UTM"),
  ],
)
def test_folder_sets_whose_recalls_would_mean_nothing(tmp_path, capsys, db, q, kw, want, words):
  spec = {f"db/{n}": None for n in db}
  if isinstance(q, str):
    spec["q"] = q
  else:
    spec.update(
      {f"q/{n.split('->')[0]}": ("->" + n.split("->")[1]) if "->" in n else None for n in q}
    )
  _layout(tmp_path, spec)
  if isinstance(want, type):
    with pytest.raises(want, match=words):
      eval_sets.folder_set(str(tmp_path / "db"), str(tmp_path / "q"), **kw)
    return
  eval_sets.folder_set(str(tmp_path / "db"), str(tmp_path / "q"), **kw)
  err = capsys.readouterr().err
  assert (
    (re.search(f"{want}: .*{words}", err) and len(err.splitlines()) == 1) if want else not err
  ), err


def test_outputs_are_claimed_before_compute_and_an_earlier_runs_are_removed(tmp_path, capsys):
  from salad_jax.files import outputs

  out, o = str(tmp_path / "out"), tmp_path / "out"
  os.makedirs(o / "preds")
  (o / "recalls.json").write_text("mine")
  with pytest.raises(
    errors.UserError, match="recalls.json exists and was not written by evaluate.py"
  ):
    outputs.claim(out, ["recalls.json", "preds/000.jpg"], "evaluate.py")
  assert (o / "recalls.json").read_text() == "mine"
  os.remove(o / "recalls.json")
  run1 = outputs.claim(out, ["recalls.json", "preds/000.jpg", "preds/001.jpg"], "evaluate.py")
  for f in ("recalls.json", "preds/000.jpg", "preds/001.jpg"):
    (o / f).write_text("run 1")
  run1.finish()
  (o / "notes.txt").write_text("mine")
  failed = outputs.claim(out, ["preds/001.jpg"], "evaluate.py")  # a run that fails: removes nothing
  del failed
  assert sorted(os.listdir(o / "preds")) == ["000.jpg", "001.jpg"] and (o / "recalls.json").exists()
  run2 = outputs.claim(
    out, ["preds/001.jpg"], "evaluate.py"
  )  # only query 1 (--save_only_wrong_preds)
  (o / "preds" / "001.jpg").write_text("run 2")
  run2.finish()
  assert "removed 2 file(s) of an earlier evaluate.py run" in capsys.readouterr().err
  assert os.listdir(o / "preds") == ["001.jpg"] and not (o / "recalls.json").exists()
  assert (o / "notes.txt").read_text() == "mine"  # never recorded: never touched
  (o / "preds" / "001.jpg").write_text("edited by you")  # recorded, but no longer as we wrote it
  with pytest.raises(errors.UserError, match="preds/001.jpg exists"):
    outputs.claim(out, ["preds/001.jpg"], "evaluate.py")
  os.remove(o / "preds" / "001.jpg")
  os.symlink(o / "notes.txt", o / "preds" / "001.jpg")  # not a file we wrote
  with pytest.raises(errors.UserError, match="preds/001.jpg exists"):
    outputs.claim(out, ["preds/001.jpg"], "evaluate.py")


def test_a_manifest_never_reaches_outside_the_folder_or_through_links(tmp_path):
  from salad_jax.files import outputs

  out, o = str(tmp_path / "out"), tmp_path / "out"
  o.mkdir()
  (tmp_path / "important.txt").write_text("precious")
  for forged in (
    '{"evaluate.py": {"files": {"../important.txt": [8, 0]}}}',
    f'{{"evaluate.py": {{"files": {{"{tmp_path / "important.txt"}": [8, 0]}}}}}}',
    '{"evaluate.py": {"files": {"1": 1}}}',
    '{"evaluate.py": ["recalls.json"]}',
    "[1]",
  ):
    (o / outputs.MANIFEST).write_text(forged)
    with pytest.raises(errors.UserError, match="is unreadable"):
      outputs.claim(out, ["recalls.json"], "evaluate.py")
  assert (tmp_path / "important.txt").read_text() == "precious"
  os.remove(o / outputs.MANIFEST)
  photos = tmp_path / "photos"
  photos.mkdir()
  (photos / "000.jpg").write_text("my photo")
  os.symlink(photos, o / "preds")  # a linked subfolder: neither written into nor cleaned
  with pytest.raises(errors.UserError, match="passes through a link"):
    outputs.claim(out, ["preds/000.jpg"], "evaluate.py")
  assert (photos / "000.jpg").read_text() == "my photo"


def test_missing_eval_image_is_named_before_any_compute(tmp_path):
  s = eval_sets.EvalSet("x", [str(tmp_path / "a.jpg")], [str(tmp_path / "b.jpg")], None)
  _write(str(tmp_path / "a.jpg"))
  with pytest.raises(FileNotFoundError, match="image not found: .*b.jpg"):
    evaluate.evaluate_set(s, None, None, None)  # fails in check_files, before touching the model


def test_faiss_and_sharded_jax_search_return_the_same_neighbours():
  rng = np.random.default_rng(2)  # seed chosen so no two of the top-26 distances are near-ties
  db = rng.standard_normal((501, 64))
  q = rng.standard_normal((37, 64))
  db /= np.linalg.norm(db, axis=1, keepdims=True)
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  exact = np.sort(((q[:, None] - db[None]) ** 2).sum(-1), axis=1)[:, :26]
  assert np.diff(exact, axis=1).min() > 2e-5
  db, q = db.astype(np.float32), q.astype(np.float32)
  d_f, i_f = search.search(db, q, 25, "faiss")
  mesh = sharding.make_mesh()
  assert mesh.devices.size == jax.device_count() == 8
  d_j, i_j = search.search(db, q, 25, "jax", mesh)
  np.testing.assert_array_equal(i_f, i_j)
  np.testing.assert_allclose(d_f, d_j, atol=1e-4)


def _np_save(path, arr):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  np.save(path, arr, allow_pickle=True)


def test_index_npy_object_arrays_load_without_unpickling_code(tmp_path):
  gt = np.empty(3, dtype=object)
  gt[:] = [np.array([1, 2]), np.array([0]), np.array([4, 5, 6])]
  _np_save(str(tmp_path / "gt.npy"), gt)
  got = benchmarks.load_npy(str(tmp_path / "gt.npy"))
  assert [list(x) for x in got] == [[1, 2], [0], [4, 5, 6]]

  class Evil:
    def __reduce__(self):
      return (exec, (f"open({str(tmp_path / 'ran')!r}, 'w')",))

  evil = np.empty(1, dtype=object)
  evil[0] = Evil()
  with open(tmp_path / "evil.npy", "wb") as f:
    np.lib.format.write_array(f, evil, allow_pickle=True)
  with pytest.raises(ValueError, match="refusing to unpickle builtins.exec"):
    benchmarks.load_npy(str(tmp_path / "evil.npy"))
  assert not (tmp_path / "ran").exists()


def test_benchmark_index_formats(tmp_path):
  root, idx = tmp_path / "data", tmp_path / "data" / "datasets"
  # MSLS val: queries are qImages[qIdx]; ground truth per used query
  _np_save(
    str(idx / "msls_val/msls_val_dbImages.npy"),
    np.array(["train_val/cph/database/images/d0.jpg", "train_val/sf/database/images/d1.jpg"]),
  )
  _np_save(
    str(idx / "msls_val/msls_val_qImages.npy"),
    np.array([f"train_val/cph/query/images/q{i}.jpg" for i in range(4)]),
  )
  _np_save(str(idx / "msls_val/msls_val_qIdx.npy"), np.array([0, 2, 3]))
  gt = np.empty(3, dtype=object)
  gt[:] = [np.array([0]), np.array([1]), np.array([0, 1])]
  _np_save(str(idx / "msls_val/msls_val_pIdx.npy"), gt)
  s = benchmarks.benchmark_set("msls_val", str(root))
  assert s.query_paths[1].endswith("mapillary/train_val/cph/query/images/q2.jpg")
  assert [list(p) for p in s.positives] == [[0], [1], [0, 1]] and "740" not in s.protocol
  # SPED: int64 [N, 1]
  _np_save(str(idx / "SPED/SPED_dbImages.npy"), np.array(["ref/0000000.jpg", "ref/0000001.jpg"]))
  _np_save(str(idx / "SPED/SPED_qImages.npy"), np.array(["query/0000000.jpg", "query/0000001.jpg"]))
  _np_save(str(idx / "SPED/SPED_gt.npy"), np.array([[0], [1]]))
  s = benchmarks.benchmark_set("sped", str(root))
  assert s.database_paths[1].endswith("SPEDTEST/ref/0000001.jpg") and [
    list(p) for p in s.positives
  ] == [[0], [1]]
  # MSLS test: no labels, challenge set
  _np_save(
    str(idx / "msls_test/msls_test_dbImages.npy"),
    np.array(["test/athens/database/images/a.jpg"], dtype=object),
  )
  _np_save(
    str(idx / "msls_test/msls_test_qImages.npy"),
    np.array(["test/athens/query/images/b.jpg"], dtype=object),
  )
  s = benchmarks.benchmark_set("msls_test", str(root))
  assert s.challenge and s.positives is None
  with pytest.raises(ValueError, match="unknown benchmark"):
    benchmarks.benchmark_set("tokyo", str(root))
  with pytest.raises(FileNotFoundError, match="Nordland_dbImages.npy"):
    benchmarks.benchmark_set("nordland", str(root))


def test_pittsburgh_ground_truth_from_the_netvlad_struct(tmp_path):
  from scipy.io import savemat

  root, idx = tmp_path / "data", tmp_path / "data" / "datasets"
  db = ["000/000000_pitch1_yaw1.jpg", "000/000001_pitch1_yaw1.jpg", "000/000002_pitch1_yaw1.jpg"]
  q = ["000/000100_pitch1_yaw1.jpg", "000/000101_pitch1_yaw1.jpg"]
  utm_db = np.array([[0.0, 0.0], [20.0, 0.0], [100.0, 0.0]]).T
  utm_q = np.array([[10.0, 0.0], [95.0, 3.0]]).T
  struct = {
    "whichSet": "test",
    "dbImage": np.array(db, dtype=object)[:, None],
    "utmDb": utm_db,
    "qImage": np.array(q, dtype=object)[:, None],
    "utmQ": utm_q,
    "numImages": 3,
    "numQueries": 2,
    "posDistThr": 25.0,
    "posDistSqThr": 625.0,
    "nontrivPosDistSqThr": 100.0,
  }
  os.makedirs(idx / "Pittsburgh")
  savemat(str(idx / "Pittsburgh" / "pitts30k_test.mat"), {"dbStruct": struct})
  _np_save(str(idx / "Pittsburgh/pitts30k_test_dbImages.npy"), np.array(db))
  _np_save(
    str(idx / "Pittsburgh/pitts30k_test_qImages.npy"), np.array(["queries_real/" + x for x in q])
  )
  s = benchmarks.benchmark_set("pitts30k_test", str(root))
  assert [list(p) for p in s.positives] == [[0, 1], [2]]
  assert "UTM radius" in s.protocol


def test_msls_challenge_file(tmp_path):
  s = eval_sets.EvalSet(
    "msls_test",
    [f"/x/test/c/database/images/d{i}.jpg" for i in range(30)],
    ["/x/test/c/query/images/qA.jpg", "/x/test/c/query/images/qB.jpg"],
    None,
    challenge=True,
  )
  preds = np.stack([np.arange(25), np.arange(25)[::-1] + 5])
  eval_sets.write_msls_challenge(str(tmp_path / "p.txt"), s, preds)
  lines = (tmp_path / "p.txt").read_text().splitlines()
  assert lines[0].split() == ["qA"] + [f"d{i}" for i in range(25)]
  assert lines[1].split()[:3] == ["qB", "d29", "d28"] and len(lines[1].split()) == 26


def test_evaluate_cli_end_to_end(tiny_model_dir, tmp_path):
  rng = np.random.default_rng(3)
  places = rng.integers(0, 256, (6, 3))
  for p, color in enumerate(places):
    for k in range(2):
      noisy = np.clip(color + rng.integers(-10, 10, (60, 80, 3)), 0, 255).astype(np.uint8)
      Image.fromarray(noisy).save(tmp_path / f"db_{p}_{k}.jpg")
    os.makedirs(tmp_path / "database", exist_ok=True)
    os.makedirs(tmp_path / "queries", exist_ok=True)
  for p in range(6):
    for k in range(2):
      os.rename(
        tmp_path / f"db_{p}_{k}.jpg",
        tmp_path / "database" / f"@{1000 * p + k:.1f}@0.0@p{p}k{k}@.jpg",
      )
    q = np.clip(places[p] + rng.integers(-10, 10, (60, 80, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(q).save(tmp_path / "queries" / f"@{1000 * p + 3:.1f}@0.0@q{p}@.jpg")
  out = tmp_path / "out"
  cmd = [
    sys.executable,
    os.path.join(REPO, "evaluate.py"),
    "--checkpoint",
    tiny_model_dir,
    "--database_folder",
    str(tmp_path / "database"),
    "--queries_folder",
    str(tmp_path / "queries"),
    "--image_size",
    "56",
    "--batch_size",
    "4",
    "--num_workers",
    "2",
    "--save_descriptors",
    "--num_preds_to_save",
    "2",
    "--output_dir",
    str(out),
    "--search",
    "jax",
  ]
  r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "leaked shared_memory" not in r.stderr  # grain's worker batches are released (grain#398)
  recalls = json.loads((out / "recalls.json").read_text())
  assert len(recalls) == 1
  name = next(iter(recalls))
  assert list(recalls[name]) == ["R@1", "R@5", "R@10", "R@15", "R@20", "R@25"]
  assert "R@1" in r.stdout
  db_desc = np.load(out / "database_descriptors.npy")
  q_desc = np.load(out / "queries_descriptors.npy")
  assert db_desc.shape == (12, 8 * 16 + 16) and q_desc.shape == (6, 144)
  model = salad_jax.load(tiny_model_dir)
  s = eval_sets.folder_set(str(tmp_path / "database"), str(tmp_path / "queries"))
  want = model.describe(salad_jax.preprocess(s.database_paths, size=(56, 56)))
  np.testing.assert_allclose(
    db_desc, want, atol=1e-5
  )  # sorted path order, the public API's numbers
  preds = sorted(os.listdir(out / "preds"))
  assert preds[:2] == ["000.jpg", "000.txt"] and len(preds) == 12
  assert (out / "preds" / "000.txt").read_text().startswith("Query path:")


def test_evaluate_cli_reports_a_missing_image_before_computing(tiny_model_dir, tmp_path):
  os.makedirs(tmp_path / "database")
  os.makedirs(tmp_path / "queries")
  _write(str(tmp_path / "database" / "@0@0@.jpg"))
  listing = tmp_path / "queries_images_paths.txt"
  listing.write_text("@1@1@.jpg\n")  # listed but absent
  cmd = [
    sys.executable,
    os.path.join(REPO, "evaluate.py"),
    "--checkpoint",
    tiny_model_dir,
    "--database_folder",
    str(tmp_path / "database"),
    "--queries_folder",
    str(tmp_path / "queries"),
    "--output_dir",
    str(tmp_path / "out"),
  ]
  r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
  assert r.returncode != 0 and "image not found" in r.stderr and "@1@1@.jpg" in r.stderr


# ------------------------------------------------------------------------------ issue 12 item 2, 6
def _brute_recall(preds, positives, k):
  return 100 * np.mean(
    [len(set(int(x) for x in p[:k] if x >= 0) & set(pos)) > 0 for p, pos in zip(preds, positives)]
  )


def test_recalls_take_k_in_any_order_with_repeats():
  # query 0: first hit at rank 2, query 1: at rank 0, query 2: none -> R@1 = 33.3, R@5 = 66.7
  preds = np.array([[7, 8, 3, 9, 1], [4, 0, 1, 2, 3], [5, 6, 7, 8, 9]])
  positives = [np.array([3]), np.array([4]), np.array([0])]
  got = recall.recalls(preds, positives, (5, 1, 5, 3))
  assert got["R@1"] == pytest.approx(100 / 3)  # the old code said 66.67 for --recall_values 5,1
  for k in (1, 3, 5):
    assert got[f"R@{k}"] == pytest.approx(_brute_recall(preds, positives, k))
  assert list(got) == ["R@1", "R@3", "R@5"]  # ascending, each once


@pytest.mark.parametrize("bad", [(0,), (1, -5), (1.5,), ("x",), ()])
def test_recall_values_must_be_positive_integers(bad):
  with pytest.raises(errors.UserError, match="positive integer|no recall values"):
    recall.recalls(np.zeros((1, 5), np.int64), [np.array([0])], bad)


def test_recalls_refuse_predictions_shorter_than_k():
  with pytest.raises(ValueError, match="R@10 needs the top 10"):
    recall.recalls(np.zeros((2, 5), np.int64), [np.array([0])] * 2, (1, 10), num_database=50)
  # a database of 5 images: R@10 = R@5, rightly
  assert (
    recall.recalls(np.zeros((2, 5), np.int64), [np.array([0])] * 2, (1, 10), num_database=5)["R@10"]
    == 100
  )


def test_faiss_minus_one_is_no_result_everywhere(tmp_path):
  db = np.eye(3, 8, dtype=np.float32)
  q = np.eye(2, 8, dtype=np.float32)
  _, preds = search.search(db, q, 5, "faiss")  # 3 database images, 5 asked: -1 padding
  assert (preds[:, 3:] == -1).all()
  positives = [np.array([2]), np.array([1])]  # index 2 = the last image, what -1 used to mean
  assert recall.recalls(preds, positives, (1, 5))["R@5"] == 100.0
  nan_preds = np.array([[-1, -1, -1], [1, -1, -1]])
  assert recall.recalls(nan_preds, positives, (1, 3)) == {"R@1": 50.0, "R@3": 50.0}
  for name in ("d0", "d1", "d2", "q0", "q1"):
    _write(str(tmp_path / f"{name}.jpg"))
  s = eval_sets.EvalSet(
    "x",
    [str(tmp_path / f"d{i}.jpg") for i in range(3)],
    [str(tmp_path / "q0.jpg"), str(tmp_path / "q1.jpg")],
    positives,
    challenge=True,
  )
  eval_sets.write_msls_challenge(str(tmp_path / "c.txt"), s, nan_preds)
  assert (tmp_path / "c.txt").read_text().splitlines() == ["q0", "q1 d1"]
  from salad_jax import visualize

  assert visualize.save_predictions(s, nan_preds, str(tmp_path / "preds")) == 2
  text = (tmp_path / "preds" / "000.txt").read_text()
  assert "(no result)" in text and "d2.jpg" not in text.split("Positives")[0]


def test_nan_descriptors_are_an_error_naming_an_image(tmp_path):
  from salad_jax.evaluation import descriptor_cache

  for i in range(3):
    _write(str(tmp_path / "database" / f"@{i}@0@.jpg"))
  _write(str(tmp_path / "queries" / "@0@1@.jpg"))
  s = eval_sets.folder_set(str(tmp_path / "database"), str(tmp_path / "queries"))
  config = salad_jax.ModelConfig(variant="Nano/14", num_clusters=8, cluster_dim=16, token_dim=16)
  cache = descriptor_cache.DescriptorCache(
    str(tmp_path / "c"), "sum32:0", config, (56, 56), log=lambda _: None
  )
  desc = np.ones((3, 144), np.float32)
  desc[1:, 5] = np.nan  # what NaN weights or a bfloat16 overflow give
  cache.get("database", s.database_paths, lambda: desc)
  cache.get("queries", s.query_paths, lambda: np.ones((1, 144), np.float32))
  with pytest.raises(
    errors.UserError, match=r"2 of 3 descriptors are NaN/Inf \(first: .*@1@0@.jpg\)"
  ):
    evaluate.evaluate_set(s, None, config, None, image_size=(56, 56), cache=cache)


def test_epoch_evaluator_ranks_by_the_true_r1_whatever_the_k_order(tiny_model_dir, tmp_path):
  from salad_jax.train import config

  rng = np.random.default_rng(5)
  for folder, n, step in (("database", 16, 10), ("queries", 8, 20)):
    os.makedirs(tmp_path / "ev" / folder)
    for i in range(n):
      Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(
        tmp_path / "ev" / folder / f"@{i * step + 3 * (folder == 'queries')}@0@.jpg"
      )
  c = config.base_config()
  c.eval.sets, c.eval.image_size, c.eval.batch_size = f"folder:{tmp_path / 'ev'}", (56, 56), 8
  c.eval.recall_values, c.eval.num_workers = (5, 1, 3), 0
  mesh = sharding.make_mesh()
  ev = evaluate.EpochEvaluator(c, mesh)
  model = salad_jax.load(tiny_model_dir)
  flat = ev(model.params, model.config, step=0)
  s = ev.sets[0]
  kw = dict(image_size=(56, 56), batch_size=8, mesh=mesh, describe=ev._describe)
  db = descriptors.extract(model.params, model.config, s.database_paths, **kw)
  q = descriptors.extract(model.params, model.config, s.query_paths, **kw)
  order = np.argsort(((q[:, None] - db[None]) ** 2).sum(-1), axis=1)
  first = [
    next((r for r, j in enumerate(o) if j in set(p)), 99) for o, p in zip(order, s.positives)
  ]
  assert any(1 <= f < 5 for f in first)  # a hit below rank 1: the old code counted it as R@1
  assert flat["R@1"] == pytest.approx(100 * np.mean(np.array(first) < 1))
  assert flat[f"{s.name}/R@5"] == pytest.approx(100 * np.mean(np.array(first) < 5))


def test_bad_values_and_output_dirs_fail_before_any_compute(tmp_path):
  s = eval_sets.EvalSet("x", [str(tmp_path / "a.jpg")], [str(tmp_path / "b.jpg")], None)
  for kw, words in (
    (dict(batch_size=0), "batch_size 0"),
    (dict(num_preds_to_save=-1), "num_preds_to_save -1"),
    (dict(recall_values=(5, 0)), "K must be a positive integer"),
  ):
    with pytest.raises(errors.UserError, match=words):
      evaluate.evaluate_set(s, None, None, None, **kw)  # before the files, the model, the mesh
  (tmp_path / "file").write_text("mine")
  with pytest.raises(errors.UserError, match="is a file, not a directory"):
    evaluate.evaluate_checkpoint("no/such/checkpoint", [s], str(tmp_path / "file"))
  assert (tmp_path / "file").read_text() == "mine"
  if os.geteuid() != 0:  # root may write anywhere
    os.makedirs(tmp_path / "ro")
    os.chmod(tmp_path / "ro", 0o500)
    with pytest.raises(errors.UserError, match="not writable"):
      evaluate.evaluate_checkpoint("no/such/checkpoint", [s], str(tmp_path / "ro" / "out"))


def test_a_hard_link_counts_as_the_same_image(tmp_path):
  """Two names of one file (a hard link: same inode, different real paths) find each other."""
  for sub in ("db", "q"):
    os.makedirs(tmp_path / sub)
  _write(str(tmp_path / "db" / "@0.0@0.0@a@.jpg"))
  _write(str(tmp_path / "db" / "@500.0@0.0@b@.jpg"))
  os.link(tmp_path / "db" / "@0.0@0.0@a@.jpg", tmp_path / "q" / "@0.0@0.0@qa@.jpg")
  with pytest.raises(errors.UserError, match="1 of 1 queries are also database images"):
    eval_sets.folder_set(str(tmp_path / "db"), str(tmp_path / "q"))
  os.link(tmp_path / "db" / "@0.0@0.0@a@.jpg", tmp_path / "db" / "@9.0@0.0@c@.jpg")
  with pytest.raises(errors.UserError, match="lists the same image file twice"):
    eval_sets.folder_set(str(tmp_path / "db"), str(tmp_path / "q"), use_labels=False)


def test_an_output_dir_inside_an_image_folder_is_refused(tmp_path):
  for sub in ("db", "q"):
    _write(str(tmp_path / sub / f"@0.0@0.0@{sub}@.jpg"))
  for out in (tmp_path / "q" / "out", tmp_path / "db"):
    with pytest.raises(errors.UserError, match="is inside --(queries|database)_folder"):
      benchmarks.requested_sets(
        str(tmp_path / "db"), str(tmp_path / "q"), [], "", None, 25.0, output_dir=str(out)
      )
  assert benchmarks.requested_sets(
    str(tmp_path / "db"), str(tmp_path / "q"), [], "", None, 25.0, output_dir=str(tmp_path / "out")
  )


def test_sets_of_one_name_get_unique_names_everywhere(tiny_model_dir, tmp_path, capsys):
  """A folder set under .../sped/ with --datasets sped printed two headers and one row, and both
  wrote into one sped/ folder: every set now has its own row, recalls.json entry and folder."""
  from salad_jax.train import config

  root, idx = tmp_path / "data", tmp_path / "data" / "datasets"
  _np_save(str(idx / "SPED/SPED_dbImages.npy"), np.array(["ref/0.jpg", "ref/1.jpg"]))
  _np_save(str(idx / "SPED/SPED_qImages.npy"), np.array(["query/0.jpg", "query/1.jpg"]))
  _np_save(str(idx / "SPED/SPED_gt.npy"), np.array([[0], [1]]))
  for i, c in enumerate([(200, 0, 0), (0, 0, 200)]):
    for sub in ("ref", "query"):
      _write(str(root / "SPEDTEST" / sub / f"{i}.jpg"), c)
    for sub, at in (("database", 0), ("queries", 5)):
      for parent in ("a", "b"):
        _write(str(tmp_path / parent / "sped" / sub / f"@{1000 * i + at}@0@.jpg"), c)
  folder = tmp_path / "a" / "sped"
  sets = benchmarks.requested_sets(
    str(folder / "database"), str(folder / "queries"), ["sped", "SPED"], str(root), None, 25.0
  )
  err = capsys.readouterr().err
  assert [s.name for s in sets] == ["sped_2", "sped"]  # the benchmark keeps its protocol name
  assert "--datasets names sped twice (sped and SPED): evaluated once" in err
  assert f"the set ({folder / 'database'}, ...) is reported as 'sped_2'" in err
  out = tmp_path / "out"
  table = evaluate.evaluate_checkpoint(
    tiny_model_dir,
    sets,
    str(out),
    image_size=(56, 56),
    batch_size=4,
    num_workers=0,
    recall_values=(1,),
    save_descriptors=True,
  )
  printed = capsys.readouterr().out
  assert sorted(table) == ["sped", "sped_2"]
  assert sorted(json.loads((out / "recalls.json").read_text())) == ["sped", "sped_2"]
  assert [ln.split()[0] for ln in printed.splitlines() if ln.startswith("sped")] == [
    "sped_2",
    "sped",
  ]
  for name, n in (("sped", 2), ("sped_2", 2)):
    assert np.load(out / name / "database_descriptors.npy").shape[0] == n
  # training's sets: two folders of one name, and one benchmark spelled twice
  c = config.base_config()
  c.eval.sets = f"folder:{tmp_path / 'a' / 'sped'},folder:{tmp_path / 'b' / 'sped'},sped,SPED"
  c.eval.data_root, c.eval.image_size, c.eval.num_workers = str(root), (56, 56), 0
  ev = evaluate.EpochEvaluator(c, sharding.make_mesh())
  assert [s.name for s in ev.sets] == ["sped_2", "sped_3", "sped"]
  assert "config.eval.sets names sped twice (sped and SPED)" in capsys.readouterr().err
  # what a checkpoint's R@1 is measured under: a ground-truth file has no radius
  assert ev.settings["text"] == "R@1 on sped_2, positives within 25 m, 56x56"
  c.eval.sets = "sped"
  fingerprints = set()
  for c.eval.positive_dist_threshold in (25.0, 5000.0):
    ev = evaluate.EpochEvaluator(c, sharding.make_mesh())
    assert ev.settings["text"] == "R@1 on sped, its ground truth, 56x56"
    fingerprints.add(ev.settings["fingerprint"])
  assert len(fingerprints) == 1  # the threshold does not change R@1 on a ground-truth file
