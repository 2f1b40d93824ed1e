"""Training checkpoints: checksums, falling back from damaged ones, and keeping those aside."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import salad_jax
from salad_jax.errors import UserError
from salad_jax.train import checkpoint, metrics
from salad_jax.weights import run_checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(step, shape=(128, 128)):
  rng = np.random.default_rng(step)  # random floats: stored raw, so a flipped byte decodes silently
  state = {
    "params": {
      "head": {"kernel": rng.standard_normal(shape).astype(np.float32)},
      "bias": rng.standard_normal(7).astype(np.float32),
    },
    "opt": {"mu": np.full(7, step, np.float32)},
    "step": np.int32(step),
  }
  return jax.device_put(state)


def _save(workdir, steps, **kw):
  ck = checkpoint.TrainCheckpointer(str(workdir), **kw)
  for s in steps:
    ck.save(s, _state(s), {"step": s})
  ck.close()


def _largest_file(d):
  files = [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs]
  return max(files, key=os.path.getsize)


def _flip_byte(path):
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0x10
  open(path, "wb").write(data)


def _restore(workdir, keep_last=3):
  ck = checkpoint.TrainCheckpointer(str(workdir), keep_last=keep_last)
  return ck, ck.restore_latest(checkpoint.abstract_like(_state(0)))


def test_saved_meta_holds_the_params_checksum_and_restore_verifies_it(tmp_path):
  _save(tmp_path, [1])
  meta = json.load(open(tmp_path / "checkpoints" / "1" / "meta" / "metadata"))
  assert meta["params_checksum"].startswith("sum32:")
  ck, (step, state, _) = _restore(tmp_path)
  assert step == 1
  np.testing.assert_array_equal(
    state["params"]["head"]["kernel"], _state(1)["params"]["head"]["kernel"]
  )
  ck.close()


def test_damaged_newest_checkpoints_fall_back_and_are_kept_aside(tmp_path, capsys):
  _save(tmp_path, [1, 2, 3])
  ckpts = tmp_path / "checkpoints"
  os.remove(_largest_file(ckpts / "3" / "params"))  # a real partial deletion
  _flip_byte(_largest_file(ckpts / "2" / "params"))  # reads fine, wrong values: the checksum tells
  ck, (step, state, meta) = _restore(tmp_path)
  out = capsys.readouterr().out
  assert step == 1 and meta["step"] == 1
  np.testing.assert_array_equal(
    state["params"]["head"]["kernel"], _state(1)["params"]["head"]["kernel"]
  )
  lines = [ln for ln in out.splitlines() if "cannot be restored" in ln]
  assert len(lines) == 2 and all("resuming from step 1" in ln for ln in lines)
  assert "step 2 cannot be restored (CorruptCheckpointError" in out and "checksum" in out
  aside = sorted(os.listdir(tmp_path / "damaged_checkpoints"))
  assert [a.split("-")[0] for a in aside] == ["2", "3"]
  assert ck.manager.all_steps() == [1]  # Orbax no longer sees them
  for s in range(2, 7):  # retention (keep_last=3) deletes old steps, never the damaged ones
    ck.save(s, _state(s), {"step": s})
  ck.close()
  assert sorted(os.listdir(ckpts)) == ["4", "5", "6"]
  assert sorted(os.listdir(tmp_path / "damaged_checkpoints")) == aside
  assert os.path.isdir(tmp_path / "damaged_checkpoints" / aside[0] / "params")


def test_when_no_checkpoint_restores_nothing_is_moved(tmp_path):
  _save(tmp_path, [1])
  os.remove(_largest_file(tmp_path / "checkpoints" / "1" / "params"))
  with pytest.raises(
    UserError, match=r"no checkpoint in .* can be restored \(step 1: .*nothing was moved"
  ):
    _restore(tmp_path)
  assert os.path.isdir(tmp_path / "checkpoints" / "1")
  assert not os.path.exists(tmp_path / "damaged_checkpoints")


def test_other_param_shapes_are_a_config_error_not_damage(tmp_path):
  _save(tmp_path, [1, 2])
  ck = checkpoint.TrainCheckpointer(str(tmp_path))
  with pytest.raises(
    UserError,
    match=r"other shapes than the model.*head.*kernel.*checkpoint \(128, 128\), model \(64, 128\)",
  ):
    ck.restore_latest(checkpoint.abstract_like(_state(0, shape=(64, 128))))
  ck.close()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]


def test_checkpoint_without_checksum_still_restores(tmp_path):
  _save(tmp_path, [1])
  path = tmp_path / "checkpoints" / "1" / "meta" / "metadata"
  meta = json.load(open(path))
  del meta["params_checksum"]  # as written before checksums were recorded
  json.dump(meta, open(path, "w"))
  ck, (step, _, _) = _restore(tmp_path)
  assert step == 1
  ck.close()


def test_inference_load_names_a_corrupt_or_damaged_step(tmp_path):
  _save(tmp_path, [1, 2])
  _flip_byte(_largest_file(tmp_path / "checkpoints" / "2" / "params"))
  with pytest.raises(
    UserError, match=r"checkpoints/2 is corrupt: its params do not match the checksum"
  ):
    run_checkpoints.load_for_inference(str(tmp_path), which="latest")
  os.remove(_largest_file(tmp_path / "checkpoints" / "1" / "params"))
  with pytest.raises(UserError, match=r"checkpoints/1 cannot be read \(.*\): it is damaged") as e:
    run_checkpoints.load_for_inference(str(tmp_path / "checkpoints" / "1"))
  assert "checkpoints/2" in e.value.hint  # points to another step


def test_the_best_checkpoint_survives_a_resume_and_is_named(tmp_path):
  """Metrics are on disk: a resumed run still keeps (and names) the best checkpoint by R@1."""
  ck = checkpoint.TrainCheckpointer(str(tmp_path), keep_last=2, keep_best=1)
  for s, r1 in [(1, 10.0), (2, 90.0), (3, 20.0)]:
    ck.save(s, _state(s), {"step": s}, metrics={"R@1": r1})
  ck.close()
  ck = checkpoint.TrainCheckpointer(str(tmp_path), keep_last=2, keep_best=1)  # the resume
  for s, r1 in [(4, 30.0), (5, None), (6, 40.0)]:
    ck.save(s, _state(s), {"step": s}, metrics=None if r1 is None else {"R@1": r1})
  ck.wait()
  assert ck.manager.all_steps() == [2, 5, 6] and ck.best_step() == 2
  ck.close()


ORPHANS = r"""
import asyncio, gc, os, sys, types
import orbax.checkpoint as ocp
from salad_jax.weights import orbax_reads

@types.coroutine
def _suspend():
  yield

SRC = '''
async def read(suspend):  # like an Orbax read that fails when its restore is abandoned
  try:
    await suspend()
  except BaseException:
    raise Exception("Encountered error while reading array index")
async def fail():
  raise Exception("Encountered error while reading array index")
'''
def defined_in(path):
  ns = {}
  exec(compile(SRC, path, "exec"), ns)
  return ns

orbax_reads.quiet_orphaned_reads()
orbax, other = defined_in(os.path.join(os.path.dirname(ocp.__file__), "_src", "x.py")), defined_in("mine.py")
for ns in (orbax, other):
  coro = ns["read"](_suspend)
  coro.send(None)
  del coro  # collected suspended: close() makes it raise -> sys.unraisablehook
  gc.collect()
  loop = asyncio.new_event_loop()
  task = loop.create_task(ns["fail"]())
  loop.run_until_complete(asyncio.sleep(0))
  loop.close()
  del task  # its exception never retrieved -> the asyncio logger
  gc.collect()
  print("--", file=sys.stderr, flush=True)
"""


def test_orphaned_orbax_reads_of_a_failed_restore_are_quiet_and_nothing_else_is(tmp_path):
  # the CI failure: a restore of a damaged checkpoint left ~60 such reports (135 KB of stderr),
  # which filled a pipe and blocked a process of a 2-process run
  script = tmp_path / "orphans.py"
  script.write_text(ORPHANS)
  r = subprocess.run(
    [sys.executable, str(script)],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=REPO,
    env=dict(os.environ, PYTHONPATH=REPO),
  )
  assert r.returncode == 0, r.stderr[-2000:]
  orbax, other, _ = r.stderr.split("--\n")
  assert orbax == "", orbax[:2000]
  assert "Exception ignored" in other and "mine.py" in other  # the same from other code is shown
  assert "Task exception was never retrieved" in other


# ------------------------------------------------------------ best under each eval settings
def _scored(step, r1, settings):
  text = f"R@1 on eval, positives within {settings} m, 112x112"
  return run_checkpoints.Scored(step, r1, settings and f"fp{settings}", text if settings else "")


def test_recalls_under_other_eval_settings_are_never_ranked_together():
  # the run: steps 66, 77 at 25 m (77 best), resumed at 5000 m: 88, 99 (a tie)
  found = [_scored(66, 60.0, 25), _scored(77, 85.0, 25), _scored(88, 100.0, 5000)]
  found.append(_scored(99, 100.0, 5000))
  best, others = run_checkpoints.rank(found)
  assert (best.step, [c.step for c in others]) == (99, [77])  # ties: the later step
  assert run_checkpoints.best_per_settings(found, 1) == {77, 99}
  assert run_checkpoints.best_per_settings(found, 2) == {66, 77, 88, 99}
  best, others = run_checkpoints.rank(found + [_scored(110, 70.0, 25)])  # back at 25 m
  assert (best.step, [c.step for c in others]) == (77, [99])
  legacy = [_scored(5, 90.0, None), _scored(6, 10.0, 25)]  # settings not recorded: apart
  assert run_checkpoints.rank(legacy)[0].step == 6
  assert run_checkpoints.best_per_settings(legacy, 1) == {5, 6}
  line = metrics.done_line(
    {
      "step": 99,
      "saved_step": 99,
      "best_step": 99,
      "best_settings": "R@1 on eval, positives within 5000 m, 112x112",
      "other_bests": [found[1]],
      "checkpoint_dir": "/w/checkpoints",
      "evals": {99: {"R@1": 100.0}},
    }
  )
  assert line == (
    "done: step 99; checkpoint of step 99 (R@1 100.00) in /w/checkpoints; best by R@1 "
    "(R@1 on eval, positives within 5000 m, 112x112): step 99 (R@1 100.00); kept step 77 "
    "(R@1 85.00), the best under earlier eval settings (R@1 on eval, positives within 25 m, "
    "112x112)"
  )


@pytest.fixture(scope="module")
def short_run_data(tmp_path_factory):
  """GSV-Cities of 16 places (2 steps an epoch at 8 places) and a UTM folder set whose places
  lie 100 m apart: R@1 is a real measure at 25 m and 100 at 5000 m."""
  from PIL import Image

  from helpers import make_gsv

  root = tmp_path_factory.mktemp("short_run")
  make_gsv(str(root / "gsv"), {"Alpha": [4] * 8, "Beta": [4] * 8}, size=(32, 32))
  rng = np.random.default_rng(0)
  for p, colour in enumerate(rng.integers(0, 256, (6, 3))):
    for folder, names in (("database", ["a", "b"]), ("queries", ["q"])):
      for k, n in enumerate(names):
        img = np.clip(colour + rng.integers(-40, 40, (56, 56, 3)), 0, 255).astype(np.uint8)
        os.makedirs(root / "eval" / folder, exist_ok=True)
        Image.fromarray(img).save(root / "eval" / folder / f"@{100 * p + 3 * k}@0@{n}{p}@.jpg")
  return root


def _short_demo(workdir, data, init, *overrides):
  """train.py on the demo config, shrunk: the tiny model (shared fixture) as init, 2 steps an
  epoch at 56x56, one checkpoint kept besides the best. A persistent compilation cache makes
  the resumed run skip most compiles."""
  o = {
    "model.num_clusters": 8,
    "model.cluster_dim": 16,
    "model.token_dim": 16,
    "model.hidden_dim": 32,
    "model.num_trainable_blocks": 1,
    "init": init,
    "data.source": "folder",
    "data.root": data / "gsv",
    "data.cities": "Alpha,Beta",
    "data.places_per_batch": 8,
    "data.image_size": "(56,56)",
    "eval.sets": f"folder:{data / 'eval'}",
    "eval.image_size": "(56,56)",
    "eval.at_start": False,
    "checkpoint.keep_last": 1,
    "checkpoint.every_steps": 100,
  }
  cmd = [sys.executable, os.path.join(REPO, "train.py"), "--config", f"{REPO}/configs/demo.py"]
  cmd += ["--workdir", str(workdir)] + [f"--config.{k}={v}" for k, v in o.items()]
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=1",
    JAX_COMPILATION_CACHE_DIR=str(data / "jax_cache"),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )
  r = subprocess.run(
    cmd + list(overrides), capture_output=True, text=True, cwd=REPO, env=env, timeout=600
  )
  assert r.returncode == 0, r.stderr[-3000:]
  return r.stdout


def test_a_resume_under_another_threshold_keeps_the_best_and_all_agree(
  short_run_data, tiny_model_dir, tmp_path
):
  """The demo resumed with --config.eval.positive_dist_threshold=5000 (an allowed change)
  deleted the best checkpoint at 25 m (R@1 at 5000 m "beat" it); the last line and
  salad_jax.load then named two other steps."""
  workdir = tmp_path / "run"
  out = _short_demo(workdir, short_run_data, tiny_model_dir, "--config.num_epochs=1")
  r1_25 = float(out.split("checkpoint of step 2 (R@1 ")[1].split(")")[0])
  out = _short_demo(
    workdir,
    short_run_data,
    tiny_model_dir,
    "--config.num_epochs=2",
    "--config.eval.positive_dist_threshold=5000",
  )
  assert "note: the eval settings changed (R@1 on eval, positives within 5000 m, 56x56)" in out
  assert f"(step 2: R@1 on eval, positives within 25 m, 56x56, R@1 {r1_25:.2f})" in out
  ck = checkpoint.TrainCheckpointer(str(workdir), read_only=True)
  assert ck.manager.all_steps() == [2, 4]  # the best at 25 m survived
  settings = {s: ck.manager.metrics(s)[run_checkpoints.SETTINGS] for s in (2, 4)}
  assert settings[2] != settings[4]
  last = out.strip().splitlines()[-1]
  assert last == (
    f"done: step 4; checkpoint of step 4 (R@1 100.00) in {workdir}/checkpoints; best by R@1 "
    "(R@1 on eval, positives within 5000 m, 56x56): step 4 (R@1 100.00); kept step 2 "
    f"(R@1 {r1_25:.2f}), the best under earlier eval settings (R@1 on eval, positives within "
    "25 m, 56x56)"
  )
  model = salad_jax.load(str(workdir))  # picks what the last line names
  assert model.source["step"] == 4
  assert model.source["eval_settings"]["positive_dist_threshold"] == 5000.0
