"""Any device count trains the same numbers: the paper's 60 places x 4 images on 8 and 16 devices
(no whole-places-per-device rule) and a padded, shuffled batch, against one device. The demo's tiny ViT with dropout on: each example's dropout mask
is keyed by its id, not by its position in the global batch."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import salad_jax
from salad_jax import sharding
from salad_jax.train import config as config_lib

from helpers import tiny_optim_config, tiny_train_setup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HW = 70  # 5 x 5 patches > the demo head's 16 clusters
STEPS = 2


def demo_model_config():
  from configs import demo

  cfg = dict(demo.get_config().model)
  cfg["micro_batch"] = cfg["train_micro_batch"] = 0  # one program shape for any device count
  model_cfg = salad_jax.ModelConfig.from_dict(cfg)
  assert model_cfg.variant == "Nano/14" and model_cfg.dropout == 0.3
  return model_cfg


def batches(places, k, steps=STEPS, hw=HW):
  """Batches of `places` x `k` noisy views of a colour per place, with each example's id."""
  out = []
  for i in range(steps):
    rng = np.random.default_rng(i)
    base = rng.integers(0, 256, (places, 1, hw // 7, hw // 7, 3)).repeat(7, 2).repeat(7, 3)
    noise = rng.integers(-40, 40, (places, k, hw, hw, 3))
    images = np.clip(base + noise, 0, 255).astype(np.uint8).reshape(places * k, hw, hw, 3)
    out.append(
      {
        "images": images,
        "labels": np.repeat(np.arange(places) + 100 * i, k).astype(np.int32),
        "valid": np.ones(places * k, bool),
        "ids": np.arange(places * k, dtype=np.int32),
      }
    )
  return out


def losses_on(devices, steps=STEPS):
  """Losses on `devices` of `steps` train steps of the paper's 60 x 4, then of 59 x 4 (padded to
  240 entries: 4 padding entries) in a shuffled order (the padding anywhere, every example at
  another position: nothing may depend on positions). One program for both."""
  from salad_jax.train import optim
  from salad_jax.train import state as train_state

  model_cfg = demo_model_config()
  params = salad_jax.init_params(model_cfg, jax.random.key(0), image_size=HW)
  mesh = sharding.make_mesh(devices)
  layout = sharding.batch_layout(60, 4, mesh)
  _, step = tiny_train_setup(model_cfg, params, mesh)
  tx, _ = optim.make_optimizer(tiny_optim_config(), steps_per_epoch=2)
  freeze = optim.default_freeze_regex(model_cfg)
  out = {}
  for places, shuffle in ((60, False), (59, True)):
    state = train_state.create_state(params, tx, freeze, mesh, jax.random.PRNGKey(1))
    out[places] = []
    for i, b in enumerate(batches(places, 4, steps)):
      b = sharding.pad_batch(b, 240)
      if shuffle and len(devices) > 1:
        perm = np.random.default_rng(100 + i).permutation(240)
        b = {key: v[perm] for key, v in b.items()}
      state, m = step(state, sharding.global_batch(b, mesh))
      out[places].append(float(m["loss"]))
  assert step._cache_size() == 1
  return out, layout


def _in_subprocess(n):
  """`losses_on` all of `n` CPU devices, in a fresh process."""
  code = (
    "import json, sys; sys.path.insert(0, 'tests'); import jax\n"
    "from test_device_counts import losses_on\n"
    "losses, lay = losses_on(jax.devices())\n"
    "print(json.dumps({'devices': jax.device_count(), 'losses': losses, "
    "'padding': lay.padding, 'per_device': lay.global_images // lay.num_devices}))\n"
  )
  env = dict(
    os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu"
  )
  return subprocess.Popen(
    [sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
  )


def test_the_papers_batch_on_8_and_16_devices_equals_one_device():
  """configs/gsv.py's 60 x 4 is accepted on 8 and 16 devices (30 and 15 images per device, no
  rule about whole places); the losses of 2 steps equal one device's, and so do those of a
  padded, shuffled batch."""
  from configs import gsv

  cfg = gsv.get_config()
  config_lib.check(cfg)
  assert (cfg.data.places_per_batch, cfg.data.img_per_place) == (60, 4)
  sixteen = _in_subprocess(16)  # runs while this process computes
  try:
    one, _ = losses_on(jax.devices()[:1])
    eight, lay = losses_on(jax.devices())
    assert lay.padding == 0 and lay.local_images == 240
    out, _ = sixteen.communicate(timeout=900)
  finally:
    sixteen.kill()
  assert sixteen.returncode == 0
  got = json.loads(out.strip().splitlines()[-1])
  assert (got["devices"], got["padding"], got["per_device"]) == (16, 0, 15)
  for places in ("60", "59"):
    ref = one[int(places)]
    assert all(np.isfinite(ref)) and len(set(ref)) == STEPS, ref  # different steps
    np.testing.assert_allclose(eight[int(places)], ref, rtol=2e-4)
    np.testing.assert_allclose(got["losses"][places], ref, rtol=2e-4)


def test_dropout_masks_follow_the_example_not_its_position():
  from salad_jax.models.salad import example_dropout

  x = jax.numpy.ones((4, 5, 16))
  key = jax.random.key(3)
  a = example_dropout(x, 0.3, key, jax.numpy.arange(4))
  b = example_dropout(x[::-1], 0.3, key, jax.numpy.arange(4)[::-1])
  np.testing.assert_array_equal(np.asarray(b), np.asarray(a)[::-1])
  kept = float((np.asarray(a) > 0).mean())
  assert 0.55 < kept < 0.85 and np.allclose(np.asarray(a)[np.asarray(a) > 0], 1 / 0.7)
  assert not np.array_equal(np.asarray(a[0]), np.asarray(a[1]))  # each example its own mask


@pytest.mark.parametrize("places,procs,local", [(60, 8, 8), (5, 2, 3), (7, 1, 7)])
def test_processes_load_whole_places_padded_alike(places, procs, local):
  from salad_jax.data.pipeline import TrainSpec

  specs = [TrainSpec(100, places, 4, i, procs) for i in range(procs)]
  assert all(s.local_places == local for s in specs)
  seen = []
  for s in specs:
    for j in range(local):
      _, pos, q = s.global_position(j)
      if q >= 0:
        seen.append(q)
  assert sorted(seen) == list(range(places))  # every place of the step once, on one process
