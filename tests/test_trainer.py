"""The train loop: 8 devices vs 1, one compile, NaN stop, kill-and-resume, configs and overrides."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

import salad_jax
from salad_jax import sharding
from salad_jax.train import checkpoint, metrics, optim, preemption, trainer
from salad_jax.train import state as train_state
from salad_jax.weights import run_checkpoints

from helpers import make_gsv, place_batch, tiny_train_setup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CITIES = {"Alpha": [4, 5, 6, 4, 4, 7, 4, 5, 4, 4, 6, 4], "Beta": [5, 4, 4, 6, 4, 4, 4, 5, 4, 4]}
TINY = dict(variant="Nano/14", num_clusters=8, cluster_dim=16, token_dim=16, hidden_dim=32)


@pytest.fixture(scope="module")
def gsv_root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("gsv"))
  make_gsv(root, CITIES, size=(64, 48))
  return root


def tiny_overrides(root, **extra):
  o = {
    "config.data.source": "folder",
    "config.data.root": root,
    "config.data.cities": "Alpha,Beta",
    "config.data.places_per_batch": 8,
    "config.data.image_size": "(56,56)",
    "config.data.num_workers": 0,
    "config.eval.sets": "",
    "config.eval.at_start": False,
    "config.num_epochs": 2,
    "config.checkpoint.every_steps": 1,
    "config.log_every_steps": 1,
    **{f"config.model.{k}": v for k, v in TINY.items()},
  }
  o.update(extra)
  return [f"--{k}={v}" for k, v in o.items()]


def run_train(workdir, root, extra=(), **kw):
  cmd = (
    [
      sys.executable,
      os.path.join(REPO, "train.py"),
      "--config",
      os.path.join(REPO, "configs/demo.py"),
      "--workdir",
      str(workdir),
    ]
    + tiny_overrides(root, **kw)
    + list(extra)
  )
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  return cmd, env


def final_params(workdir):
  params, _, source = run_checkpoints.load_for_inference(str(workdir), which="latest")
  return optim.flatten(params), source["step"]


# ------------------------------------------------------------------------------ in-process
def _tiny_setup(devices, seed=0):
  model_cfg = salad_jax.ModelConfig(**TINY, num_trainable_blocks=2, micro_batch=0, dropout=0.3)
  params = salad_jax.init_params(model_cfg, jax.random.key(seed), image_size=56)
  mesh = sharding.make_mesh(devices)
  return (mesh,) + tiny_train_setup(model_cfg, params, mesh)


def _batch(i):
  return place_batch(i, padded_last=8 if i == 2 else 0)  # batch 2: a padded last batch of an epoch


def test_eight_devices_match_one_device_after_three_steps_and_compile_once():
  """Data-parallel over 8 devices = 1 device, up to float reduction order.

  Loss and first-step gradients agree to 1e-6. Params after 3 AdamW steps agree to 1e-6 except
  a handful of weights whose gradient sits at the float-noise floor: Adam divides such a
  gradient by its own magnitude, so a 1e-7 difference in reduction order becomes a step of up
  to ~lr/2 (the same happens between PyTorch DDP and one GPU). Measured: 8 of 1,059,081 weights.
  """
  assert jax.device_count() == 8
  out = {}
  for n in (1, 8):
    mesh, state, step = _tiny_setup(jax.devices()[:n])
    p0 = jax.tree.map(np.asarray, state["params"])
    losses, grad_norms = [], []
    for i in range(3):
      state, m = step(state, sharding.global_batch(_batch(i), mesh))
      losses.append(float(m["loss"]))
      grad_norms.append(float(m["grad_norm"]))
    assert step._cache_size() == 1  # three steps, one padded batch: a single compilation
    out[n] = (losses, grad_norms, optim.flatten(jax.tree.map(np.asarray, state["params"])), p0)
  np.testing.assert_allclose(out[8][0], out[1][0], rtol=1e-6)
  np.testing.assert_allclose(out[8][1][0], out[1][1][0], rtol=1e-6)  # first-step gradient norm
  lr = 6e-5
  noisy = 0
  for k, v in out[1][2].items():
    d = np.abs(out[8][2][k] - v)
    assert d.max() <= 0.5 * lr, k
    noisy += int((d > 1e-6).sum())
  assert noisy <= 20, noisy


def test_first_step_gradients_match_across_device_counts():
  grads = {}
  for n in (1, 8):
    mesh, state, _ = _tiny_setup(jax.devices()[:n])
    model_cfg = salad_jax.ModelConfig(**TINY, num_trainable_blocks=2, micro_batch=0, dropout=0.3)
    train, frozen = optim.split_trainable(state["params"], optim.default_freeze_regex(model_cfg))
    loss_fn = trainer.make_loss_fn(model_cfg, dict(alpha=1.0, beta=50.0, base=0.0, epsilon=0.1))
    b = sharding.global_batch(_batch(0), mesh)
    g = jax.jit(
      jax.grad(
        lambda t: loss_fn(t, frozen, b["images"], b["labels"], b["valid"], jax.random.PRNGKey(7))[0]
      )
    )(train)
    grads[n] = jax.tree.map(np.asarray, g)
  for k, v in grads[1].items():
    assert np.abs(grads[8][k] - v).max() <= 1e-6 * max(np.abs(v).max(), 1e-3), k


def test_batch_layout_pads_what_does_not_divide():
  """Any P x K on any device count: the paper's 60 x 4 needs no padding on 8 or 16 devices, 64
  devices get 16 padding entries, and places split over processes are padded whole."""
  mesh = sharding.make_mesh()
  lay = sharding.batch_layout(60, 4, mesh)
  assert (lay.local_images, lay.padding) == (240, 0)
  lay = sharding.batch_layout(7, 4, mesh)  # 28 images on 8 devices: 4 per device, 4 padding
  assert (lay.global_images, lay.padding) == (32, 4) and "4 of them padding" in lay.describe()
  lay = sharding.batch_layout(60, 4, sharding.make_mesh(jax.devices()[:1]))
  assert (lay.global_images, lay.padding) == (240, 0)
  padded = sharding.pad_batch(
    {
      "images": np.ones((28, 2, 2, 3), np.uint8),
      "labels": np.arange(28),
      "valid": np.ones(28, bool),
    },
    32,
  )
  assert padded["images"].shape == (32, 2, 2, 3) and not padded["images"][28:].any()
  assert (padded["labels"][28:] == -1).all() and not padded["valid"][28:].any()


def _tiny_config(gsv_root):
  import configs.demo as demo_cfg  # noqa: F401  (configs/ is importable from the repo root)

  cfg = demo_cfg.get_config()
  cfg.unlock()
  for k, v in TINY.items():
    cfg.model[k] = v
  cfg.data.source, cfg.data.root, cfg.data.cities = "folder", gsv_root, "Alpha,Beta"
  cfg.data.places_per_batch, cfg.data.image_size, cfg.data.num_workers = 8, (56, 56), 0
  cfg.eval.sets, cfg.eval.at_start = "", False
  return cfg


def test_nan_stops_with_the_step_and_keeps_the_last_good_checkpoint(gsv_root, tmp_path):
  cfg = _tiny_config(gsv_root)
  cfg.checkpoint.every_steps = 1
  cfg.optim.lr = 1e38  # the first update sends params to ~1e38: the next forward overflows
  with pytest.raises(
    metrics.NonFiniteError, match=r"at step (\d+).*last good checkpoint is step"
  ) as e:
    trainer.train_and_evaluate(cfg, str(tmp_path))
  bad_step = int(e.value.args[0].split("at step ")[1].split()[0])
  ckpt = checkpoint.TrainCheckpointer(str(tmp_path), read_only=True)
  assert ckpt.latest_step() == bad_step - 1  # nothing saved for the bad step
  params, _, _ = run_checkpoints.load_for_inference(str(tmp_path), which="latest")
  assert all(np.isfinite(v).all() for v in jax.tree.leaves(params))


def test_pending_metrics_name_the_first_non_finite_step():
  """Metrics are read back in batches: the error names the first bad step, not the one that read."""
  pending = metrics.PendingMetrics("/ckpt", last_saved=4)
  for step, ok in [(5, True), (6, False), (7, False)]:
    pending.add(
      step, {"loss": jax.numpy.float32(1.0 if ok else np.nan), "finite": jax.numpy.bool_(ok)}
    )
  with pytest.raises(
    metrics.NonFiniteError, match=r"at step 6 .*last good checkpoint is step 4 in /ckpt"
  ):
    pending.fetch()
  assert len(pending) == 0 and pending.fetches == 1
  pending.add(8, {"loss": jax.numpy.float32(2.0), "finite": jax.numpy.bool_(True)})
  assert pending.fetch() == (8, {"loss": 2.0})


def test_done_line_says_what_is_saved():
  from salad_jax.train.metrics import done_line

  r = {"step": 2, "saved_step": None, "evals": {}}
  assert done_line(r) == "done: step 2; no checkpoint saved"
  r = {
    "step": 88,
    "saved_step": 88,
    "best_step": 77,
    "checkpoint_dir": "/w/checkpoints",
    "evals": {77: {"R@1": 85.0}, 88: {"R@1": 76.666}},
  }
  assert done_line(r) == (
    "done: step 88; checkpoint of step 88 (R@1 76.67) in /w/checkpoints; "
    "best by R@1: step 77 (R@1 85.00)"
  )


def test_loop_reads_the_devices_only_at_sync_points_and_saves_at_the_stop_step(gsv_root, tmp_path):
  """22 places / 8 = 3 steps an epoch. Steps 2, 5 and 7 run without any device-to-host read (the
  per-step path runs under a transfer guard that forbids them); metrics are read after the first
  step, at the saves (epoch ends 3, 6) and logs (4), and at the stop step 8, which is saved."""
  cfg = _tiny_config(gsv_root)
  cfg.num_epochs, cfg.stop_after_steps, cfg.log_every_steps = 4, 8, 4
  cfg.checkpoint.every_steps, cfg.checkpoint.keep_last = 100, 5
  r = trainer.train_and_evaluate(cfg, str(tmp_path))
  assert r["step"] == 8
  assert checkpoint.TrainCheckpointer(str(tmp_path), read_only=True).manager.all_steps() == [
    3,
    6,
    8,
  ]
  assert r["saved_step"] == 8 and r["metric_fetches"] == 5  # after steps 1, 3, 4, 6, 8
  # compile_cache_dir=auto: programs compiled by the run in <workdir>/compile_cache (those this
  # test process compiled before are in jax's memory cache: not compiled again, not written)
  assert os.listdir(tmp_path / "compile_cache")
  assert jax.config.jax_compilation_cache_dir is None
  assert metrics.done_line(r) == f"done: step 8; checkpoint of step 8 in {tmp_path}/checkpoints"
  logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [x["step"] for x in logged] == [4, 8]
  for x in logged:
    assert np.isfinite(x["loss"]) and x["step_time"] > 0
    assert x["images_per_s"] == pytest.approx(32 / x["step_time"])


def test_time_based_saves_and_their_setting(monkeypatch):
  from salad_jax.train import config as config_lib

  clock = [100.0]
  monkeypatch.setattr(preemption.time, "monotonic", lambda: clock[0])
  timed = preemption.TimedSaves(60, log_every=10)
  assert not timed.due(1)
  clock[0] += 61
  assert timed.due(2)
  timed.saved()
  assert not timed.due(3)
  assert not preemption.TimedSaves(0, 10).due(1)  # 0 = off
  cfg = config_lib.base_config()
  cfg.checkpoint.every_secs = -1.0
  with pytest.raises(salad_jax.errors.UserError, match="checkpoint.every_secs"):
    config_lib.check(cfg)


def test_init_from_files_and_dirs(tmp_path):
  import torch

  from salad_jax.weights import convert

  import torch_reference as tr

  cfg = ml_collections.ConfigDict({"init": ""})
  model_cfg = salad_jax.ModelConfig(**TINY)
  # a DINOv2 hub file: the backbone, and a fresh head of config.model's shape
  tm = tr.randomize_(tr.VPRModel("Nano/14", m=64, l=128, g=256), seed=2)
  torch.save(tm.backbone.model.state_dict(), tmp_path / "dinov2.pth")
  cfg.init = str(tmp_path / "dinov2.pth")
  params = train_state.initial_params(cfg, model_cfg, jax.random.key(0))
  np.testing.assert_array_equal(
    params["backbone"]["blocks_1"]["attn"]["qkv"]["kernel"],
    tm.backbone.model.blocks[1].attn.qkv.weight.detach().numpy().T,
  )
  assert params["aggregator"]["score_3"]["kernel"].shape == (32, 8)
  # a SALAD file whose head does not fit config.model: the strict check names the keys
  torch.save(tm.state_dict(), tmp_path / "salad.ckpt")
  cfg.init = str(tmp_path / "salad.ckpt")
  with pytest.raises(convert.CheckpointMismatchError, match="aggregator.score.3.weight"):
    train_state.initial_params(cfg, model_cfg, jax.random.key(0))
  # a converted dir of another head size
  salad_jax.load(str(tmp_path / "salad.ckpt")).save(str(tmp_path / "conv"))
  cfg.init = str(tmp_path / "conv")
  with pytest.raises(ValueError, match="num_clusters: checkpoint 64, config 8"):
    train_state.initial_params(cfg, model_cfg, jax.random.key(0))
  assert train_state.initial_params(
    cfg,
    model_cfg.replace(num_clusters=64, cluster_dim=128, token_dim=256, hidden_dim=512),
    jax.random.key(0),
  )


@pytest.fixture
def sigterm(monkeypatch):
  """SIGTERM handled in this process as train.py handles it; `sigterm()` sends one to itself."""
  monkeypatch.setattr(preemption, "_cooperative", False)
  before = signal.signal(signal.SIGTERM, signal.SIG_DFL)
  preemption.clear()
  preemption.install()
  yield lambda: os.kill(os.getpid(), signal.SIGTERM)
  signal.signal(signal.SIGTERM, before)
  preemption.clear()


def test_sigterm_during_a_save_or_an_evaluation_saves_that_step(
  gsv_root, tmp_path, sigterm, monkeypatch
):
  """A real SIGTERM to this process while step 2 is being saved, then (resumed) while step 3
  is being evaluated: each time the step reached is saved and `Terminated` names it; the
  interrupted evaluation is skipped; resuming to the end gives the uninterrupted run's params."""
  from test_multiprocess import make_eval_folder

  from salad_jax.evaluation import descriptors

  make_eval_folder(str(tmp_path / "eval"))
  cfg = _tiny_config(gsv_root)
  cfg.eval.sets, cfg.eval.image_size, cfg.eval.batch_size = (
    f"folder:{tmp_path / 'eval'}",
    (56, 56),
    4,
  )
  cfg.num_epochs, cfg.log_every_steps, cfg.checkpoint.every_steps = 2, 1, 2  # epoch ends 3, 6
  cfg.compile_cache_dir = str(tmp_path / "cache")  # the runs below compile once
  want = optim.flatten(
    jax.tree.map(
      np.asarray, trainer.train_and_evaluate(cfg, str(tmp_path / "a"))["state"]["params"]
    )
  )

  wd = str(tmp_path / "b")
  save = checkpoint.TrainCheckpointer.save

  def save_with_sigterm(self, step, *args, **kw):
    if step == 2:
      sigterm()  # handled at once: the flag is set while the save runs
    return save(self, step, *args, **kw)

  monkeypatch.setattr(checkpoint.TrainCheckpointer, "save", save_with_sigterm)
  with pytest.raises(preemption.Terminated) as e:
    trainer.train_and_evaluate(cfg, wd)
  assert e.value.message == preemption.saved_message(2, f"{wd}/checkpoints")
  assert checkpoint.TrainCheckpointer(wd, read_only=True).manager.all_steps() == [2]
  monkeypatch.setattr(checkpoint.TrainCheckpointer, "save", save)
  preemption.clear()

  extract = descriptors.extract

  def extract_with_sigterm(*args, **kw):
    sigterm()
    return extract(*args, **kw)

  monkeypatch.setattr(descriptors, "extract", extract_with_sigterm)
  with pytest.raises(preemption.Terminated) as e:
    trainer.train_and_evaluate(cfg, wd)
  assert e.value.message == preemption.saved_message(3, f"{wd}/checkpoints")
  saved = checkpoint.TrainCheckpointer(wd, read_only=True)
  assert saved.manager.all_steps() == [2, 3] and saved.metric_of(3) is None  # not evaluated
  monkeypatch.setattr(descriptors, "extract", extract)
  preemption.clear()

  r = trainer.train_and_evaluate(cfg, wd)
  assert r["step"] == 6 and sorted(r["evals"]) == [6]
  got = optim.flatten(jax.tree.map(np.asarray, r["state"]["params"]))
  for k, v in want.items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)


# ------------------------------------------------------------------------------ subprocesses
@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  """One persistent compilation cache for the train.py runs of this module: the first run
  compiles, the others load its programs (config.compile_cache_dir)."""
  return str(tmp_path_factory.mktemp("compile_cache"))


@pytest.fixture(scope="module")
def straight(gsv_root, compile_cache, tmp_path_factory):
  """An uninterrupted 6-step train.py run: (workdir, flat final params, last step)."""
  workdir = tmp_path_factory.mktemp("straight")
  cmd, env = run_train(workdir, gsv_root, **{"config.compile_cache_dir": compile_cache})
  r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert os.listdir(compile_cache) and not (workdir / "compile_cache").exists()
  want, last = final_params(workdir)
  return workdir, want, last


def test_kill_and_resume_equals_the_uninterrupted_run(gsv_root, straight, compile_cache, tmp_path):
  workdir, want, last = straight
  cfg = json.loads((workdir / "config.json").read_text())
  assert cfg["data"]["places_per_batch"] == 8 and cfg["model"]["variant"] == "Nano/14"  # overrides

  cmd, env = run_train(tmp_path / "killed", gsv_root, **{"config.compile_cache_dir": compile_cache})
  proc = subprocess.Popen(
    cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO
  )
  target = tmp_path / "killed" / "checkpoints" / "2"
  t0 = time.time()
  while not target.exists() and proc.poll() is None and time.time() - t0 < 300:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)  # no chance to clean up: a real crash
  proc.wait()
  steps = sorted(int(d) for d in os.listdir(tmp_path / "killed" / "checkpoints") if d.isdigit())
  assert 2 in steps and steps[-1] < last, steps
  r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"resumed from step {steps[-1]}" in r.stdout
  got, got_last = final_params(tmp_path / "killed")
  assert got_last == last
  for k, v in want.items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)


def _terminated_lines(stderr):
  return [ln for ln in stderr.splitlines() if ln.startswith("terminated (SIGTERM)")]


def test_sigterm_saves_the_step_reached_and_resume_equals_the_uninterrupted_run(
  gsv_root, straight, compile_cache, tmp_path
):
  """Two SIGTERMs 0.3 s apart right after the first step's log line: one line naming the saved
  step, exit 143, no traceback (it used to end in segmentation faults); the rerun resumes from
  that step to the uninterrupted run's params."""
  _, want, last = straight
  wd = tmp_path / "termed"
  cmd, env = run_train(wd, gsv_root, **{"config.compile_cache_dir": compile_cache})
  proc = subprocess.Popen(
    cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO
  )
  for line in proc.stdout:
    if line.startswith("step 1/"):
      proc.send_signal(signal.SIGTERM)
      time.sleep(0.3)
      proc.send_signal(signal.SIGTERM)
      break
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, err[-3000:]
  (line,) = _terminated_lines(err)
  assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
  saved = int(line.split("saved step ")[1].split()[0])
  assert line == (
    f"terminated (SIGTERM): saved step {saved} in {wd}/checkpoints; rerun the same command "
    "to resume"
  )
  assert 1 <= saved < last
  kept = os.listdir(wd / "checkpoints")
  assert str(saved) in kept and not [d for d in kept if "tmp" in d], kept  # complete
  assert not (wd / ".lock").exists()
  r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"resumed from step {saved}" in r.stdout
  got, got_last = final_params(wd)
  assert got_last == last
  for k, v in want.items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_sigterm_during_start_up_saves_nothing(gsv_root, compile_cache, tmp_path):
  wd = tmp_path / "early"
  cmd, env = run_train(wd, gsv_root, **{"config.compile_cache_dir": compile_cache})
  proc = subprocess.Popen(
    cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO
  )
  time.sleep(3)  # importing jax: long before the first step
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, err[-3000:]
  assert _terminated_lines(err) == [
    "terminated (SIGTERM) before the first step; nothing to save"
  ], err[-3000:]
  assert "Traceback" not in err
  assert not (wd / "checkpoints").exists() or not os.listdir(wd / "checkpoints")
  assert not (wd / ".lock").exists()


def test_bad_override_is_rejected(gsv_root, tmp_path):
  cmd, env = run_train(tmp_path / "w", gsv_root, extra=["--config.optim.not_a_field=1"])
  r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
  assert r.returncode != 0 and "not_a_field" in r.stderr


def test_gsv_recipe_without_the_dataset_says_where_to_get_it(tmp_path):
  cmd = [
    sys.executable,
    os.path.join(REPO, "train.py"),
    "--config",
    os.path.join(REPO, "configs/gsv.py"),
    "--workdir",
    str(tmp_path / "w"),
    f"--config.data.root={tmp_path / 'GSVCities'}",
  ]
  r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
  assert r.returncode != 0
  assert "GSV-Cities root" in r.stderr and "kaggle.com/datasets/amaralibey/gsv-cities" in r.stderr
  assert not (tmp_path / "w").exists()  # stopped before writing or compiling anything
