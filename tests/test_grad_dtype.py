"""Under bf16 compute the weight gradients are summed across devices in float32 by default
(`model.grad_reduce_dtype`): the collectives of the compiled train step, read from the HLO.

XLA:CPU promotes every bf16 all-reduce to f32 late in its pipeline (`all-reduce-promotion`, it
has no bf16 reduction), so the compiled text shows f32 either way; the program is read right
after SPMD partitioning, where the collectives are created with the dtypes a TPU or GPU keeps.
"""

import glob
import re

import jax
import numpy as np
import pytest

import salad_jax
from salad_jax import sharding
from salad_jax.models import grads

from helpers import place_batch, tiny_train_setup

TINY = dict(variant="Nano/14", num_clusters=8, cluster_dim=16, token_dim=16, hidden_dim=32)
COLLECTIVE = re.compile(r"= (\(?[^=]*?) (all-reduce|reduce-scatter)\(")


def gradient_collectives(reduce: str, fsdp: int, dump_dir: str) -> dict[str, list[str]]:
  """{dtype: [shapes]} of the step's all-reduces / reduce-scatters of arrays (rank >= 1)."""
  cfg = salad_jax.ModelConfig(
    **TINY,
    num_trainable_blocks=1,
    micro_batch=0,
    train_micro_batch=0,
    dtype="bfloat16",
    grad_reduce_dtype=reduce,
  )
  params = salad_jax.init_params(cfg, jax.random.key(0), image_size=56)
  mesh = sharding.make_mesh(fsdp=fsdp)
  state, step = tiny_train_setup(cfg, params, mesh)
  batch = sharding.global_batch(place_batch(0), mesh)
  step.lower(state, batch).compile(
    compiler_options={
      "xla_dump_to": dump_dir,
      "xla_dump_hlo_pass_re": "spmd-partitioning",
      "xla_backend_optimization_level": 0,  # the HLO is what matters: compile fast
      "xla_llvm_disable_expensive_passes": True,
    }
  )
  (path,) = glob.glob(f"{dump_dir}/*jit_step*after_spmd-partitioning*.txt")
  out: dict[str, list[str]] = {}
  text = re.sub(r"/\*index=\d+\*/", "", open(path).read())  # tuple markers hold an '='
  for m in COLLECTIVE.finditer(text):
    for dtype, shape in re.findall(r"(\w+)\[([\d,]+)\]", m.group(1)):
      dims = sorted(int(d) for d in shape.split(","))  # either layout of a kernel's gradient
      out.setdefault(dtype, []).append(",".join(map(str, dims)))
  return out


def test_weight_gradients_are_reduced_in_float32_under_bf16_compute(tmp_path):
  default = gradient_collectives("float32", 8, str(tmp_path / "f32"))
  old = gradient_collectives("bfloat16", 8, str(tmp_path / "bf16"))
  assert "bf16" not in default, default["bf16"]
  assert "f32" in default and "128,384" in default["f32"]  # the trained block's qkv kernel
  assert "128,384" in old.get("bf16", []) and "384" in old["bf16"], old  # kernel and bias


def test_weight_gradients_are_float32_sums():
  """Affine + LayerScale under bf16 compute, against float64 sums of the same bf16 operands: the
  default's weight gradients are float32 sums (error ~1e-7), the bfloat16 setting's are rounded
  to bf16 (~1e-3); activation gradients stay bf16 either way."""
  bf16, f32 = jax.numpy.bfloat16, jax.numpy.float32
  rng = np.random.default_rng(0)
  x = jax.numpy.asarray(rng.standard_normal((64, 32, 16)), bf16)
  k = jax.numpy.asarray(rng.standard_normal((16, 8)), f32)
  b = jax.numpy.asarray(rng.standard_normal((8,)), f32)
  gamma = jax.numpy.asarray(rng.standard_normal((8,)), f32)
  c = jax.numpy.asarray(rng.standard_normal((64, 32, 8)), f32)

  def loss(k, b, gamma, x, how):
    with grads.reduce_dtype(how):
      y = grads.scale(grads.affine(x, k, b, bf16), gamma)
    return jax.numpy.sum(y.astype(f32) * c)  # the cotangent of y: c in bf16

  got = jax.grad(loss, argnums=(0, 1, 2, 3))(k, b, gamma, x, "float32")
  old = jax.grad(loss, argnums=(0, 1, 2, 3))(k, b, gamma, x, "bfloat16")
  assert [a.dtype for a in got] == [f32, f32, f32, bf16]
  # float64 sums of the bf16 operands the backward pass multiplies
  a = grads.affine(x, k, b, bf16)  # the forward output (bf16)
  g = c.astype(bf16)
  ga = g * gamma.astype(bf16)  # the affine output's cotangent, as both compute it (bf16)
  f64 = lambda t: np.asarray(t, np.float64).reshape(-1, t.shape[-1])  # noqa: E731
  ref = [
    f64(x).T @ f64(ga),
    f64(ga).sum(0),
    (f64(g) * f64(a)).sum(0),
  ]
  for name, r, new, bf in zip(("kernel", "bias", "gamma"), ref, got, old):
    scale = np.abs(r).max()
    err_new = np.abs(np.asarray(new, np.float64) - r).max() / scale
    err_old = np.abs(np.asarray(bf, np.float64) - r).max() / scale
    assert err_new < 1e-5 and err_old > 1e-4, (name, err_new, err_old)
  np.testing.assert_array_equal(np.asarray(got[3], f32), np.asarray(old[3], f32))


def test_the_setting_is_checked():
  with pytest.raises(ValueError, match="grad_reduce_dtype must be one of"):
    salad_jax.ModelConfig(grad_reduce_dtype="float16")
