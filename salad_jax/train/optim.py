"""AdamW with torch semantics, the reference LinearLR schedule, and freezing by regex.

torch.optim.AdamW: p <- p - lr*wd*p - lr * m_hat / (sqrt(v_hat) + eps), with the bias-corrected
moments and the decay on the *current* lr. `optax.scale_by_adam` + `add_decayed_weights` +
`scale_by_learning_rate` is that update. Frozen params are split off before the optimizer, so
they get no gradient, no optimizer state and no weight decay (torch skips params whose grad is None).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax.numpy as jnp
import optax
from flax import traverse_util

from salad_jax.models import vit
from salad_jax.models.vpr import ModelConfig

SEP = "/"


def default_freeze_regex(model: ModelConfig) -> str:
  """Patch embed, tokens, pos embed and the first depth - k blocks (the SALAD backbone wrapper)."""
  depth = vit.VARIANTS[model.variant]["depth"]
  frozen_blocks = "|".join(str(i) for i in range(depth - model.num_trainable_blocks))
  parts = ["patch_embed", "cls_token", "pos_embed", "mask_token", "register_tokens"]
  if frozen_blocks:
    parts.append(f"blocks_({frozen_blocks})")
  return rf"^backbone/({'|'.join(parts)})(/|$)"


def flatten(params: Mapping) -> dict[str, Any]:
  return traverse_util.flatten_dict(params, sep=SEP)


def unflatten(flat: Mapping[str, Any]) -> dict:
  return traverse_util.unflatten_dict(dict(flat), sep=SEP)


def split_trainable(params: Mapping, freeze_regex: str) -> tuple[dict, dict]:
  """(trainable, frozen) flat dicts keyed by 'a/b/c' paths."""
  pattern = re.compile(freeze_regex) if freeze_regex else None
  train, frozen = {}, {}
  for k, v in flatten(params).items():
    (frozen if pattern is not None and pattern.search(k) else train)[k] = v
  return train, frozen


def linear_lr(
  base_lr: float,
  start_factor: float,
  end_factor: float,
  total_iters: int,
  steps_per_epoch: int | None = None,
):
  """torch LinearLR as a function of the optimizer step.

  With `steps_per_epoch`, the scheduler also advances once at every epoch end, as Lightning's
  automatic epoch-interval step does on top of SALAD's per-step `scheduler.step()`.
  """

  def schedule(count):
    k = count
    if steps_per_epoch:
      k = count + count // steps_per_epoch
    frac = jnp.minimum(k, total_iters).astype(jnp.float32) / total_iters
    return base_lr * (start_factor + (end_factor - start_factor) * frac)

  return schedule


def adamw(
  schedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0
) -> optax.GradientTransformation:
  return optax.chain(
    optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
    optax.add_decayed_weights(weight_decay),
    optax.scale_by_learning_rate(schedule),
  )


def make_optimizer(optim_cfg, steps_per_epoch: int) -> tuple[optax.GradientTransformation, Any]:
  schedule = linear_lr(
    optim_cfg.lr,
    optim_cfg.lr_start_factor,
    optim_cfg.lr_end_factor,
    optim_cfg.lr_total_iters,
    steps_per_epoch if optim_cfg.lightning_epoch_step else None,
  )
  tx = adamw(schedule, optim_cfg.b1, optim_cfg.b2, optim_cfg.eps, optim_cfg.weight_decay)
  return tx, schedule
