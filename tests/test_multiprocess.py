"""Two JAX processes x 2 CPU devices (jax.distributed, gloo) train and evaluate like one process x
4 devices, with a batch of 5 places: each process loads 3 whole places, the second one padding."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from salad_jax.train import optim
from salad_jax.weights import run_checkpoints

from helpers import make_gsv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CITIES = {"Alpha": [4, 5, 6, 4, 4, 7, 4, 5, 4, 4, 6, 4], "Beta": [5, 4, 4, 6, 4, 4, 4, 5, 4, 4]}


def make_eval_folder(root, places=5, db_per_place=2, size=(64, 48)):
  """UTM-named database/queries folders: place p at east 1000 p, its images noisy views of it."""
  from PIL import Image

  rng = np.random.default_rng(1)
  for sub in ("database", "queries"):
    os.makedirs(os.path.join(root, sub))
  for p in range(places):
    base = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3)).repeat(8, 0).repeat(8, 1)
    for k in range(db_per_place + 1):
      view = np.clip(base + rng.integers(-60, 60, base.shape), 0, 255).astype(np.uint8)
      sub, tag = ("queries", f"q{p}") if k == db_per_place else ("database", f"p{p}k{k}")
      Image.fromarray(view).save(os.path.join(root, sub, f"@{1000 * p + k:.1f}@0.0@{tag}@.jpg"))


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_two(args, sigterm_at=None, rc=0):
  """Both processes to completion: (stdout, stderr) of each. Their output goes to files, not pipes: a pipe read only after the other process ends could fill, block its writer
  and leave the other process waiting for it at a collective (jax.distributed's shutdown barrier
  then times out after 300 s and aborts both). `sigterm_at`: SIGTERM to process 1 once process
  0 has printed this."""
  port = _free_port()
  files, procs = [], []
  for i in range(2):
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    files.append((out, err))
    procs.append(
      subprocess.Popen(
        args,
        stdout=out,
        stderr=err,
        env=dict(
          os.environ,
          XLA_FLAGS="--xla_force_host_platform_device_count=2",
          JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
          JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
          JAX_NUM_PROCESSES="2",
          JAX_PROCESS_ID=str(i),
          JAX_PLATFORMS="cpu",
        ),
      )
    )
  t0 = time.time()
  while sigterm_at and time.time() - t0 < 600 and all(p.poll() is None for p in procs):
    if sigterm_at in os.pread(files[0][0].fileno(), 1 << 20, 0).decode(errors="replace"):
      procs[1].send_signal(signal.SIGTERM)
      break
    time.sleep(0.05)
  outs = []
  for p, (out, err) in zip(procs, files):
    p.wait(timeout=600)
    with out, err:
      out.seek(0), err.seek(0)
      outs.append((out.read(), err.read()))
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == rc, err[-3000:]
  return outs


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  root = str(tmp_path / "gsv")
  make_gsv(root, CITIES, size=(64, 48))
  make_eval_folder(str(tmp_path / "eval"))  # 10 + 5 images: 4 batches of 4, the last one padded
  args = [
    sys.executable,
    os.path.join(REPO, "train.py"),
    "--config",
    os.path.join(REPO, "configs/demo.py"),
    "--config.data.source=folder",
    f"--config.data.root={root}",
    "--config.data.cities=Alpha,Beta",
    "--config.data.places_per_batch=5",  # 5 / 2 processes: a padding place on process 1
    "--config.data.image_size=(56,56)",
    "--config.data.num_workers=0",
    f"--config.eval.sets=folder:{tmp_path / 'eval'}",
    "--config.eval.at_start=False",
    "--config.eval.image_size=(56,56)",
    "--config.eval.batch_size=4",
    "--config.eval.num_workers=0",
    "--config.num_epochs=1",
    "--config.checkpoint.every_steps=2",
    "--config.log_every_steps=1",
    "--config.model.variant=Nano/14",
    "--config.model.num_clusters=8",
    "--config.model.cluster_dim=16",
    "--config.model.token_dim=16",
    "--config.model.hidden_dim=32",
  ]
  single = subprocess.run(
    args + ["--workdir", str(tmp_path / "one")],
    capture_output=True,
    text=True,
    env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4"),
    timeout=600,
  )
  assert single.returncode == 0, single.stderr[-3000:]
  outs = _run_two(args + ["--workdir", str(tmp_path / "two")])
  assert "4 device(s)" in outs[0][0]  # process 0 sees the global mesh
  assert "each step holds 24 entries, 4 of them padding" in outs[0][0], outs[0][0]
  logs = {
    run: [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    for run in ("one", "two")
  }
  one, two = ([x["loss"] for x in logs[run] if "loss" in x] for run in ("one", "two"))
  np.testing.assert_allclose(two, one, rtol=1e-5)  # 20 images vs 20 + 4 padding entries
  # evaluation: each process loads half of every batch; every process reports the recalls of one
  (val_one,), (val_two,) = ([x for x in logs[run] if "val/R@1" in x] for run in ("one", "two"))
  assert val_two == val_one and val_one["val/R@1"] > 0  # (R@1 = 0 could hide a shuffled order)
  done = [out.strip().splitlines()[-1] for out, _ in [(single.stdout, "")] + outs]
  assert len(set(d.split(" in ")[0] for d in done)) == 1, done
  assert f"(R@1 {val_one['val/R@1']:.2f})" in done[1], done
  step_dir = tmp_path / "two" / "checkpoints" / str(len(one))
  assert sorted(os.listdir(step_dir / "data")) == [
    "commit_success.txt",
    "process_0-of-2.json",
    "process_1-of-2.json",
  ]  # each process's data state
  a = optim.flatten(run_checkpoints.load_for_inference(str(tmp_path / "one"), which="latest")[0])
  b = optim.flatten(run_checkpoints.load_for_inference(str(tmp_path / "two"), which="latest")[0])
  # AdamW turns float-noise gradient differences into O(lr) steps for a few weights (README,
  # Parity); the rest must agree to 1e-6
  total = noisy = 0
  for k, v in a.items():
    d = np.abs(b[k] - v)
    total, noisy = total + d.size, noisy + int((d > 1e-6).sum())
    assert d.max() <= 2 * 1e-3 * len(one), k  # demo lr 1e-3
  assert noisy <= 1e-3 * total, (noisy, total)

  # a damaged newest checkpoint: both processes agree to fall back to the previous step, process 0
  # moves the damaged one aside (kept), and the resumed run retrains the step exactly
  last = tmp_path / "two" / "checkpoints" / str(len(one))
  params = [os.path.join(r, f) for r, _, fs in os.walk(last / "params") for f in fs]
  os.remove(max(params, key=os.path.getsize))
  again = _run_two(args + ["--workdir", str(tmp_path / "two")])
  moved = [ln for ln in again[0][0].splitlines() if "cannot be restored" in ln]
  assert len(moved) == 1 and f"resuming from step {len(one) - 1}" in moved[0], again[0][0][-2000:]
  aside = os.listdir(tmp_path / "two" / "damaged_checkpoints")
  assert [a.split("-")[0] for a in aside] == [str(len(one))]
  rerun = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
  losses = [x["loss"] for x in rerun if "loss" in x]
  assert len(losses) == len(one) + 1
  np.testing.assert_allclose(losses[-1], one[-1], rtol=1e-5)
  assert [out.strip().splitlines()[-1] for out, _ in again] == [d for d in done[1:]]

  # one process cannot take over the two processes' input positions: a one-line launch error
  # that names what to do, and the checkpoints are left as they are
  before = sorted(os.listdir(tmp_path / "two" / "checkpoints"))
  alone = subprocess.run(
    args + ["--workdir", str(tmp_path / "two")],
    capture_output=True,
    text=True,
    env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4"),
    timeout=600,
  )
  assert alone.returncode == 2, alone.stderr[-3000:]
  assert (
    alone.stderr.startswith("error: checkpoint step ")
    and "saved by 2 process(es) and this run has 1" in alone.stderr
    and "JAX_NUM_PROCESSES=2" in alone.stderr
  ), alone.stderr
  assert len(alone.stderr.splitlines()) == 2 and "Traceback" not in alone.stderr
  assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == before

  # preemption: a SIGTERM to process 1 alone (jax.distributed's preemption service takes it);
  # both processes save the same step, each its data position, and exit 143 with one line
  longer = [a for a in args if not a.startswith("--config.num_epochs")]
  longer += ["--config.num_epochs=2", "--workdir", str(tmp_path / "two")]
  outs = _run_two(longer, sigterm_at=f"step {len(one) + 1}/", rc=143)
  lines = [[ln for ln in err.splitlines() if ln.startswith("terminated")] for _, err in outs]
  assert len(lines[0]) == 1 and lines[0] == lines[1], [err[-2000:] for _, err in outs]
  saved = int(lines[0][0].split("saved step ")[1].split()[0])
  assert len(one) < saved < 2 * len(one), saved
  assert sorted(os.listdir(tmp_path / "two" / "checkpoints" / str(saved) / "data")) == [
    "commit_success.txt",
    "process_0-of-2.json",
    "process_1-of-2.json",
  ]
