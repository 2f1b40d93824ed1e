"""python -m salad_jax.data.check on generated benchmark trees: complete, partial, misplaced."""

import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from salad_jax import errors
from salad_jax.data import benchmarks, check, demo, eval_sets

from helpers import make_gsv, run_program

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tiny protocol counts for the generated trees (the real table: check.EXPECTED)
TINY = {
  "msls_val": (2, 3),
  "msls_test": (1, 2),
  "pitts30k_val": (1, 2),
  "pitts30k_test": (1, 2),
  "pitts250k_test": (1, 2),
  "nordland": (2, 4),
  "sped": (2, 2),
}


def _img(path):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", (4, 4)).save(path)


def _npy(path, arr):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  np.save(path, arr, allow_pickle=True)


def _gt(n):
  gt = np.empty(n, dtype=object)
  gt[:] = [np.array([i]) for i in range(n)]
  return gt


def make_msls_val(root, index_root=None):
  idx = index_root or os.path.join(root, "datasets")
  db = [f"train_val/cph/database/images/d{i}.jpg" for i in range(3)]
  q = [f"train_val/sf/query/images/q{i}.jpg" for i in range(3)]
  _npy(f"{idx}/msls_val/msls_val_dbImages.npy", np.array(db))
  _npy(f"{idx}/msls_val/msls_val_qImages.npy", np.array(q))
  _npy(f"{idx}/msls_val/msls_val_qIdx.npy", np.array([0, 2]))  # 2 of the 3 listed queries
  _npy(f"{idx}/msls_val/msls_val_pIdx.npy", _gt(2))
  for p in db + [q[0], q[2]]:
    _img(os.path.join(root, "mapillary", p))


def make_ref_query(root, folder, name, n_db, n_q, key):
  idx = os.path.join(root, "datasets", key)
  _npy(f"{idx}/{name}_dbImages.npy", np.array([f"ref/{i:07d}.jpg" for i in range(n_db)]))
  _npy(f"{idx}/{name}_qImages.npy", np.array([f"query/{i:07d}.jpg" for i in range(n_q)]))
  _npy(f"{idx}/{name}_gt.npy", _gt(n_q))
  for i in range(n_db):
    _img(os.path.join(root, folder, "ref", f"{i:07d}.jpg"))
  for i in range(n_q):
    _img(os.path.join(root, folder, "query", f"{i:07d}.jpg"))


def _by_name(reports):
  return {r.name: r for r in reports}


def test_complete_tree(tmp_path):
  root = str(tmp_path)
  make_msls_val(root)
  make_ref_query(root, "Nordland", "Nordland", 4, 2, "Nordland")
  make_ref_query(root, "SPEDTEST", "SPED", 2, 2, "SPED")
  make_gsv(os.path.join(root, "GSVCities"), {"Alpha": [4, 5], "Beta": [4]})
  r = _by_name(
    check.check_all(
      root,
      names=["msls_val", "nordland", "sped", "gsv_cities"],
      expected=TINY,
      gsv_cities_list=["Alpha", "Beta"],
    )
  )
  assert {n: x.status for n, x in r.items()} == {n: "complete" for n in r}
  assert (r["msls_val"].queries, r["msls_val"].database) == ("2/2", "3/3")
  assert r["GSV-Cities"].database == "13/13" and not r["sped"].todo
  assert any("VPR-Bench version (ref/ 4, query/ 2 images" in n for n in r["nordland"].notes)


def test_partial_tree_names_what_is_missing_and_where_to_get_it(tmp_path):
  root = str(tmp_path)
  make_msls_val(root)
  os.remove(tmp_path / "mapillary/train_val/cph/database/images/d1.jpg")
  os.remove(tmp_path / "datasets/msls_val/msls_val_pIdx.npy")
  make_ref_query(root, "Nordland", "Nordland", 4, 2, "Nordland")
  make_gsv(os.path.join(root, "GSVCities"), {"Alpha": [4, 5]})
  os.remove(next((tmp_path / "GSVCities/Images/Alpha").iterdir()))
  r = _by_name(
    check.check_all(
      root,
      names=["msls_val", "nordland", "sped", "gsv_cities"],
      expected={**TINY, "nordland": (2760, 27592)},
      gsv_cities_list=["Alpha", "Beta"],
    )
  )
  msls = r["msls_val"]
  assert msls.status == "partial" and msls.database == "2/3"
  assert any("1 of 3 database images missing, e.g. " in n and "d1.jpg" in n for n in msls.notes)
  assert any("missing index files: msls_val/msls_val_pIdx.npy" in n for n in msls.notes)
  assert any("mapillary_sls" in t and str(tmp_path / "mapillary") in t for t in msls.todo)
  nord = r["nordland"]  # complete files, but not the protocol's counts
  assert nord.status == "partial" and nord.database == "4/27592"
  assert any(
    "the index lists 2 queries / 4 database images; the protocol expects 2760 / 27592" in n
    for n in nord.notes
  )
  assert r["sped"].status == "missing" and any("surfdrive" in t for t in r["sped"].todo)
  gsv = r["GSV-Cities"]
  assert gsv.status == "partial" and gsv.database == "8/9" and gsv.queries == "1/2 cities"
  assert any("Dataframes/Beta.csv" in n for n in gsv.notes)
  text = check.format_reports(list(r.values()))
  assert "index files: copy the datasets/ folder of github.com/serizba/salad" in text


def test_misplaced_folders_and_index_files_and_nordland_variants(tmp_path):
  root = tmp_path / "data"
  make_msls_val(
    str(tmp_path / "elsewhere"), index_root=str(root / "msls_index")
  )  # index in the wrong folder
  os.makedirs(root / "MSLS")
  os.rename(tmp_path / "elsewhere" / "mapillary", root / "MSLS" / "mapillary_sls")
  os.makedirs(root / "nordland" / "images" / "test" / "database")  # VPR-datasets-downloader layout
  make_gsv(str(root / "gsv-cities"), {"Alpha": [4]})
  r = _by_name(
    check.check_all(
      str(root),
      names=["msls_val", "nordland", "gsv_cities"],
      expected=TINY,
      gsv_cities_list=["Alpha"],
    )
  )
  msls = r["msls_val"]
  assert msls.status == "missing"
  want = (
    f"index file {root}/msls_index/msls_val/msls_val_dbImages.npy is misplaced: move it to "
    f"{root}/datasets/msls_val/msls_val_dbImages.npy"
  )
  assert any(want in n for n in msls.notes), msls.notes
  assert any(
    f"images folder {root}/MSLS is misplaced: move or link it to {root}/mapillary" in n
    for n in msls.notes
  ), msls.notes
  # a downloader folder set is not SALAD's raw layout: no advice to move it (issue 20)
  assert not any("misplaced" in n for n in r["nordland"].notes), r["nordland"].notes
  assert "VPR-datasets-downloader" in check.nordland_variant(str(root / "nordland"))
  os.makedirs(tmp_path / "seasons" / "nordland_summer_images")
  assert "4-season" in check.nordland_variant(str(tmp_path / "seasons"))
  assert any(f"{root}/gsv-cities looks like GSV-Cities" in n for n in r["GSV-Cities"].notes)


def test_cli_lists_everything_and_exits_1_when_incomplete(tmp_path):
  make_ref_query(str(tmp_path), "SPEDTEST", "SPED", 2, 2, "SPED")
  r = subprocess.run(
    [sys.executable, "-m", "salad_jax.data.check", "--data_root", str(tmp_path)],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=300,
  )
  assert r.returncode == 1, r.stderr[-2000:]
  lines = r.stdout.splitlines()
  names = [ln.split()[0] for ln in lines if ln and not ln.startswith((" ", "data_root", "index"))]
  assert names == [
    "benchmark",
    "msls_val",
    "msls_test",
    "pitts30k_val",
    "pitts30k_test",
    "pitts250k_test",
    "nordland",
    "sped",
    "GSV-Cities",
  ]
  sped = next(ln for ln in lines if ln.startswith("sped"))
  assert sped.split()[1:] == ["partial", "2/607", "2/607"]  # the real protocol counts
  r = subprocess.run(
    [sys.executable, "-m", "salad_jax.data.check", "--data_root", str(tmp_path / "nope")],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=300,
  )
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
  assert (
    "--data_root" in r.stderr
    and "does not exist" in r.stderr
    and "hint: give the folder" in r.stderr
  )


def _ragged(*lists):
  gt = np.empty(len(lists), dtype=object)
  gt[:] = [np.asarray(x) for x in lists]
  return gt


# (case, file under datasets/, its new content, words of the note); SPED: 2 queries, 2 db images
BAD_INDEX = [
  ("gt past the database", "SPED/SPED_gt.npy", _ragged([0], [2]), "query 1 lists database index 2"),
  ("negative gt index", "SPED/SPED_gt.npy", np.array([[0], [-1]]), "database index -1"),
  ("gt of floats", "SPED/SPED_gt.npy", _ragged([0], [1.5]), "holds 1.5"),
  ("gt masks, not indices", "SPED/SPED_gt.npy", np.array([[True, False]] * 2), "holds True"),
  ("one gt list short", "SPED/SPED_gt.npy", _ragged([0]), "1 ground-truth lists for 2 queries"),
  ("qIdx past the list", "msls_val/msls_val_qIdx.npy", np.array([0, 3]), "entry 1 is 3"),
  ("pIdx past the database", "msls_val/msls_val_pIdx.npy", _ragged([0], [3]), "index 3"),
]


@pytest.mark.parametrize("case,name,content,words", BAD_INDEX, ids=[b[0] for b in BAD_INDEX])
def test_index_files_naming_images_outside_their_lists_are_invalid(
  tmp_path, case, name, content, words
):
  """Such ground truth gave R@1 0.00 without a word: data.check and evaluate.py name it."""
  root = str(tmp_path)
  make_msls_val(root)
  make_ref_query(root, "SPEDTEST", "SPED", 2, 2, "SPED")
  path = os.path.join(root, "datasets", name)
  _npy(path, content)
  key = "sped" if "SPED" in name else "msls_val"
  r = _by_name(check.check_all(root, names=["msls_val", "sped"], expected=TINY))
  assert r[key].status == "invalid", r[key]
  error = next(n for n in r[key].notes if n.startswith("error: "))
  assert path in error and words in error, error
  assert r[{"sped": "msls_val", "msls_val": "sped"}[key]].status == "complete"
  with pytest.raises(errors.UserError, match=re.escape(path)) as e:
    benchmarks.benchmark_set(key, root)
  assert words in e.value.message and "datasets/ folder of serizba/salad" in e.value.hint


# ------------------------------------------------------------------------------ issue 20 items 1, 2
# VPR-datasets-downloader's trees (its README's layouts; msls's test is a link to val)
DOWNLOADER = {
  "st_lucia/images/test": "queries",
  "tokyo247/images/test": "queries",
  "sf_xl/processed/test": "queries_v1",
  "sf_xl/processed/val": "queries",
  "msls/images/val": "queries",
  "sped/images/test": "queries",
}


def make_downloader_tree(root, places=3):
  """Demo scenes under every layout of DOWNLOADER: per place 2 database views and 1 query,
  UTM names 200 m apart (positives within 25 m: the place's own views)."""
  pics = {"database": [], "queries": []}
  for p in range(places):
    rng = np.random.default_rng([7, p])
    base = demo.scene(rng)
    for sub, n in (("database", 2), ("queries", 1)):
      for k in range(n):
        east = 500_000.0 + 200.0 * p + rng.uniform(-5, 5)
        view = demo.view(base, rng).resize((80, 60))
        pics[sub].append((f"@{east:.2f}@4000000.00@{p:03d}@{k}@.jpg", view))
  for split, queries in DOWNLOADER.items():
    for sub, folder in (("database", "database"), ("queries", queries)):
      os.makedirs(os.path.join(root, split, folder))
      for name, img in pics[sub]:
        img.save(os.path.join(root, split, folder, name))
  os.symlink("val", os.path.join(root, "msls", "images", "test"))


def test_downloader_trees_are_folder_sets_named_after_their_dataset(tmp_path):
  root = str(tmp_path / "datasets")
  make_downloader_tree(root)
  reports = check.check_all(root, expected=TINY)
  r = _by_name(reports)
  want = ["msls_val_utm", "sf_xl", "sf_xl_val", "sped_utm", "st_lucia", "tokyo247"]
  assert sorted(n for n in r if r[n].status == "folders") == want
  for name in want:
    assert (r[name].queries, r[name].database) == ("3", "6"), r[name]
  assert r["sf_xl"].notes[0] == (
    f"python evaluate.py --checkpoint CHECKPOINT --database_folder {root}/sf_xl/processed/test/"
    f"database --queries_folder {root}/sf_xl/processed/test/queries_v1"
  )
  msls = r["msls_val_utm"]  # one set for val and its link test, with the protocol warning
  assert f"{root}/msls/images/val/database" in msls.notes[0]
  assert any(f"also reached as {root}/msls/images/test" in n for n in msls.notes)
  assert sum(n.startswith("warning: not SALAD's msls_val protocol (the 740") for n in msls.notes)
  assert any("not SALAD's sped protocol (2 queries / 2 database" in n for n in r["sped_utm"].notes)
  assert not any("misplaced" in n for x in reports for n in x.notes)  # issue 20: wrong advice
  text = check.format_reports(reports)
  assert "not here: msls_val, msls_test, pitts30k_val" in text and "\nmsls_val " not in text
  assert all(x.status in ("complete", "folders") for x in check.shown(reports))  # exit 0
  # asked for by name, the benchmarks say nothing about moving the downloader's folders
  r = _by_name(check.check_all(root, names=["msls_val", "sped"], expected=TINY))
  assert r["sped"].status == "missing" and not any("misplaced" in n for n in r["sped"].notes)
  # the folder set's name, whatever path reaches it; unique per run (benchmarks keep theirs)
  name = lambda d, q: eval_sets.folder_set(f"{root}/{d}/database", f"{root}/{d}/{q}").name  # noqa: E731
  assert [name(d, q) for d, q in DOWNLOADER.items()] == [
    "st_lucia", "tokyo247", "sf_xl", "sf_xl_val", "msls_val_utm", "sped_utm"
  ]  # fmt: skip
  assert name("msls/images/test", "queries") == "msls_utm"  # the link, as the user gave it
  assert benchmarks.parse_set(f"folder:{root}/st_lucia/images/test").name == "st_lucia"  # training
  sets = [eval_sets.folder_set(f"{root}/{d}/database", f"{root}/{d}/queries") for d in
          ("st_lucia/images/test", "st_lucia/images/test")]  # fmt: skip
  assert [s.name for s in eval_sets.unique_names(sets)] == ["st_lucia", "st_lucia_2"]


def test_the_printed_line_evaluates_the_set_under_its_dataset_name(tmp_path, tiny_model_dir):
  root = str(tmp_path / "datasets")
  make_downloader_tree(root)
  r = _by_name(check.check_all(root))
  for name in ("st_lucia", "sf_xl"):
    line = r[name].notes[0].replace("CHECKPOINT", tiny_model_dir)
    args = shlex.split(line)[2:] + ["--image_size", "56", "56", "--num_workers", "0"]
    code, out, err = run_program(os.path.join(REPO, "evaluate.py"), args, cwd=tmp_path)
    assert code in (0, None), err[-3000:]
    recalls = json.loads((tmp_path / "runs" / "eval" / "recalls.json").read_text())
    assert list(recalls) == [name] and list(recalls[name])[0] == "R@1", (out, err)
    assert any(ln.split()[:1] == [name] for ln in out.splitlines()), out
