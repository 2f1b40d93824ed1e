"""evaluate.py with VPR-methods-evaluation's / SALAD eval.py's command lines, its one-line errors,
and the descriptor cache (--cache_dir)."""

import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import salad_jax
from salad_jax import argv_compat, errors
from salad_jax.evaluation import descriptor_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVALUATE = os.path.join(REPO, "evaluate.py")
LISTS = {"image_size", "recall_values", "datasets", "val_datasets"}
BOOLS = {"no_labels", "save_only_wrong_preds", "save_descriptors"}

# VPR-methods-evaluation README (gmberton/VPR-methods-evaluation @ adbb6e2), as written
README_UNLABELLED = (
  "python3 main.py --method=cosplace --backbone=ResNet18 --descriptors_dimension=512 "
  "--database_folder=toy_dataset/database --queries_folder=toy_dataset/queries "
  "--no_labels --image_size 200 200 --num_preds_to_save 3 --log_dir toy_experiment"
)
README_PREDS = (
  "python3 main.py --method=cosplace --backbone=ResNet18 --descriptors_dimension=512 "
  "--num_preds_to_save=3 --log_dir=cosplace_on_stlucia "
  "--database_folder=../VPR-datasets-downloader/datasets/st_lucia/images/test/database "
  "--queries_folder=../VPR-datasets-downloader/datasets/st_lucia/images/test/queries"
)
# serizba/salad README
SALAD_EVAL = (
  "python3 eval.py --ckpt_path 'weights/dino_salad.ckpt' --image_size 322 322 "
  "--batch_size 256 --val_datasets MSLS Nordland"
)


def _noted(flag):
  return lambda value: f"{flag}={value}"


def test_readme_command_lines_become_absl_ones():
  theirs = {
    "method": _noted("method"),
    "backbone": _noted("backbone"),
    "descriptors_dimension": _noted("dim"),
    "log_dir": _noted("log_dir"),
  }
  out, notes = argv_compat.rewrite(shlex.split(README_UNLABELLED)[1:], LISTS, BOOLS, theirs)
  assert out == [
    "main.py",
    "--database_folder=toy_dataset/database",
    "--queries_folder=toy_dataset/queries",
    "--no_labels",
    "--image_size=200,200",
    "--num_preds_to_save",
    "3",
  ]
  assert notes == ["method=cosplace", "backbone=ResNet18", "dim=512", "log_dir=toy_experiment"]
  out, notes = argv_compat.rewrite(shlex.split(README_PREDS)[1:], LISTS, BOOLS, theirs)
  assert "--num_preds_to_save=3" in out and notes[-1] == "log_dir=cosplace_on_stlucia"
  out, _ = argv_compat.rewrite(shlex.split(SALAD_EVAL)[1:], LISTS, BOOLS)
  assert out[1:] == [
    "--ckpt_path",
    "weights/dino_salad.ckpt",
    "--image_size=322,322",
    "--batch_size",
    "256",
    "--val_datasets=MSLS,Nordland",
  ]
  # lists in any position, both forms, negative numbers kept as values (checked later)
  out, _ = argv_compat.rewrite(
    ["x", "--recall_values", "1", "5", "-3", "--image_size=322,322", "--datasets", "msls_val"],
    LISTS,
    BOOLS,
  )
  assert out == ["x", "--recall_values=1,5,-3", "--image_size=322,322", "--datasets=msls_val"]


def test_their_flags_we_do_not_have_say_what_we_do_instead():
  theirs = argv_compat.VPR_METHODS_EVALUATION
  with pytest.raises(
    errors.UserError, match="--method cosplace: not an option .* the model is the SALAD"
  ):
    argv_compat.rewrite(shlex.split(README_UNLABELLED)[1:], LISTS, BOOLS, theirs)
  line = README_UNLABELLED.replace(
    "cosplace --backbone=ResNet18 --descriptors_dimension=512",
    "salad --backbone=Dinov2 --descriptors_dimension=8448",
  )
  out, notes = argv_compat.rewrite(shlex.split(line)[1:], LISTS, BOOLS, theirs)
  assert [n.split(":")[0] for n in notes] == [
    "--method salad",
    "--backbone Dinov2",
    "--descriptors_dimension 8448",
    "--log_dir toy_experiment",
  ]
  assert out[-1].startswith("--output_dir=logs/toy_experiment/20")  # their logs/<name>/<date_time>
  with pytest.raises(errors.UserError, match="--log_dir and --output_dir set the same thing"):
    argv_compat.rewrite(["x", "--output_dir", "o", "--log_dir=a"], LISTS, BOOLS, theirs)


@pytest.mark.parametrize(
  "argv, words",
  [
    ("--image_size=322 322", "ambiguous, '=' takes one value"),
    ("--recall_values 1,5 10", "ambiguous mix of commas and spaces"),
    (
      "--image_size --batch_size 4",
      "--image_size has no value: it is followed by the flag --batch_size",
    ),
    ("--save_descriptors True", "--save_descriptors takes no value"),
  ],
)
def test_ambiguous_or_wrong_syntax_is_refused(argv, words):
  with pytest.raises(errors.UserError, match=words.replace("(", r"\(")):
    argv_compat.rewrite(["x"] + argv.split(), LISTS, BOOLS)


def _run(args, cwd=REPO, timeout=600):
  return subprocess.run(
    [sys.executable, EVALUATE] + args, capture_output=True, text=True, cwd=cwd, timeout=timeout
  )


def _one_line_error(r, *words):
  assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
  assert "Traceback" not in r.stderr and r.stderr.startswith("error: "), r.stderr[-2000:]
  for w in words:
    assert w in r.stderr, r.stderr


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_model_dir):
  """The tiny model (as <dir>/model) and a UTM folder pair (6 places)."""
  d = tmp_path_factory.mktemp("vpr")
  os.symlink(tiny_model_dir, d / "model")
  rng = np.random.default_rng(3)
  for folder in ("database", "queries"):
    os.makedirs(d / folder)
  for p, color in enumerate(rng.integers(0, 256, (6, 3))):
    for k in range(2):
      img = np.clip(color + rng.integers(-10, 10, (60, 80, 3)), 0, 255).astype(np.uint8)
      Image.fromarray(img).save(d / "database" / f"@{1000 * p + k:.1f}@0.0@p{p}k{k}@.jpg")
    img = np.clip(color + rng.integers(-10, 10, (60, 80, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(d / "queries" / f"@{1000 * p + 3:.1f}@0.0@q{p}@.jpg")
  return d


def test_readme_line_runs_with_the_salad_model_and_the_cache_skips_extraction(tiny, tmp_path):
  # their README's labelled line, with what we need instead: a checkpoint and the SALAD method;
  # our size (multiples of 14), recall values spelled their way, and a descriptor cache
  line = (
    README_PREDS.replace("python3 main.py ", "")
    .replace(
      "--method=cosplace --backbone=ResNet18 --descriptors_dimension=512",
      "--method=salad --backbone=Dinov2 --descriptors_dimension=8448",
    )
    .replace("../VPR-datasets-downloader/datasets/st_lucia/images/test", str(tiny))
  )
  args = shlex.split(line) + [
    "--checkpoint",
    str(tiny / "model"),
    "--num_workers",
    "0",
    "--image_size",
    "56",
    "56",
    "--recall_values",
    "5",
    "1",
    "5",
    "--save_descriptors",
    "--cache_dir",
    str(tmp_path / "cache"),
  ]
  runs = []
  for _ in range(2):
    r = _run(args, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "note: --method salad: ignored" in r.stderr
    out = r.stdout.split("wrote ")[-1].strip().replace("/recalls.json", "")
    assert out.startswith(str(tmp_path / "logs" / "cosplace_on_stlucia"))  # their --log_dir layout
    assert len(os.listdir(os.path.join(out, "preds"))) == 12
    runs.append(
      (
        r.stdout,
        json.loads(open(os.path.join(out, "recalls.json")).read()),
        np.load(os.path.join(out, "database_descriptors.npy")),
      )
    )
  assert runs[0][0].count("extracted and cached") == 2 and "from the cache" not in runs[0][0]
  assert runs[1][0].count("from the cache, extraction skipped") == 2
  assert runs[0][1] == runs[1][1] and [list(r) for r in runs[0][1].values()] == [["R@1", "R@5"]]
  np.testing.assert_array_equal(runs[0][2], runs[1][2])


def test_their_flags_we_do_not_have_and_bad_values_are_one_line(tiny, tmp_path):
  # their README line as written: a clear message that says what we do instead
  _one_line_error(
    _run(shlex.split(README_UNLABELLED)[2:] + ["--checkpoint", str(tiny / "model")]),
    "--method cosplace",
    "the model is the SALAD checkpoint in --checkpoint",
  )
  _one_line_error(
    _run(["--checkpoint", "x", "--positive_dist_threshold", "-5"]),
    "positive_dist_threshold",
    "positive number of metres",
  )
  (tmp_path / "afile").write_text("")
  base = ["--checkpoint", str(tiny / "model"), "--queries_folder", str(tiny / "queries")]
  _one_line_error(
    _run(base + ["--database_folder", str(tmp_path / "afile")]), "is a file, not a folder"
  )
  # a size whose batch alone cannot fit in memory: one line before loading (was numpy's
  # _ArrayMemoryError traceback)
  _one_line_error(
    _run(
      base
      + [
        "--database_folder",
        str(tiny / "database"),
        "--image_size",
        "100002",
        "100002",
        "--output_dir",
        str(tmp_path / "o"),
      ]
    ),
    "--image_size 100002 100002 with --batch_size 32: one batch of images is",
  )


def test_output_dir_holds_one_runs_outputs_and_never_replaces_yours(tiny, tmp_path):
  out = tmp_path / "out"
  base = [
    "--checkpoint",
    str(tiny / "model"),
    "--database_folder",
    str(tiny / "database"),
    "--queries_folder",
    str(tiny / "queries"),
    "--image_size",
    "56",
    "56",
    "--num_workers",
    "0",
    "--output_dir",
    str(out),
  ]
  os.makedirs(out / "preds")
  (out / "preds" / "000.jpg").write_text("mine")  # a file of yours where a picture would go
  _one_line_error(
    _run(base + ["--num_preds_to_save", "1"]),
    "preds/000.jpg exists and was not written by evaluate.py",
    "hint: choose another",
  )
  assert (out / "preds" / "000.jpg").read_text() == "mine"
  os.rename(out / "preds" / "000.jpg", tmp_path / "moved.jpg")
  r = _run(base + ["--num_preds_to_save", "1"])
  assert r.returncode == 0 and len(os.listdir(out / "preds")) == 12, r.stderr[-3000:]
  # only the wrong queries now: the first run's pictures are removed, not mixed with these
  r = _run(base + ["--num_preds_to_save", "1", "--save_only_wrong_preds"])
  assert r.returncode == 0 and "file(s) of an earlier evaluate.py run" in r.stderr, r.stderr[-3000:]
  r1 = next(iter(json.loads((out / "recalls.json").read_text()).values()))["R@1"]
  assert len(os.listdir(out / "preds")) == 2 * round(6 * (1 - r1 / 100))
  # no labels: says it is retrieval only and leaves no recalls.json (the earlier one is removed)
  r = _run(base + ["--no_labels"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert "retrieval only" in r.stdout and "UTM folders" not in r.stdout
  assert "warning: no labels" in r.stderr and not os.path.exists(out / "recalls.json")


# ------------------------------------------------------------------------------ the cache itself
def test_cache_entries_are_keyed_checked_and_recomputed_when_in_doubt(tmp_path):
  paths = []
  for i in range(3):
    paths.append(str(tmp_path / f"img{i}.jpg"))
    Image.new("RGB", (8, 8), (i, 0, 0)).save(paths[-1])
  config = salad_jax.ModelConfig(
    variant="Nano/14", num_clusters=8, cluster_dim=16, token_dim=16, hidden_dim=32
  )
  log, calls = [], []

  def compute(value=1.0):
    calls.append(1)
    return np.full((3, 144), value, np.float32)

  def cache(checksum="sum32:aa", size=(56, 56), model_cfg=config):
    return descriptor_cache.DescriptorCache(
      str(tmp_path / "c"), checksum, model_cfg, size, log=log.append
    )

  np.testing.assert_array_equal(cache().get("database", paths, compute), compute())
  assert len(calls) == 2 and "extracted and cached" in log[-1]
  assert cache().get("database", paths, compute)[0, 0] == 1.0 and len(calls) == 2  # a hit
  assert "extraction skipped" in log[-1]
  for other in (
    cache(checksum="sum32:bb"),
    cache(size=(70, 70)),
    cache(model_cfg=config.replace(dtype="bfloat16")),
  ):
    other.get("database", paths, compute)  # another key: computed, never the stored entry
  assert len(calls) == 5
  entry = [f for f in os.listdir(tmp_path / "c") if "56x56_float32_aa" in f][0]
  path = str(tmp_path / "c" / entry)
  os.utime(paths[1], ns=(1, 1))  # a file changed: same entry rewritten
  cache().get("database", paths, lambda: compute(2.0))
  assert "image files changed" in log[-2] and len(calls) == 6
  blob = open(path, "rb").read()
  for damaged in (blob[: len(blob) // 2], blob[:200] + bytes([blob[200] ^ 1]) + blob[201:], b""):
    with open(path, "wb") as f:
      f.write(damaged)
    assert cache().get("database", paths, lambda: compute(3.0))[0, 0] == 3.0
    assert "cache entry not used" in log[-2] and ("unreadable" in log[-2] or "checksum" in log[-2])
  assert not [f for f in os.listdir(tmp_path / "c") if f.startswith(".tmp")]  # no leftovers
  # descriptors that do not match their stored checksum (a valid zip written by someone else)
  z = dict(np.load(path))
  z["descriptors"] = z["descriptors"] + 1
  np.savez(path, **z)
  assert (
    descriptor_cache.read_entry(
      path, descriptor_cache.cache_key("sum32:aa", config, (56, 56), paths)
    )[1]
    == "checksum mismatch (corrupt)"
  )
  with pytest.raises(errors.UserError, match="--cache_dir .* is a file"):
    descriptor_cache.DescriptorCache(paths[0], "sum32:aa", config, (56, 56))


# ------------------------------------------------------------------ flags that swallow flags
def _flag_table():
  from absl import flags

  fv = flags.FlagValues()
  flags.DEFINE_string("output_dir", "o", "", flag_values=fv)
  flags.DEFINE_integer("batch_size", 1, "", flag_values=fv)
  flags.DEFINE_float("positive_dist_threshold", 25.0, "", flag_values=fv)
  flags.DEFINE_enum("search", "faiss", ["faiss", "jax"], "", flag_values=fv)
  flags.DEFINE_list("datasets", [], "", flag_values=fv)
  flags.DEFINE_bool("save_descriptors", False, "", flag_values=fv)
  flags.DEFINE_alias("val_datasets", "datasets", flag_values=fv)
  return fv


VALUE_FLAGS = ["output_dir", "batch_size", "positive_dist_threshold", "search", "datasets"]
NEXT = ["--save_descriptors", "--nosave_descriptors", "--batch_size=3", "-search", "--datasets"]


@pytest.mark.parametrize("name", VALUE_FLAGS + ["val_datasets"])
def test_a_flag_without_its_value_never_takes_the_next_flag(name):
  from salad_jax import cli

  fv = _flag_table()
  for other in NEXT:
    if other.lstrip("-").split("=")[0] in (name, fv[name].name):
      continue
    for argv, words in (
      ([f"--{name}", other, "x"], f"--{name} has no value: it is followed by the flag"),
      ([f"--{name}={other}"], f"the value of --{name} is the flag"),
    ):
      with pytest.raises(errors.UserError, match=re.escape(words)) as e:
        cli.check_flag_values(["prog"] + argv, fv)
      assert other.split("=")[0] in e.value.message and f"./{other}" in e.value.hint
  # a misspelled flag is not taken as the value either (it made a folder '--save_descriptor')
  with pytest.raises(errors.UserError, match="looks like a flag \\(the program has no --unknown"):
    cli.check_flag_values(["prog", f"--{name}", "--unknown", "x"], fv)
  # values that only look like flags, and flags that take no value, are left to absl
  for argv in (
    [f"--{name}", "-5"],
    [f"--{name}", "./--save_descriptors"],
    [f"--{name}=--unknown"],
    ["--save_descriptors", f"--{name}", "x"],
    [f"--{name}", "x", "--", "--save_descriptors"],
  ):
    cli.check_flag_values(["prog"] + argv, fv)


def test_a_flag_and_its_alias_together_are_refused():
  from salad_jax import cli

  with pytest.raises(errors.UserError, match="set the same flag \\(--datasets\\)") as e:
    cli.check_flag_values(["p", "--val_datasets=MSLS", "--datasets=sped"], _flag_table())
  assert e.value.message.startswith("--val_datasets=MSLS and --datasets=sped")
  assert "--datasets followed by every value" in e.value.hint
  cli.check_flag_values(["p", "--datasets=a", "--datasets=b"], _flag_table())  # absl: last wins


def test_an_absolute_log_dir_is_used_as_it_is(tmp_path):
  out, notes = argv_compat.rewrite(
    ["x", "--log_dir", str(tmp_path / "abs")], LISTS, BOOLS, argv_compat.VPR_METHODS_EVALUATION
  )
  assert out[1].startswith(f"--output_dir={tmp_path / 'abs'}/20")  # their Path("logs") / "/abs"
  assert "logs" not in out[1]
  out, _ = argv_compat.rewrite(
    ["x", "--log_dir", "rel"], LISTS, BOOLS, argv_compat.VPR_METHODS_EVALUATION
  )
  assert out[1].startswith("--output_dir=logs/rel/20")


# Every entry point, run as `__main__` in one interpreter (one import of salad_jax, not 13):
# (program, argv, words on stderr); each is refused before any work.
ENTRY_POINTS = [
  ("evaluate.py", "--checkpoint m --output_dir --save_descriptors", "--output_dir has no value: it is followed by the flag --save_descriptors"),
  ("evaluate.py", "--checkpoint m --output_dir=--save_descriptors", "the value of --output_dir is the flag --save_descriptors"),
  ("evaluate.py", "--checkpoint m --log_dir --output_dir o", "--log_dir has no value: it is followed by the flag --output_dir"),
  ("evaluate.py", "--checkpoint m --recall_values --image_size 322", "--recall_values has no value: it is followed by the flag --image_size"),
  ("evaluate.py", "--checkpoint m --val_datasets MSLS --datasets sped", "--val_datasets=MSLS and --datasets=sped set the same flag (--datasets)"),
  ("evaluate.py", "--ckpt_path a --checkpoint b", "--ckpt_path a and --checkpoint b set the same flag"),
  ("train.py", "--workdir --config configs/demo.py", "--workdir has no value: it is followed by the flag --config"),
  ("train.py", "--config configs/demo.py --config.eval.sets --workdir w", "--config.eval.sets has no value: it is followed by the flag --workdir"),
  ("train.py", "--config configs/demo.py --config.eval.at_start --workdir w --config.num_epochs=0", "config.num_epochs = 0"),  # a bool override takes no value
  ("convert_weights.py", "--src --dst x.pth", "--src has no value: it is followed by the flag --dst"),
  ("salad_jax.visualize", "--checkpoint m --images a.jpg --output_dir --pair", "--output_dir has no value: it is followed by the flag --pair"),
  ("salad_jax.data.check", "--data_root --datasets sped", "--data_root has no value: it is followed by the flag --datasets"),
  ("salad_jax.data.check", "--data_root /nonexistent", "hint: give the folder that holds"),
  ("salad_jax.data.tfds_gsv", "--manual_dir --data_dir x", "--manual_dir has no value: it is followed by the flag --data_dir"),
  ("salad_jax.export", "--checkpoint m --output --overwrite", "--output has no value: it is followed by the flag --overwrite"),
]  # fmt: skip
RUN_ENTRY_POINTS = r"""
import contextlib, io, json, runpy, sys, warnings
from absl import app, flags
warnings.filterwarnings("ignore", message=".*found in sys.modules")  # runpy: run it again
app.define_help_flags()
ours = set(flags.FLAGS)
for program, args in json.loads(sys.argv[1]):
  for name in set(flags.FLAGS) - ours:  # the previous program's flags
    delattr(flags.FLAGS, name)
  flags.FLAGS.unparse_flags()
  sys.argv, err, code = [program] + args, io.StringIO(), None
  with contextlib.redirect_stderr(err):
    try:
      if program.endswith(".py"):
        runpy.run_path(program, run_name="__main__")
      else:
        runpy.run_module(program, run_name="__main__", alter_sys=True)
    except SystemExit as e:
      code = e.code
  print(json.dumps([code, err.getvalue()]), flush=True)
"""


def test_every_entry_point_refuses_a_flag_without_its_value(tmp_path):
  cases = [
    (
      os.path.join(REPO, p) if p.endswith(".py") else p,
      a.replace("configs/", f"{REPO}/configs/").split(),
    )
    for p, a, _ in ENTRY_POINTS
  ]
  r = subprocess.run(
    [sys.executable, "-c", RUN_ENTRY_POINTS, json.dumps(cases)],
    capture_output=True,
    text=True,
    cwd=tmp_path,
    timeout=300,
    env=dict(os.environ, PYTHONPATH=REPO),
  )
  assert r.returncode == 0, r.stderr[-3000:]
  results = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("[")]
  assert len(results) == len(ENTRY_POINTS), r.stdout[-3000:]
  for (program, args, words), (code, err) in zip(ENTRY_POINTS, results):
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err, (program, err)
    assert words in err, (program, args, err)
  assert os.listdir(tmp_path) == []  # nothing written: no folder named --save_descriptors


# ------------------------------------------------------------------------------ issue 20 item 3
def test_salad_eval_line_runs_unchanged_from_a_salad_checkout(tiny_model_dir, tmp_path):
  """SALAD's README line from its checkout: images in ../data, index files in ./datasets (where
  SALAD keeps them), no --data_root; missing images are counted, with data.check's line."""
  from helpers import run_program

  checkout, data = tmp_path / "salad", tmp_path / "data"
  for sub, names in (("SPED_dbImages", "ref"), ("SPED_qImages", "query")):
    os.makedirs(checkout / "datasets" / "SPED", exist_ok=True)
    np.save(
      checkout / "datasets" / "SPED" / f"{sub}.npy",
      np.array([f"{names}/{i}.jpg" for i in range(3)]),
    )
    for i, c in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
      os.makedirs(data / "SPEDTEST" / names, exist_ok=True)
      Image.new("RGB", (40, 30), c).save(data / "SPEDTEST" / names / f"{i}.jpg")
  np.save(checkout / "datasets" / "SPED" / "SPED_gt.npy", np.array([[0], [1], [2]]))
  os.makedirs(checkout / "weights")
  os.symlink(tiny_model_dir, checkout / "weights" / "dino_salad.ckpt")
  line = SALAD_EVAL.replace("python3 eval.py", "python evaluate.py").replace(
    "MSLS Nordland", "SPED"
  )
  code, out, err = run_program(EVALUATE, shlex.split(line)[2:], cwd=checkout)
  assert code in (0, None), err[-3000:]
  assert f"note: --data_root not given: SALAD's ../data ({data})" in err
  recalls = json.loads((checkout / "runs" / "eval" / "recalls.json").read_text())
  assert list(recalls) == ["sped"] and "R@1" in recalls["sped"]
  os.remove(data / "SPEDTEST" / "ref" / "1.jpg")
  os.remove(data / "SPEDTEST" / "query" / "0.jpg")
  os.remove(data / "SPEDTEST" / "query" / "2.jpg")
  code, out, err = run_program(EVALUATE, shlex.split(line)[2:], cwd=checkout)
  assert code == 2 and "Traceback" not in err, err[-3000:]
  assert (
    "error: sped: 3 of 6 images missing (1 of 3 database, 2 of 3 queries); first image not "
    "found: ../data/SPEDTEST/ref/1.jpg\nhint: `python -m salad_jax.data.check --data_root "
    "../data --datasets sped` lists what is missing and where to get it"
  ) in err, err


def test_a_start_that_fails_leaves_no_output_folder(tmp_path):
  """evaluate.py made --output_dir before it found --checkpoint missing: an empty folder was left."""
  r = subprocess.run(
    [sys.executable, os.path.join(REPO, "evaluate.py"), "--checkpoint", str(tmp_path / "nope")]
    + ["--database_folder", str(tmp_path), "--queries_folder", str(tmp_path)]
    + ["--output_dir", str(tmp_path / "out" / "eval")],
    capture_output=True,
    text=True,
  )
  assert r.returncode == 2 and "--checkpoint" in r.stderr and "does not exist" in r.stderr
  assert not (tmp_path / "out").exists()
