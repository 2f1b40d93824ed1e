"""Model FLOPs of a SALAD train step, counted per matmul: the numerator of MFU.

MaxText-style accounting (its `calculate_tflops_training_per_device`: 6 x params x tokens plus
the attention terms), done per matmul for this model, because most of the ViT is frozen:

- forward through every ViT block: qkv, the attention logits Q K^T and P V (the T^2 terms: 2 x
  T^2 x D each), the output projection, and the MLP (fc1, fc2) or SwiGLU (w12, w3); the patch
  embedding (a 14x14 conv as a matmul) and the pos-embed table's resampling to the patch grid
  (once per step); LayerNorm, GELU, softmax and the residual adds are not counted
  (elementwise, ~1-3 % of a block);
- the SALAD head: the token, cluster-feature and score MLPs (1x1 convs: matmuls over the n
  patches) and the aggregation einsum (2 x n x l x m); Sinkhorn (3 log-sum-exp iterations over
  [m+1, n]) is elementwise and not counted;
- the loss: the similarity matrix of the global batch's descriptors (2 x B x B x dim);
- backward = 2 x forward (input and weight gradients) through the trainable blocks, the head
  and the loss only: the frozen blocks and the patch embedding run forward only (their inputs
  need no gradient and their weights none either).

These are *model* FLOPs: remat's recomputation is not counted (that is hardware FLOPs, which
`compiled.cost_analysis()` reports, as HFU; it also counts elementwise ops, and each while-loop
body once: XLA's FSDP collective matmuls on TPU hide in loops, so it undercounts there).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.extend

from salad_jax.models import vit
from salad_jax.models.config import ModelConfig


def matmul(m: int, k: int, n: int) -> int:
  """FLOPs of [m, k] @ [k, n]: one multiply and one add per term."""
  return 2 * m * k * n


def block_forward(tokens: int, width: int, ffn: str, ffn_hidden: int | None = None) -> int:
  """One ViT block's forward matmul FLOPs for one image of `tokens` tokens.

  Heads do not change the count: the logits of h heads of dim D/h are h x (T x D/h x T)."""
  t, d = tokens, width
  h = ffn_hidden or vit.ffn_hidden(width, ffn)
  attn = matmul(t, d, 3 * d) + matmul(t, d, t) + matmul(t, t, d) + matmul(t, d, d)
  if ffn == "swiglu":
    mlp = matmul(t, d, 2 * h) + matmul(t, h, d)
  else:
    mlp = matmul(t, d, h) + matmul(t, h, d)
  return attn + mlp


def head_forward(
  patches: int,
  width: int,
  num_clusters: int,
  cluster_dim: int,
  token_dim: int,
  hidden_dim: int,
) -> int:
  """The SALAD head's forward matmul FLOPs for one image (n = patches)."""
  n, c, hid = patches, width, hidden_dim
  cluster = matmul(n, c, hid) + matmul(n, hid, cluster_dim)
  score = matmul(n, c, hid) + matmul(n, hid, num_clusters)
  token = matmul(1, c, hid) + matmul(1, hid, token_dim)
  aggregate = matmul(cluster_dim, n, num_clusters)  # einsum bnc,bkn->bck
  return cluster + score + token + aggregate


def pos_embed_flops(gh: int, gw: int, m: int, width: int) -> int:
  """Resampling the m x m pos-embed table to gh x gw (two einsums; none for the stored grid)."""
  if gh == gw == m:
    return 0
  return matmul(gh, m, m * width) + matmul(gw, m, gh * width)


@dataclasses.dataclass(frozen=True)
class StepFlops:
  """Model FLOPs of one train step, per image (a global batch of `batch` images)."""

  frozen_forward: float  # patch embedding + frozen blocks (forward only)
  trained_forward: float  # trainable blocks + head + loss share (forward)
  backward: float  # 2 x trained_forward
  batch: int

  @property
  def forward(self) -> float:
    return self.frozen_forward + self.trained_forward

  @property
  def per_image(self) -> float:
    return self.forward + self.backward

  @property
  def per_step(self) -> float:
    return self.per_image * self.batch

  def mfu(self, step_s: float, peak_flops_per_device: float, devices: int) -> float:
    """Model FLOPs utilisation: per-step model FLOPs / time / the devices' peak."""
    return self.per_step / step_s / (peak_flops_per_device * devices)


def train_step_flops(
  cfg: ModelConfig, image_size: Sequence[int] = (224, 224), batch: int = 240
) -> StepFlops:
  """Model FLOPs per image of a train step of `cfg` at `image_size` on a global batch of
  `batch` images (the loss's B x B similarity matrix is shared over them)."""
  spec = vit.decode_variant(cfg.variant)
  gh, gw = vit.check_image_shape((1, image_size[0], image_size[1], 3))
  n = gh * gw
  tokens = n + 1 + (vit.NUM_REGISTERS if cfg.registers else 0)
  d, depth = spec["width"], spec["depth"]
  trained = cfg.num_trainable_blocks
  blk = block_forward(tokens, d, spec["ffn"])
  patch = matmul(n, vit.PATCH * vit.PATCH * 3, d)
  head = head_forward(n, d, cfg.num_clusters, cfg.cluster_dim, cfg.token_dim, cfg.hidden_dim)
  loss = matmul(1, cfg.descriptor_dim, batch)  # this image's row of the B x B similarities
  # the pos-embed table resampled to the patch grid: once per step, shared by the batch
  pos = pos_embed_flops(gh, gw, vit.PRETRAIN_SIZE // vit.PATCH, d) / batch
  frozen_fwd = patch + pos + (depth - trained) * blk
  trained_fwd = trained * blk + head + loss
  return StepFlops(float(frozen_fwd), float(trained_fwd), float(2 * trained_fwd), batch)


def describe_flops(
  cfg: ModelConfig, image_size: Sequence[int] = (224, 224), batch: int = 1
) -> float:
  """Model FLOPs per image of the forward pass alone (evaluation's `describe`: no loss) on
  batches of `batch` images."""
  f = train_step_flops(cfg, image_size, batch)
  return f.forward - matmul(1, cfg.descriptor_dim, batch)


def compiled_flops(compiled) -> float:
  """`cost_analysis()['flops']` of a compiled program (per device for an SPMD program): what
  the hardware runs as XLA counts it, remat recompute and elementwise ops included, each
  while-loop body once (HFU's numerator, a lower bound where loops iterate). 0 if unknown."""
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


# ------------------------------------------------------------------------------ peaks
# Dense peak TFLOP/s per device: (device-kind substring, bf16, fp32 as XLA runs it). NVIDIA
# figures are the datasheets' "with sparsity" values halved; fp32 = TF32 tensor cores (JAX's
# default matmul precision on NVIDIA GPUs). TPUs run fp32 matmuls as bf16 passes at the default
# precision: the bf16 peak. First match wins, so the specific kinds come first. Sources checked
# (2026): H100 SXM 989.4 bf16 / 494.7 TF32 dense (glennklockwood.com/garden/processors/h100, from
# NVIDIA's Hopper whitepaper); H200 SXM ~989 dense (itkb.uw.cz "NVIDIA H200 vs B300", dense
# figures); TPU v4 275 (cloud.google.com/tpu/docs/v4), v5e 197 (/tpu/docs/v5e), v5p 459
# (/tpu/docs/v5p), v6e 918 (/tpu/docs/v6e). H100 PCIe 756 / NVL 835 (and the H200 NVL's 835)
# are NVIDIA's datasheet values (1,513 / 1,671 with sparsity) as the project's issue gives them:
# not found in the pages searched here. A100 312 / TF32 156 (A100 datasheet).
PEAKS: tuple[tuple[str, float, float], ...] = (
  ("H100 PCIe", 756, 378),
  ("H100 NVL", 835, 418),
  ("H200 NVL", 835, 418),
  ("GH200", 989, 495),
  ("H200", 989, 495),
  ("H100", 989, 495),  # SXM ("NVIDIA H100 80GB HBM3"); NVL/PCIe by name or memory, see below
  ("A100", 312, 156),
  ("L40S", 362, 183),
  ("L4", 121, 60),
  ("4090", 165, 83),
  ("3090", 71, 36),
  ("A6000", 155, 77),
  ("TPU v6", 918, 918),  # v6e "TPU v6 lite"
  ("TPU v5 lite", 197, 197),  # v5e
  ("TPU v5e", 197, 197),
  ("TPU v5p", 459, 459),
  ("TPU v5", 459, 459),  # v5p reports "TPU v5"
  ("TPU v4", 275, 275),
)
# NVIDIA's kind strings name the H100 variants ("NVIDIA H100 80GB HBM3" is the SXM card, "NVIDIA
# H100 PCIe", "NVIDIA H100 NVL"). A bare "H100" with more memory than this is taken as the NVL
# (94 GB; SXM and PCIe have 80 GB): a heuristic, `--peak_tflops` overrides.
H100_NVL_MIN_BYTES = 90 * 10**9


def device_kind_key(kind: str, memory_bytes: int | None = None) -> str:
  """The PEAKS row for a `jax.Device.device_kind` (and its total memory, for a bare H100)."""
  for key, _, _ in PEAKS:
    if key.lower() in kind.lower():
      bare = key == "H100" and not any(w in kind.upper() for w in ("HBM3", "SXM"))
      if bare and memory_bytes and memory_bytes > H100_NVL_MIN_BYTES:
        return "H100 NVL"
      return key
  return ""


def peak_tflops(
  kind: str, dtype: str = "bfloat16", override: float = 0.0, memory_bytes: int | None = None
) -> float:
  """Dense peak TFLOP/s of one device of `kind` in `dtype` (0 if unknown). `override` is the
  bf16 peak (`--peak_tflops`); for fp32 it is scaled by the table's fp32/bf16 ratio."""
  key = device_kind_key(kind, memory_bytes)
  row = next((r for r in PEAKS if r[0] == key), None)
  if row is None:
    return float(override)
  _, bf16, fp32 = row
  if override:
    return float(override if dtype == "bfloat16" else override * fp32 / bf16)
  return float(bf16 if dtype == "bfloat16" else fp32)


def device_memory_bytes(device) -> int | None:
  """A GPU's total memory, estimated from its allocator's `bytes_limit` (JAX takes
  XLA_PYTHON_CLIENT_MEM_FRACTION of it, 0.75 by default); None where jax reports no stats."""
  import os

  try:
    limit = int((device.memory_stats() or {}).get("bytes_limit", 0))
  except Exception:  # noqa: BLE001  (CPU and compile-only devices have no stats)
    return None
  fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75") or 0.75)
  return int(limit / fraction) if limit else None


# ------------------------------------------------------------------------------ cross-check
def traced_matmul_flops(fn, *args) -> float:
  """Matmul FLOPs of `fn(*args)` read from its jaxpr: every dot_general / conv, 2 x output
  elements x contracted size, through nested jaxprs (jit, custom_jvp/vjp, remat, scan x its
  length; a while loop's body once; every branch of a cond). Exact for what is traced (autodiff's backward included),
  independent of the backend; remat's recomputation counts, as it runs."""
  closed = jax.make_jaxpr(fn)(*args)
  return float(_jaxpr_flops(closed.jaxpr))


def _jaxpr_flops(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lc, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      out = eqn.outvars[0].aval.shape
      total += 2 * math.prod(out) * math.prod(lhs[d] for d in lc)
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape  # kernel: out features x in features / groups x window
      out = eqn.outvars[0].aval.shape
      total += 2 * math.prod(out) * math.prod(rhs) // max(rhs[0], 1)
    mult = eqn.params.get("length", 1) if name == "scan" else 1
    for sub in _sub_jaxprs(eqn.params):
      total += mult * _jaxpr_flops(sub)
  return total


def _sub_jaxprs(params):
  for v in params.values():
    for x in v if isinstance(v, (tuple, list)) else (v,):
      if isinstance(x, jax.extend.core.ClosedJaxpr):
        yield x.jaxpr
      elif isinstance(x, jax.extend.core.Jaxpr):
        yield x
