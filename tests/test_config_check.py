"""train.py's settings: each value that cannot train or evaluate as asked is one error naming the
setting, before anything is generated, written or compiled (a zero step count used to crash after
a step, a bad eval size after a whole epoch, a negative lr trained without a word)."""

import pytest

from salad_jax.errors import UserError
from salad_jax.train import config

import configs.demo
import configs.gsv

# (setting, value, words in the error)
BAD = [
  ("num_epochs", -1, ["config.num_epochs = -1", ">= 1"]),
  ("log_every_steps", 0, ["config.log_every_steps = 0"]),
  ("stop_after_steps", -2, ["config.stop_after_steps"]),
  ("mesh.fsdp", 0, ["config.mesh.fsdp = 0"]),
  ("data.places_per_batch", 1, ["negatives"]),
  ("data.places_per_batch", 0, ["negatives"]),
  ("data.img_per_place", 1, ["positives"]),
  ("data.img_per_place", 5, ["config.data.min_img_per_place = 4", ">= data.img_per_place (5)"]),
  ("data.image_size", (7,), ["two integers"]),
  ("data.image_size", (113, 112), ["multiples of 14"]),
  ("data.image_size", (14, 14), ["patches", "clusters"]),
  ("data.num_workers", -1, ["config.data.num_workers"]),
  ("data.num_threads", 0, ["config.data.num_threads"]),
  ("model.num_clusters", 0, ["config.model.num_clusters = 0"]),
  ("model.token_dim", 0, ["config.model.token_dim = 0"]),
  ("model.dropout", 1.0, ["[0, 1)"]),
  ("optim.lr", -1.0, ["config.optim.lr = -1.0", "> 0"]),
  ("optim.lr", float("nan"), ["config.optim.lr"]),
  ("optim.weight_decay", -1.0, ["config.optim.weight_decay"]),
  ("optim.eps", 0.0, ["config.optim.eps"]),
  ("optim.b2", 1.0, ["[0, 1)"]),
  ("optim.lr_total_iters", 0, ["config.optim.lr_total_iters = 0"]),
  ("optim.lr_end_factor", 2.0, ["[0, 1]"]),
  ("optim.freeze", "[", ["not a valid regex"]),
  ("loss.beta", -1.0, ["config.loss.beta"]),
  ("eval.image_size", (7, 7), ["config.eval.image_size", "multiples of 14"]),
  ("eval.batch_size", 0, ["config.eval.batch_size = 0"]),
  ("eval.positive_dist_threshold", -1.0, ["metres"]),
  ("eval.search", "foo", ["'faiss' or 'jax'"]),
  ("eval.recall_values", (5, 0), ["K must be a positive integer"]),
  ("checkpoint.every_steps", 0, ["config.checkpoint.every_steps = 0"]),
  ("checkpoint.keep_last", 0, ["config.checkpoint.keep_last = 0", "resumes from"]),
  ("checkpoint.keep_best", -1, ["config.checkpoint.keep_best = -1"]),
  ("num_epochs", True, ["config.num_epochs = True"]),
  ("seed", -1, ["config.seed = -1"]),
  ("data.cities", "DemoNorth,DemoNorth", ["lists DemoNorth more than once"]),
]


def _set(cfg, key, value):
  *parents, last = key.split(".")
  for p in parents:
    cfg = cfg[p]
  cfg[last] = value


@pytest.mark.parametrize("key,value,words", BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_a_bad_setting_is_one_error_naming_it(key, value, words):
  cfg = configs.demo.get_config()
  _set(cfg, key, value)
  with pytest.raises(UserError) as e:
    config.check(cfg)
  said = f"{e.value.message} {e.value.hint}"
  for w in words:
    assert w in said, (w, said)
  assert f"--config.{key.split('.')[0]}" in e.value.hint or "--config." in e.value.hint


@pytest.mark.parametrize("arg", [None, "runlocal", "packed"])
def test_the_shipped_configs_pass(arg):
  config.check(configs.gsv.get_config() if arg is None else configs.gsv.get_config(arg))
  config.check(configs.demo.get_config())
