"""Weight gradients summed in float32 under a bf16 compute dtype.

Autodiff of `dot(x_bf16, kernel.astype(bf16))` makes the weight gradient a bf16 dot: its sum over
the local batch comes out in bf16, and XLA then sums it across devices in bf16 too (an
all-reduce under data parallelism, a reduce-scatter under FSDP), rounding at every partial sum of
hundreds of replicas. Here the affine layers and LayerScale have a custom VJP whose weight
gradients are computed with `preferred_element_type=float32` (bias and scale sums in float32),
so the partial sums XLA reduces are float32; the activation gradients stay in the compute dtype.
The forward pass and what it keeps for the backward pass are unchanged.

`model.grad_reduce_dtype="bfloat16"` keeps autodiff's bf16 weight gradients (the cheaper
collective). Under float32 compute both settings are the same program. The setting is read at
trace time (`reduce_dtype`, entered by `VPRModel.__call__`), like the mesh `constrain_batch` reads.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import jax
import jax.numpy as jnp

GRAD_REDUCE_DTYPES = ("float32", "bfloat16")
_reduce = ["float32"]  # the innermost `reduce_dtype` (trace time)


def check_grad_reduce_dtype(name: str) -> None:
  if name not in GRAD_REDUCE_DTYPES:
    raise ValueError(
      f"grad_reduce_dtype must be one of {GRAD_REDUCE_DTYPES} (float32: weight gradients summed "
      f"in float32 under bf16 compute; bfloat16: in the compute dtype), got {name!r}"
    )


@contextlib.contextmanager
def reduce_dtype(name: str) -> Iterator[None]:
  """Weight gradients of the layers traced inside are summed in `name` (under bf16 compute)."""
  check_grad_reduce_dtype(name)
  _reduce.append(name)
  try:
    yield
  finally:
    _reduce.pop()


def _float32_grads(dtype) -> bool:
  return jnp.dtype(dtype) != jnp.float32 and _reduce[-1] == "float32"


def _sum_to_last(x: jax.Array) -> jax.Array:
  return jnp.sum(x.reshape(-1, x.shape[-1]), axis=0, dtype=jnp.float32)


# ------------------------------------------------------------------------------ x @ W + b
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _affine32(x, kernel, bias, dtype):
  return jnp.dot(x, kernel.astype(dtype)) + bias.astype(dtype)


def _affine32_fwd(x, kernel, bias, dtype):
  k = kernel.astype(dtype)
  return jnp.dot(x, k) + bias.astype(dtype), (x, k)  # the residuals autodiff would keep


def _affine32_bwd(dtype, res, g):
  x, k = res
  dx = jnp.dot(g, k.T)
  x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  dk = jax.lax.dot_general(x2, g2, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  return dx, dk, _sum_to_last(g)


_affine32.defvjp(_affine32_fwd, _affine32_bwd)


def affine(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, dtype) -> jax.Array:
  """x @ kernel (+ bias) in `dtype` (x already in it); params float32, their gradients float32."""
  if not _float32_grads(dtype):
    y = jnp.dot(x, kernel.astype(dtype))
    return y if bias is None else y + bias.astype(dtype)
  if bias is None:
    bias = jnp.zeros((kernel.shape[-1],), jnp.float32)  # its gradient is dropped
  return _affine32(x, kernel, bias, dtype)


# ------------------------------------------------------------------------------ x * gamma
@jax.custom_vjp
def _scale32(x, gamma):
  return x * gamma.astype(x.dtype)


def _scale32_fwd(x, gamma):
  gc = gamma.astype(x.dtype)
  return x * gc, (x, gc)


def _scale32_bwd(res, g):
  x, gc = res
  return g * gc, _sum_to_last(g.astype(jnp.float32) * x.astype(jnp.float32))


_scale32.defvjp(_scale32_fwd, _scale32_bwd)


def scale(x: jax.Array, gamma: jax.Array) -> jax.Array:
  """x * gamma (LayerScale) in x's dtype; gamma's gradient summed in float32."""
  if not _float32_grads(x.dtype):
    return x * gamma.astype(x.dtype)
  return _scale32(x, gamma)
