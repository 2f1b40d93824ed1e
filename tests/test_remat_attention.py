"""Remat of the trainable blocks, the bf16 activation policy, and the attention kernel choice."""

import contextlib
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

import salad_jax
from salad_jax.models import attention as attention_lib
from salad_jax.train import optim, trainer

from helpers import random_params

TINY = dict(
  variant="Nano/14",
  num_clusters=8,
  cluster_dim=16,
  token_dim=16,
  hidden_dim=32,
  num_trainable_blocks=2,
  dropout=0.3,
  micro_batch=0,
  train_micro_batch=0,
)
LOSS = dict(alpha=1.0, beta=50.0, base=0.0, epsilon=0.1)


@pytest.fixture(scope="module")
def setup():
  model_cfg = salad_jax.ModelConfig(**TINY)
  params = random_params(model_cfg)
  rng = np.random.default_rng(0)
  base = rng.integers(0, 256, (4, 1, 56, 56, 3))
  images = np.clip(base + rng.integers(-30, 30, (4, 4, 56, 56, 3)), 0, 255).astype(np.uint8)
  batch = (
    images.reshape(16, 56, 56, 3),
    np.repeat(np.arange(4), 4).astype(np.int32),
    np.ones(16, bool),
  )
  return params, batch


def _loss_and_grads(params, batch, **model):
  """(loss, grads of the trainable params)."""
  model_cfg = salad_jax.ModelConfig(**{**TINY, **model})
  train, frozen = optim.split_trainable(params, optim.default_freeze_regex(model_cfg))
  loss_fn = trainer.make_loss_fn(model_cfg, LOSS)
  f = jax.jit(jax.value_and_grad(lambda t: loss_fn(t, frozen, *batch, jax.random.PRNGKey(3))[0]))
  loss, grads = f(train)
  return float(loss), jax.tree.map(np.asarray, grads)


def test_remat_gives_the_same_loss_and_gradients_and_keeps_less(setup):
  params, batch = setup
  loss0, g0 = _loss_and_grads(params, batch, remat="none")
  assert loss0 > 0
  for remat, micro in (("blocks", 0), ("dots", 0), ("blocks", 4)):  # 4: the scanned micro-batches
    loss, g = _loss_and_grads(params, batch, remat=remat, train_micro_batch=micro)
    assert loss == pytest.approx(loss0, rel=1e-6), remat
    for k, v in g0.items():
      np.testing.assert_allclose(
        g[k], v, rtol=1e-5, atol=1e-6 * np.abs(v).max(), err_msg=f"{remat} {k}"
      )
  # what the backward pass keeps (the memory the compiled program needs for it; XLA's temp
  # figure for a model this small is dominated by other buffers: benchmarks/memory.py shows it)
  kept = {
    r: sum(n for _, n in _saved_residuals(params, batch, "float32", remat=r))
    for r in ("none", "dots", "blocks")
  }
  assert kept["blocks"] < kept["dots"] < kept["none"], kept
  assert kept["blocks"] < 0.5 * kept["none"], kept


def _saved_residuals(params, batch, dtype, remat="none"):
  model_cfg = salad_jax.ModelConfig(**{**TINY, "dtype": dtype, "attention": "xla", "remat": remat})
  train, frozen = optim.split_trainable(params, optim.default_freeze_regex(model_cfg))
  loss_fn = trainer.make_loss_fn(model_cfg, LOSS)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    print_saved_residuals(lambda t: loss_fn(t, frozen, *batch, jax.random.PRNGKey(3))[0], train)
  rows = []
  for line in out.getvalue().splitlines():
    m = re.match(r"(\w+)\[([\d,]*)\]", line)
    if m:
      rows.append((m.group(1), int(np.prod([int(d) for d in m.group(2).split(",") if d]))))
  return rows


def test_bf16_policy_keeps_activations_in_bf16(setup):
  """Under bf16 compute the backward pass keeps no float32 activation of a block ([B, T, D] or
  larger: normed tokens, attention probabilities, MLP hidden), only small float32 statistics."""
  params, batch = setup
  block = 16 * (1 + 16) * 128  # B x T x D of Nano/14 at 56 x 56
  rows = _saved_residuals(params, batch, "bfloat16")
  big = [r for r in rows if r[1] >= block]
  assert big and all(dt == "bf16" for dt, _ in big), big
  rows32 = _saved_residuals(params, batch, "float32")  # autodiff's plain residuals
  assert any(dt == "f32" and n >= block for dt, n in rows32)
  # bf16 keeps less than half the bytes of fp32 (same tensors at half the size, and fewer)
  assert 4 * sum(n for _, n in rows32 if n >= block) > 2 * 2 * sum(n for _, n in big)


def test_attention_kernel_choice():
  bf16, f32 = jnp.bfloat16, jnp.float32
  assert attention_lib.attention_impl("auto", bf16, 64, backend="cpu") == "chunked"
  assert attention_lib.attention_impl("auto", bf16, 64, backend="gpu") == "cudnn"
  assert attention_lib.attention_impl("auto", jnp.float16, 64, backend="gpu") == "cudnn"
  assert (
    attention_lib.attention_impl("auto", f32, 64, backend="gpu") == "xla"
  )  # cuDNN has no fp32 kernel
  assert (
    attention_lib.attention_impl("auto", bf16, 100, backend="gpu") == "xla"
  )  # head dim not a multiple of 8
  assert attention_lib.attention_impl("auto", bf16, 64, backend="tpu") == "xla"
  assert attention_lib.attention_impl("dot_product_attention", bf16, 64, backend="cpu") == "xla"
  assert attention_lib.attention_impl("xla", bf16, 64, backend="gpu") == "xla"
  with pytest.raises(ValueError, match="needs a GPU"):
    attention_lib.attention_impl("cudnn", bf16, 64, backend="tpu")
  with pytest.raises(ValueError, match="bf16 or fp16"):
    attention_lib.attention_impl("cudnn", f32, 64, backend="gpu")
  with pytest.raises(ValueError, match="remat must be one of"):
    salad_jax.ModelConfig(remat="all")


def test_xla_attention_matches_chunked(setup):
  """The accelerator path (XLA kernel; recomputed in the backward under bf16) gives the CPU
  path's descriptors: fp32 to 1e-5, bf16 within bf16 rounding; and the same gradients."""
  params, (images, _, _) = setup
  from salad_jax.data.pipeline import normalize_images

  imgs = normalize_images(images)

  def describe(attention, dtype="float32"):
    model_cfg = salad_jax.ModelConfig(**{**TINY, "attention": attention, "dtype": dtype})
    model = salad_jax.models.vpr.VPRModel(model_cfg)
    return np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x))(params, imgs))

  ref = describe("chunked")
  np.testing.assert_allclose(describe("xla"), ref, atol=1e-5)
  bf = describe("xla", "bfloat16")
  cos = np.sum(bf * ref, axis=1)  # unit-norm descriptors
  assert cos.min() > 0.99, cos.min()

  q, k, v = (jax.random.normal(jax.random.key(i), (2, 17, 2, 64)) for i in range(3))

  def grads(f, dtype):
    loss = lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v).astype(jnp.float32)))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*(x.astype(dtype) for x in (q, k, v)))

  chunked = lambda q, k, v: attention_lib.chunked_attention(q, k, v, 2)
  for a, b in zip(grads(attention_lib.xla_attention, jnp.float32), grads(chunked, jnp.float32)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  for a, b in zip(grads(attention_lib.xla_attention, jnp.bfloat16), grads(chunked, jnp.float32)):
    np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=0.05 * np.abs(b).max())
