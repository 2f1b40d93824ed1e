"""Model FLOPs (salad_jax.train.flops, the MFU numerator): a hand count for a tiny config, every
matmul of the traced train step, and the compiled program's count on CPU; the peak table."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from salad_jax import sharding
from salad_jax.models import vit
from salad_jax.models.config import ModelConfig
from salad_jax.models.vpr import VPRModel
from salad_jax.train import flops, optim, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS = dict(alpha=1.0, beta=50.0, base=0.0, epsilon=0.1)
TINY_HEAD = dict(num_clusters=2, cluster_dim=4, token_dim=4, hidden_dim=8)


def _cfg(**kw):
  base = dict(attention="dot_product_attention", micro_batch=0, train_micro_batch=0)
  return ModelConfig(**{**base, **kw})


def _traced_step_flops(cfg, n, size):
  """Matmul FLOPs of value_and_grad of the train loss (what the train step differentiates)."""
  freeze = optim.default_freeze_regex(cfg)
  params = jax.eval_shape(
    lambda r: VPRModel(cfg).init(r, jnp.zeros((1, size, size, 3)))["params"], jax.random.key(0)
  )
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), params)
  train, frozen = optim.split_trainable(zeros, freeze)
  loss_fn = trainer.make_loss_fn(cfg, LOSS)
  images = jnp.zeros((n, size, size, 3), jnp.uint8)
  labels, valid = jnp.arange(n) // 4, jnp.ones(n, bool)
  grad = jax.value_and_grad(
    lambda t: loss_fn(t, frozen, images, labels, valid, jax.random.key(0))[0]
  )
  return flops.traced_matmul_flops(grad, train)


def test_hand_count_of_a_tiny_vit():
  """Nano/14 (D=128, 4 blocks, MLP 512) at 28x28: 4 patches + cls = 5 tokens; head m=2, l=4,
  g=4, hidden 8; last block trained; a batch of 8 images."""
  cfg = _cfg(variant="Nano/14", num_trainable_blocks=1, **TINY_HEAD)
  t, d, n, h = 5, 128, 4, 512
  qkv, logits, pv, proj = 2 * t * d * 3 * d, 2 * t * d * t, 2 * t * t * d, 2 * t * d * d
  mlp = 2 * t * d * h + 2 * t * h * d
  block = qkv + logits + pv + proj + mlp
  assert block == 1_978_880
  patch = 2 * n * (14 * 14 * 3) * d  # the 14x14 conv as [4, 588] @ [588, 128]
  pos = (2 * 2 * 37 * 37 * d + 2 * 2 * 37 * 2 * d) / 8  # 37x37 table -> 2x2, once per step of 8
  head = (2 * n * d * 8 + 2 * n * 8 * 4) + (2 * n * d * 8 + 2 * n * 8 * 2)  # cluster, score MLPs
  head += 2 * d * 8 + 2 * 8 * 4  # token MLP
  head += 2 * 4 * n * 2  # aggregation einsum: l x n x m
  loss = 2 * (2 * 4 + 4) * 8  # this image's row of the 8 x 8 similarities (dim 12)
  frozen_fwd = patch + pos + 3 * block
  trained_fwd = block + head + loss
  got = flops.train_step_flops(cfg, (28, 28), batch=8)
  assert got.frozen_forward == pytest.approx(frozen_fwd, rel=1e-12)
  assert got.trained_forward == pytest.approx(trained_fwd, rel=1e-12)
  assert got.backward == pytest.approx(2 * trained_fwd, rel=1e-12)
  assert got.per_image == pytest.approx(12_625_152, rel=1e-12)
  assert got.per_step == pytest.approx(8 * 12_625_152, rel=1e-12)
  # the forward pass alone (describe): no loss
  assert flops.describe_flops(cfg, (28, 28), batch=8) == pytest.approx(
    frozen_fwd + block + head, rel=1e-12
  )
  # MFU = per-step FLOPs / time / (peak x devices)
  assert got.mfu(0.5, 1e9, 2) == pytest.approx(8 * 12_625_152 / 0.5 / 2e9)


@pytest.mark.parametrize(
  "variant,trainable,registers,size",
  [
    ("Nano/14", 2, False, 98),  # MLP blocks, half trained
    ("Nano/14", 0, False, 98),  # head only: every block forward only
    ("Nano/14", 4, True, 70),  # every block trained, 4 register tokens
    ("NanoSwiGLU/14", 1, False, 56),  # g/14's SwiGLU FFN (a tiny stand-in)
  ],
)
def test_every_matmul_of_the_traced_step_is_counted(
  monkeypatch, variant, trainable, registers, size
):
  """value_and_grad's jaxpr holds exactly the analytic matmuls: backward through the trained
  part and the head only (the frozen blocks' inputs need no gradient), attention's T^2 terms."""
  monkeypatch.setitem(vit.VARIANTS, "NanoSwiGLU/14", dict(width=64, depth=2, heads=1, ffn="swiglu"))
  cfg = _cfg(variant=variant, num_trainable_blocks=trainable, registers=registers, **TINY_HEAD)
  n = 8
  traced = _traced_step_flops(cfg, n, size)
  assert traced == pytest.approx(flops.train_step_flops(cfg, (size, size), n).per_step, rel=1e-9)


def test_remat_adds_hardware_flops_not_model_flops():
  cfg = _cfg(variant="Nano/14", num_trainable_blocks=2, remat="blocks", **TINY_HEAD)
  model = flops.train_step_flops(cfg, (56, 56), 8).per_step
  hardware = _traced_step_flops(cfg, 8, 56)
  assert hardware > 1.1 * model  # the two trained blocks' forward runs again in the backward


def test_compiled_count_on_cpu_matches_within_a_few_percent(monkeypatch):
  """XLA's cost_analysis of the compiled step (no loops but Sinkhorn's 3 elementwise
  iterations, no remat: exact there) = the analytic matmuls + the elementwise ops (norms, GELU,
  softmax, AdamW) that the model count leaves out: a few percent at width 384."""
  monkeypatch.setitem(vit.VARIANTS, "Wide2/14", dict(width=384, depth=2, heads=6, ffn="mlp"))
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import memory

  cfg = _cfg(variant="Wide2/14", num_trainable_blocks=1, **TINY_HEAD)
  mesh = sharding.make_mesh(jax.devices()[:1])
  compiled, _, _ = memory.compile_train_step(cfg, mesh, 2, 4, 98)
  hlo = flops.compiled_flops(compiled)
  model = flops.train_step_flops(cfg, (98, 98), 8).per_step
  assert 1.0 < hlo / model < 1.05, hlo / model


@pytest.mark.parametrize(
  "kind,dtype,memory,peak",
  [
    ("NVIDIA H100 80GB HBM3", "bfloat16", None, 989),  # SXM
    ("NVIDIA H100 80GB HBM3", "float32", None, 495),  # TF32
    ("NVIDIA H100 PCIe", "bfloat16", None, 756),
    ("NVIDIA H100 NVL", "bfloat16", None, 835),
    ("NVIDIA H100", "bfloat16", 94 * 10**9, 835),  # a bare kind: the NVL by its memory
    ("NVIDIA H100", "bfloat16", 80 * 10**9, 989),
    ("NVIDIA H200", "bfloat16", None, 989),
    ("NVIDIA H200 NVL", "bfloat16", None, 835),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", None, 312),
    ("TPU v4", "bfloat16", None, 275),
    ("TPU v5 lite", "bfloat16", None, 197),  # v5e
    ("TPU v5", "bfloat16", None, 459),  # v5p
    ("TPU v6 lite", "float32", None, 918),  # v6e; fp32 runs as bf16 passes
    ("cpu", "bfloat16", None, 0),
  ],
)
def test_peak_table(kind, dtype, memory, peak):
  assert flops.peak_tflops(kind, dtype, memory_bytes=memory) == peak


def test_peak_override():
  assert flops.peak_tflops("unknown", "bfloat16", 500) == 500
  assert flops.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16", 900) == 900
  assert flops.peak_tflops("NVIDIA H100 80GB HBM3", "float32", 900) == pytest.approx(
    900 * 495 / 989
  )
  assert np.isclose(flops.peak_tflops("TPU v5 lite", "float32", 100), 100)
