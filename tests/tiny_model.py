"""One tiny converted SALAD for the eval, CLI and picture tests.

tests/conftest.py makes the session fixture available to every test module; the model is kept
in the session's base temp folder and built once.
"""

import os

import jax
import pytest

import salad_jax

CONFIG = dict(variant="Nano/14", num_clusters=8, cluster_dim=16, token_dim=16, hidden_dim=32)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
  path = tmp_path_factory.getbasetemp() / "tiny_shared" / "model"
  if not os.path.isfile(path / "salad_config.json"):
    config = salad_jax.ModelConfig(**CONFIG)
    params = salad_jax.init_params(config, jax.random.key(0), image_size=56)
    salad_jax.save_converted(str(path), params, config)
  return str(path)
