"""Shared test helpers: a small random SALAD as torch + JAX twins."""

import numpy as np
import torch

import torch_reference as tr
from salad_jax import convert


def torch_model(variant="S/14", seed=0, **kw):
  return tr.randomize_(tr.VPRModel(variant, **kw), seed=seed).eval()


def state_dict_np(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def twin(variant="S/14", seed=0, **kw):
  """(torch model, JAX params, ModelConfig) with identical weights."""
  tm = torch_model(variant, seed, **kw)
  sd = state_dict_np(tm)
  config, _ = convert.infer_config(sd)
  return tm, convert.torch_to_params(sd, config), config


def torch_describe(tm, x_nhwc):
  with torch.no_grad():
    return tm(torch.from_numpy(np.ascontiguousarray(x_nhwc)).permute(0, 3, 1, 2)).numpy()


def images(n=2, hw=(224, 224), seed=0):
  return np.random.default_rng(seed).standard_normal((n,) + tuple(hw) + (3,)).astype(np.float32)
