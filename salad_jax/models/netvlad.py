"""NetVLAD (Arandjelovic et al. 2016), the SALAD paper's main comparison; not in serizba/salad.

Formulation: the widely used PyTorch port, github.com/Nanne/pytorch-NetVlad `netvlad.py` (class
NetVLAD; read at commit 881a5f5), with the same parameters and forward:
  1. with `normalize_input` (default True), L2-normalise each feature over channels;
  2. soft assignment a_kn = softmax over the K clusters of a 1x1 conv `conv` (no bias, unless
     `vladv2`, whose init derives a bias from the centroids);
  3. V_k = sum_n a_kn (x_n - c_k) with `centroids` c [K, C], computed here as
     sum_n a_kn x_n - c_k sum_n a_kn (the same sum without a [B, N, K, C] tensor);
  4. intra-normalisation (L2 of each V_k over C), flatten cluster-major ([K, C] row-major: element
     (k, c) at k*C + c), L2.
Init is torch's default: conv U(+-1/sqrt(C)), centroids torch.rand (U(0, 1)). The reference's
`init_params` (alpha and weights from k-means centroids of training features) is not included.
Inputs are NHWC.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from salad_jax.models.salad import l2_normalize


def _torch_uniform(fan_in: int):
  def init(key, shape, dtype=jnp.float32):
    bound = fan_in**-0.5
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class Conv1x1(nn.Module):
  """nn.Conv2d(C, K, 1) as a per-feature matmul (kernel [C, K]), bias optional; torch init."""

  features: int
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1]
    kernel = self.param("kernel", _torch_uniform(fan_in), (fan_in, self.features))
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      y = y + self.param("bias", _torch_uniform(fan_in), (self.features,)).astype(self.dtype)
    return y


class NetVLAD(nn.Module):
  """[B, H, W, C] -> [B, num_clusters * C] float32, unit norm (`token`, `train` ignored)."""

  num_clusters: int = 64
  normalize_input: bool = True
  vladv2: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats, token=None, train: bool = False):
    b, c = feats.shape[0], feats.shape[-1]
    x = feats.reshape(b, -1, c).astype(jnp.float32)  # [B, N, C]
    if self.normalize_input:
      x = l2_normalize(x, axis=-1)
    logits = Conv1x1(self.num_clusters, self.vladv2, self.dtype, name="conv")(x)
    a = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)  # [B, N, K]
    self.sow("intermediates", "assignment", jnp.swapaxes(a, 1, 2))
    centroids = self.param("centroids", nn.initializers.uniform(1.0), (self.num_clusters, c))
    hi = jax.lax.Precision.HIGHEST
    v = (
      jnp.einsum("bnk,bnc->bkc", a, x, precision=hi)
      - centroids[None] * jnp.sum(a, axis=1)[:, :, None]
    )  # [B, K, C]
    v = l2_normalize(v, axis=-1)
    return l2_normalize(v.reshape(b, -1), axis=-1)


def torch_layout(vladv2: bool = False) -> list[tuple[str, tuple[str, ...], str]]:
  """(torch key after `aggregator.`, flax path, kind) in the official state_dict order (the
  module's own `centroids` before the `conv` submodule's tensors)."""
  rows = [("centroids", ("centroids",), "raw"), ("conv.weight", ("conv", "kernel"), "conv1x1")]
  if vladv2:
    rows.append(("conv.bias", ("conv", "bias"), "raw"))
  return rows


def descriptor_dim(num_clusters: int = 64, dim: int = 128) -> int:
  return num_clusters * dim
