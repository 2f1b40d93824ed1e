"""Attention kernels and the bf16 activation policy of the ViT blocks.

`attention_impl` picks the kernel at trace time: the chunked softmax on CPU, and on accelerators
`jax.nn.dot_product_attention` with the best kernel it has there (cuDNN flash attention on a GPU
for bf16/fp16, else XLA). `low_precision` is the policy under a bf16 compute dtype: keep only the
bf16 inputs of a norm, GELU or softmax for the backward pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def low_precision(fn, dtype, **checkpoint_kw):
  """The bf16 activation policy: under a compute dtype below float32, `fn` (a norm, GELU or the
  attention softmax, whose internals run in float32) keeps only its inputs, in the compute
  dtype, for the backward pass and recomputes the rest there (elementwise work, ~1 % of a
  block's FLOPs). Without it, a bf16 step keeps float32 copies of those activations and saves
  only ~15 % of the fp32 step's memory. float32 compute keeps autodiff's plain residuals (same
  program, bit for bit, as the torch-parity tests check)."""
  if jnp.dtype(dtype) == jnp.float32:
    return fn
  return jax.checkpoint(fn, **checkpoint_kw)


def _softmax_attention(q, k, v):
  """Exact softmax attention for q, k, v [c, T, hd] (q pre-scaled); normalises after P.V."""
  s = jnp.einsum("cqd,ckd->cqk", q, k, preferred_element_type=jnp.float32)
  e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
  o = jnp.einsum("cqk,ckd->cqd", e.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return (o / jnp.sum(e, axis=-1, keepdims=True)).astype(v.dtype)


def chunked_attention(q, k, v, chunk: int):
  """Softmax attention over (batch x head) chunks of `chunk` heads, [B, T, N, hd] layout.

  Same math as `jax.nn.dot_product_attention`; on CPU the [chunk, T, T] logits of one step stay
  in cache instead of streaming [B, N, T, T] through memory (README, Performance).
  """
  b, t, n, hd = q.shape
  bn = b * n
  chunk = max(c for c in range(1, min(chunk, bn) + 1) if bn % c == 0)

  def heads_first(x):
    return x.transpose(0, 2, 1, 3).reshape(bn // chunk, chunk, t, hd)

  q = q * jnp.asarray(hd**-0.5, q.dtype)
  out = jax.lax.map(
    lambda a: _softmax_attention(*a), (heads_first(q), heads_first(k), heads_first(v))
  )
  return out.reshape(b, n, t, hd).transpose(0, 2, 1, 3)


# auto: chunked on CPU; on accelerators jax.nn.dot_product_attention with the best kernel it has
# there (cuDNN flash attention on a GPU for bf16/fp16, else XLA). xla / cudnn force one kernel.
ATTENTION_IMPLS = ("auto", "chunked", "dot_product_attention", "xla", "cudnn")
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def check_attention(name: str) -> None:
  if name not in ATTENTION_IMPLS:
    raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {name!r}")


def cudnn_supports(dtype, head_dim: int) -> str:
  """'' if cuDNN flash attention takes these inputs, else why not (jax's own checks)."""
  if jnp.dtype(dtype) not in [jnp.dtype(d) for d in CUDNN_DTYPES]:
    return f"cuDNN attention needs bf16 or fp16 inputs, got {jnp.dtype(dtype).name}"
  if head_dim % 8 or head_dim > 128:
    return f"cuDNN attention needs a head dim <= 128 and a multiple of 8, got {head_dim}"
  return ""


def attention_impl(
  name: str, dtype=jnp.float32, head_dim: int = 64, backend: str | None = None
) -> str:
  """The attention kernel to run: 'chunked', 'xla' or 'cudnn' (resolved at trace time).

  auto -> chunked on CPU, else as dot_product_attention: cuDNN flash attention on a GPU when
  the dtype and head dim allow it, else XLA (TPUs: XLA). A forced 'cudnn' that cannot run is
  an error naming the reason.
  """
  check_attention(name)
  backend = backend or jax.default_backend()
  if name == "auto":
    name = "chunked" if backend == "cpu" else "dot_product_attention"
  if name == "dot_product_attention":
    return "cudnn" if backend == "gpu" and not cudnn_supports(dtype, head_dim) else "xla"
  if name == "cudnn":
    why = cudnn_supports(dtype, head_dim) or (
      "" if backend == "gpu" else f"cuDNN attention needs a GPU, this is {backend}"
    )
    if why:
      raise ValueError(f"attention='cudnn': {why}; use attention='auto' or 'xla'")
  return name


def xla_attention(q, k, v):
  """jax.nn.dot_product_attention's XLA kernel, [B, T, N, hd]. It computes the logits and the
  softmax in float32; under a bf16 compute dtype only q, k and v are kept for the backward
  pass, which recomputes the [B, N, T, T] float32 probabilities (`low_precision`: the memory
  behaviour of a flash kernel, for ~3 % more FLOPs in a ViT-B block)."""
  return low_precision(
    functools.partial(jax.nn.dot_product_attention, implementation="xla"), q.dtype
  )(q, k, v)
