"""FSDP on 8 CPU devices: fsdp=1/4/8 train alike, checkpoints move between layouts, bad layouts
are clear errors before anything compiles."""

import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

import salad_jax
from salad_jax import errors, sharding
from salad_jax.train import checkpoint, optim
from salad_jax.train import state as train_state

from helpers import place_batch, random_params, tiny_train_setup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(
  variant="Nano/14",
  num_clusters=8,
  cluster_dim=16,
  token_dim=16,
  hidden_dim=32,
  num_trainable_blocks=2,
  micro_batch=0,
  train_micro_batch=0,
  dropout=0.3,
)
LR = 6e-5


def _optimizer():
  cfg = ml_collections.ConfigDict(
    dict(
      lr=LR,
      weight_decay=9.5e-9,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      lr_start_factor=1.0,
      lr_end_factor=0.2,
      lr_total_iters=10,
      lightning_epoch_step=True,
      freeze="auto",
    )
  )
  return optim.make_optimizer(cfg, steps_per_epoch=2)


def _setup(fsdp, params):
  mesh = sharding.make_mesh(fsdp=fsdp)
  return (mesh,) + tiny_train_setup(salad_jax.ModelConfig(**TINY), params, mesh)


def _batch(i):
  return place_batch(i)


@pytest.fixture(scope="module")
def runs():
  """3 steps under fsdp = 1, 4, 8 from the same params: losses, final state per layout."""
  assert jax.device_count() == 8
  params = random_params(salad_jax.ModelConfig(**TINY))
  out = {}
  for fsdp in (1, 4, 8):
    mesh, state, step = _setup(fsdp, params)
    losses = []
    for i in range(3):
      state, m = step(state, sharding.global_batch(_batch(i), mesh))
      losses.append(float(m["loss"]))
    assert step._cache_size() == 1
    out[fsdp] = (losses, state, mesh)
  return out


def test_fsdp_layouts_give_the_same_losses_and_params(runs):
  kernel = "backbone/blocks_3/mlp/fc1/kernel"  # 128 x 512: sharded on its 512 dim
  for fsdp in (4, 8):
    losses, state, _ = runs[fsdp]
    np.testing.assert_allclose(losses, runs[1][0], rtol=1e-5, atol=1e-7)
    # really sharded: each device holds 1/fsdp of the weight and of its Adam moments
    leaf = optim.flatten(state["params"])[kernel]
    assert leaf.sharding.spec == jax.sharding.PartitionSpec(None, sharding.FSDP)
    assert leaf.addressable_shards[0].data.shape == (128, 512 // fsdp)
    assert state["opt"][0].mu[kernel].addressable_shards[0].data.shape == (128, 512 // fsdp)
    # params: equal up to float reduction order, which AdamW can amplify to O(lr) for weights
    # whose gradient sits at the noise floor (tests/test_trainer.py); a wrong update moves all
    want = optim.flatten(jax.tree.map(np.asarray, runs[1][1]["params"]))
    got = optim.flatten(jax.tree.map(np.asarray, state["params"]))
    noisy = total = 0
    for k, v in want.items():
      d = np.abs(got[k] - v)
      assert d.max() <= 0.5 * LR, k
      noisy += int((d > 1e-6).sum())
      total += d.size
    assert noisy <= 1e-4 * total, (noisy, total)


@pytest.fixture(scope="module")
def saved(runs, tmp_path_factory):
  """A checkpoint dir with the fsdp=1 state at step 1 and the fsdp=8 state at step 8."""
  ckpt = checkpoint.TrainCheckpointer(str(tmp_path_factory.mktemp("ckpt")))
  meta = {"model": salad_jax.ModelConfig(**TINY).to_dict()}
  for fsdp in (1, 8):
    ckpt.save(fsdp, runs[fsdp][1], {**meta, "step": fsdp})
  ckpt.wait()
  yield ckpt
  ckpt.close()


def test_checkpoint_restores_under_another_layout(runs, saved):
  for src, dst in ((1, 8), (8, 1)):
    target = checkpoint.abstract_like(runs[dst][1])  # a state in the other layout
    restored, meta = saved.restore(src, target, model=salad_jax.ModelConfig(**TINY).to_dict())
    assert meta["step"] == src
    for a, b, t in zip(
      jax.tree.leaves(restored), jax.tree.leaves(runs[src][1]), jax.tree.leaves(target)
    ):
      assert a.sharding == t.sharding  # the new layout
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_checkpoint_of_another_model_size_is_a_clear_error(runs, saved):
  bigger = salad_jax.ModelConfig(**{**TINY, "cluster_dim": 32})
  tx, _ = _optimizer()
  shapes = train_state.abstract_state(bigger, tx, optim.default_freeze_regex(bigger))
  target = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    shapes,
    train_state.state_shardings(shapes, runs[8][2]),
  )
  with pytest.raises(errors.UserError, match="cluster_dim=32") as e:
    saved.restore(1, target, model=bigger.to_dict())
  assert "--workdir" in str(e.value)
  assert sorted(os.listdir(saved.directory)) == ["1", "8"]  # nothing lost


def test_bad_layouts_are_clear_errors():
  with pytest.raises(errors.UserError, match=r"config.mesh.fsdp=3 does not divide the 8 device"):
    sharding.make_mesh(fsdp=3)
  mesh = sharding.make_mesh(fsdp=4)  # any batch splits over data x fsdp (padded where needed)
  assert sharding.batch_layout(61, 4, mesh).global_images == 248


def test_sharding_rules_pick_the_largest_dividing_dim():
  mesh = sharding.make_mesh(fsdp=8)
  tree = {
    "a": np.zeros((768, 3072)),
    "b": np.zeros((1370, 768)),
    "c": np.zeros((768,)),
    "d": np.zeros((1369, 1371)),
  }
  sh = sharding.tree_shardings(tree, mesh)
  P = jax.sharding.PartitionSpec
  assert sh["a"].spec == P(None, "fsdp") and sh["b"].spec == P(None, "fsdp")
  assert sh["c"].spec == P() and sh["d"].spec == P()  # too small; nothing divides
  rules = ((r"^b$", "replicate"), (r".*", "fsdp"))
  assert sharding.tree_shardings(tree, mesh, rules)["b"].spec == P()


def test_train_py_with_an_fsdp_that_does_not_divide_stops_before_compiling(tmp_path):
  cmd = [
    sys.executable,
    os.path.join(REPO, "train.py"),
    "--config",
    os.path.join(REPO, "configs/demo.py"),
    "--workdir",
    str(tmp_path / "w"),
    "--config.mesh.fsdp=3",
    f"--config.data.root={tmp_path / 'demo'}",
  ]
  r = subprocess.run(
    cmd,
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=300,
    env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8"),
  )
  assert r.returncode == 2, r.stderr[-2000:]
  assert "Traceback" not in r.stderr
  assert "config.mesh.fsdp=3 does not divide the 8 device" in r.stderr
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_evaluation_takes_fsdp_sharded_params(runs):
  """The epoch-end evaluator gets the train state's params as they are (sharded under fsdp)."""
  from salad_jax.evaluation import descriptors

  model_cfg = salad_jax.ModelConfig(**TINY)
  images = _batch(5)["images"][:8]
  out = {}
  for fsdp in (1, 8):
    _, state, mesh = runs[fsdp]
    x = sharding.global_batch({"images": images}, mesh)["images"]
    out[fsdp] = np.asarray(descriptors.make_describe(model_cfg, mesh)(state["params"], x))
  np.testing.assert_allclose(out[8], out[1], atol=1e-4)  # params equal up to AdamW float noise
