"""Files a run writes or reuses (issue 18): a descriptor cache that knows a rewritten image, one
evaluate.py per output folder, outputs written under a fresh name (a hard-linked backup is never
written into), assignments.npz keys that no image name can break, cache problems found before
the extraction, and one line for a full disk under an Orbax save."""

import contextlib
import os
import subprocess
import uuid

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import salad_jax
from salad_jax import errors, visualize
from salad_jax.data import eval_sets
from salad_jax.evaluation import descriptor_cache
from salad_jax.evaluation.evaluate import evaluate_checkpoint
from salad_jax.files import outputs


def _png(path, pixels):
  Image.fromarray(pixels).save(path, compress_level=0)  # stored: the size depends on H x W only


def _folders(root, shift=0):
  """6 places x (2 database + 1 query) PNGs; `shift` paints place p's database images with place
  p+shift's colours: other pictures of exactly the same byte sizes."""
  rng = np.random.default_rng(5)
  colors = rng.integers(0, 256, (6, 3))
  noise = rng.integers(-12, 12, (6, 3, 42, 56, 3))
  for sub in ("database", "queries"):
    os.makedirs(os.path.join(root, sub), exist_ok=True)
  for p in range(6):
    for k in range(3):
      sub, color = ("queries", colors[p]) if k == 2 else ("database", colors[(p + shift) % 6])
      pixels = np.clip(color + noise[p, k], 0, 255).astype(np.uint8)
      _png(os.path.join(root, sub, f"@{1000 * p + k:.1f}@0.0@p{p}k{k}@.png"), pixels)
  return eval_sets.folder_set(os.path.join(root, "database"), os.path.join(root, "queries"))


def _evaluate(model, s, out, **kw):
  return evaluate_checkpoint(model, [s], str(out), image_size=(56, 56), num_workers=0, **kw)


def _rewrite_same_sizes(root, s):
  """Other pictures in the database files, of the same byte sizes, their mtime set back."""
  times = {p: os.stat(p) for p in s.database_paths}
  sizes = {p: os.path.getsize(p) for p in s.database_paths}
  _folders(str(root), shift=1)
  for p, st in times.items():
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
  assert {p: os.path.getsize(p) for p in s.database_paths} == sizes
  assert {p: os.stat(p).st_mtime_ns for p in s.database_paths} == {
    p: st.st_mtime_ns for p, st in times.items()
  }


def test_a_rewritten_image_is_never_served_from_the_cache(tiny_model_dir, tmp_path, capsys):
  root, cache = tmp_path / "sets", str(tmp_path / "cache")
  s = _folders(str(root))
  first = _evaluate(tiny_model_dir, s, tmp_path / "a", cache_dir=cache)
  assert "12 descriptors extracted and cached" in capsys.readouterr().out
  _rewrite_same_sizes(root, s)
  cached = _evaluate(tiny_model_dir, s, tmp_path / "b", cache_dir=cache)
  log = capsys.readouterr().out
  assert "12 descriptors from the cache" not in log, log
  assert "cache entry not used, made for other inputs: image files changed" in log
  truth = _evaluate(tiny_model_dir, s, tmp_path / "truth")  # no cache
  assert cached == truth and cached != first


def test_outputs_are_new_files_so_a_hard_linked_backup_keeps_its_contents(tiny_model_dir, tmp_path):
  root, out = tmp_path / "sets", tmp_path / "out"
  s = _folders(str(root))
  kw = dict(save_descriptors=True, num_preds_to_save=1)
  _evaluate(tiny_model_dir, s, out, **kw)
  backup = tmp_path / "backup"  # cp -al: hard links to every output
  subprocess.run(["cp", "-al", str(out), str(backup)], check=True)
  files = ["recalls.json", "database_descriptors.npy", "queries_descriptors.npy"]
  files += ["preds/000.jpg", "preds/000.txt", ".salad_jax_outputs.json"]
  before = {f: (backup / f).read_bytes() for f in files}
  _rewrite_same_sizes(root, s)
  _evaluate(tiny_model_dir, s, out, **kw)
  for f, data in before.items():  # the backup still holds the first run's outputs
    assert (backup / f).read_bytes() == data, f
  assert (out / "database_descriptors.npy").read_bytes() != before["database_descriptors.npy"]
  np.testing.assert_allclose(
    np.load(out / "database_descriptors.npy"),
    salad_jax.load(tiny_model_dir).describe(salad_jax.preprocess(s.database_paths, (56, 56))),
    atol=1e-5,
  )


def test_one_run_per_output_folder(tiny_model_dir, tmp_path):
  s = _folders(str(tmp_path / "sets"))
  out = str(tmp_path / "out")
  held = outputs.claim(out, ["recalls.json"], "evaluate.py")  # a run writing there now
  with pytest.raises(errors.UserError, match="is in use by a running evaluate.py"):
    _evaluate(tiny_model_dir, s, out)
  assert not os.path.exists(os.path.join(out, "recalls.json"))
  held.finish()  # that run ends: the folder is free again
  assert "R@1" in next(iter(_evaluate(tiny_model_dir, s, out).values()))
  assert not os.path.exists(os.path.join(out, outputs.LOCK))
  with pytest.raises(errors.UserError):  # a failed run releases the folder too
    _evaluate(tiny_model_dir, s, out, recall_values=[0])
  outputs.claim(out, [], "evaluate.py").release()


def test_assignment_keys_no_image_name_can_break(tiny_model_dir, tmp_path):
  model = salad_jax.load(tiny_model_dir)
  files = []
  for i, name in enumerate(["file.jpg", "allow_pickle.jpg"]):
    files.append(str(tmp_path / name))
    Image.new("RGB", (60, 50), (40 * i, 90, 200 - 30 * i)).save(files[-1])
  out = tmp_path / "out"
  out.mkdir()
  visualize.assignment_maps(model, files, (56, 56), str(out))
  with np.load(out / "assignments.npz", allow_pickle=False) as z:
    assert sorted(z.files) == ["assignments", "names"]
    assert list(z["names"]) == files and z["assignments"].shape == (2, 9, 4, 4)
    for name, a in zip(z["names"], z["assignments"]):
      want = model.assignment(salad_jax.preprocess(str(name), (56, 56))[None])[0]
      np.testing.assert_allclose(a, want, atol=1e-6)


def test_cache_problems_are_found_before_the_extraction(tmp_path, capsys):
  config = salad_jax.ModelConfig(
    variant="Nano/14", num_clusters=8, cluster_dim=16, token_dim=16, hidden_dim=32
  )
  images = []
  for i in range(3):
    images.append(str(tmp_path / f"{i}.png"))
    _png(images[-1], np.full((20, 20, 3), 50 * i, np.uint8))
  cache = descriptor_cache.DescriptorCache(str(tmp_path / "c"), "sum32:aa", config, (56, 56))
  key = descriptor_cache.cache_key("sum32:aa", config, (56, 56), images)
  os.makedirs(descriptor_cache.entry_path(cache.dir, "database", key, images))  # in the way
  seen = []

  def compute():
    seen.append(capsys.readouterr().err)  # what was said before the extraction
    return np.ones((3, 144), np.float32)

  np.testing.assert_array_equal(cache.get("database", images, compute), np.ones((3, 144)))
  assert "is a folder or another non-file; the descriptors are computed but will not" in seen[0]


@contextlib.contextmanager
def _small_disk(tmp_path, size="1m"):
  """A tmpfs of `size` (root only): a disk that fills up."""
  mnt = tmp_path / f"disk_{uuid.uuid4().hex[:6]}"
  mnt.mkdir()
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                     capture_output=True)  # fmt: skip
  if r.returncode != 0:
    pytest.skip("cannot mount a small tmpfs here (needs root)")
  try:
    yield mnt
  finally:
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disks_cost_no_result_and_print_one_line(tmp_path, capfd):
  from salad_jax.train.checkpoint import TrainCheckpointer

  with _small_disk(tmp_path) as disk:
    config = salad_jax.ModelConfig(
      variant="Nano/14", num_clusters=8, cluster_dim=16, token_dim=16, hidden_dim=32
    )
    images = [str(tmp_path / f"{i}.png") for i in range(3000)]
    for p in images[:1]:
      _png(p, np.zeros((8, 8, 3), np.uint8))
    for p in images[1:]:
      os.link(images[0], p)
    cache = descriptor_cache.DescriptorCache(str(disk / "c"), "sum32:aa", config, (56, 56))
    seen = []

    def compute():  # 3000 x 144 floats: 1.6 MiB, more than the disk holds
      seen.append(capfd.readouterr().err)
      return np.ones((3000, 144), np.float32)

    assert cache.get("database", images, compute).shape == (3000, 144)
    assert "cannot write" in seen[0] and "will not be cached" in seen[0], seen

    ck = TrainCheckpointer(str(disk / "run"))
    w = np.random.default_rng(0).standard_normal((512, 1024)).astype(np.float32)  # 2 MiB
    state = {"params": {"w": jnp.asarray(w)}, "step": jnp.int32(1)}
    capfd.readouterr()
    with pytest.raises(errors.UserError) as e:
      ck.save(1, state, {})
      ck.close()
    assert "cannot save the checkpoint of step 1" in e.value.message
    assert "no space left on the device" in e.value.message and "free some space" in e.value.hint
    err = capfd.readouterr().err
    assert "Traceback" not in err and "RESOURCE_EXHAUSTED" not in err, err[:3000]


def test_a_url_is_never_taken_for_a_local_name(tmp_path, monkeypatch):
  """`--workdir gs://b/run` used to become `<cwd>/gs:/b/run` (os.path.abspath) and be created."""
  from salad_jax.data import pack
  from salad_jax.files import paths
  from salad_jax.train import workdir

  monkeypatch.chdir(tmp_path)
  assert paths.absolute("gs://my-bucket/runs//gsv/") == "gs://my-bucket/runs/gsv"
  assert paths.join("gs://b/run", "checkpoints") == "gs://b/run/checkpoints"
  assert paths.parent("gs://b/run/config.json") == "gs://b/run" and paths.name("gs://b/x") == "x"
  assert not paths.is_url("c:/data") and paths.is_url("s3://b/k")
  run = workdir.Workdir("gs://my-bucket/runs/gsv")
  assert (
    run.workdir == "gs://my-bucket/runs/gsv" and run.lock.path == "gs://my-bucket/runs/gsv/.lock"
  )
  from salad_jax.data import benchmarks

  with pytest.raises(errors.UserError, match="evaluation images are read from local disk"):
    benchmarks.requested_sets("gs://b/db", "gs://b/q", [], "", "", 25.0)
  with pytest.raises(errors.UserError, match="a pack is written to local disk"):
    pack.pack(str(tmp_path / "nothing"), "gs://my-bucket/tfds")
  assert not os.listdir(tmp_path)  # nothing named gs: was created
