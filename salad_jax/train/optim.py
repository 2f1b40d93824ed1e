"""The official optimizers (SGD, Adam, AdamW) and schedules (linear, multistep, cosine) with
torch's semantics, stepped as the official trainers step them; freezing by regex.

serizba/salad `VPRModel.configure_optimizers`: 'sgd' is torch.optim.SGD(lr, momentum,
weight_decay); 'adamw' torch.optim.AdamW(lr, weight_decay); 'adam' ALSO builds torch AdamW (the
official code does: decoupled decay, not Adam's L2 term), so here too. The schedule is
LinearLR(start_factor, end_factor, total_iters), MultiStepLR(milestones, gamma) or
CosineAnnealingLR(T_max), and `optimizer_step` steps it after every optimizer step, on top of
Lightning's own step at every epoch end (`lightning_epoch_step`).
amaralibey/MixVPR `main.py` (the GSV-Cities baselines' recipe): MultiStepLR(milestones in
epochs, gamma) stepped by Lightning at epoch ends only (`schedule_interval="epoch"`), and a
linear warmup that sets lr = base * min(1, (step + 1) / warmup_steps) for the first
`warmup_steps` steps.

torch.optim.SGD: g <- grad + wd * p; buf <- momentum * buf + g (buf = g at the first step);
p <- p - lr * buf. optax: add_decayed_weights + trace + scale_by_learning_rate, the same update.
torch.optim.AdamW: p <- p - lr*wd*p - lr * m_hat / (sqrt(v_hat) + eps), with the bias-corrected
moments and the decay on the *current* lr. `optax.scale_by_adam` + `add_decayed_weights` +
`scale_by_learning_rate` is that update. Frozen params are split off before the optimizer, so
they get no gradient, no optimizer state and no weight decay (torch skips params whose grad is
None).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from salad_jax.models import resnet, vit
from salad_jax.models.config import ModelConfig

SEP = "/"
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("linear", "multistep", "cosine")
INTERVALS = ("step", "epoch")


def default_freeze_regex(model: ModelConfig) -> str:
  """The params the official backbone wrappers freeze, and params the model never uses.

  DINOv2: patch embed, tokens, pos embed and the first depth - k blocks; also the final `norm`
  when `norm_layer=False` (unused there: torch gives it no gradient, so no decay either).
  ResNet: conv1 + bn1 and layer1..3 up to `layers_to_freeze` (`resnet.freeze_regex`).
  """
  if model.is_resnet:
    return resnet.freeze_regex(model.layers_to_freeze)
  depth = vit.VARIANTS[model.variant]["depth"]
  frozen_blocks = "|".join(str(i) for i in range(depth - model.num_trainable_blocks))
  parts = ["patch_embed", "cls_token", "pos_embed", "mask_token", "register_tokens"]
  if frozen_blocks:
    parts.append(f"blocks_({frozen_blocks})")
  if not model.norm_layer:
    parts.append("norm")
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


# ------------------------------------------------------------------------------ schedules
def scheduler_steps(count, steps_per_epoch: int | None, interval: str = "step"):
  """How many times the torch scheduler has stepped before optimizer step `count` (0-based).

  interval "step" (serizba/salad): once after every optimizer step, plus Lightning's step at
  every epoch end when `steps_per_epoch` is given; "epoch" (MixVPR): at epoch ends only.
  """
  if interval == "epoch":
    return count // steps_per_epoch
  return count + count // steps_per_epoch if steps_per_epoch else count


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
    k = scheduler_steps(count, steps_per_epoch)
    frac = jnp.minimum(k, total_iters).astype(jnp.float32) / total_iters
    return base_lr * (start_factor + (end_factor - start_factor) * frac)

  return schedule


def multistep_factor(k, milestones: Sequence[int], gamma: float):
  """torch MultiStepLR after k scheduler steps: gamma ** (milestones <= k, with repeats)."""
  m = jnp.asarray(sorted(int(x) for x in milestones) or [np.iinfo(np.int32).max], jnp.int32)
  passed = jnp.sum((m <= k) & (len(milestones) > 0))
  return jnp.float32(gamma) ** passed.astype(jnp.float32)


def cosine_factor(k, t_max: int):
  """torch CosineAnnealingLR (eta_min 0) after k scheduler steps: (1 + cos(pi k / T_max)) / 2.

  torch computes it recursively (each step from the last lr); that recursion telescopes to this
  closed form, beyond T_max too (the cosine goes back up, period 2 T_max).
  """
  return (1.0 + jnp.cos(jnp.float32(math.pi) * jnp.asarray(k, jnp.float32) / t_max)) / 2.0


def warmup_multistep_lr(
  base_lr: float,
  milestones: Sequence[int],
  gamma: float,
  warmup_steps: int,
  steps_per_epoch: int,
):
  """MixVPR's schedule: MultiStepLR over epochs (stepped at epoch ends) under its warmup.

  The warmup overwrites the lr at each of its steps: lr = base * min(1, (step + 1) / W); the
  last one leaves it at base. MultiStepLR multiplies the lr it finds by gamma at a milestone,
  so a milestone whose epoch ends inside the warmup is overwritten and has no effect: at step
  t >= W the lr is base * gamma ** #{milestones m : W <= m * steps_per_epoch <= t}.
  """
  ends = np.asarray(sorted(int(m) * steps_per_epoch for m in milestones), np.int64)
  kept = ends[ends >= warmup_steps]
  kept = jnp.asarray(kept if kept.size else [np.iinfo(np.int32).max], jnp.int32)
  has = bool(np.sum(ends >= warmup_steps))

  def schedule(count):
    after = base_lr * jnp.float32(gamma) ** jnp.sum((kept <= count) & has).astype(jnp.float32)
    if not warmup_steps:
      return after
    warm = base_lr * jnp.minimum(1.0, (jnp.asarray(count, jnp.float32) + 1) / warmup_steps)
    return jnp.where(count < warmup_steps, warm, after)

  return schedule


def make_schedule(optim_cfg, steps_per_epoch: int) -> Callable:
  """lr as a function of the optimizer step, as torch and Lightning set it (see the module doc).

  `config.optim`: schedule (linear | multistep | cosine), schedule_interval (step: serizba's
  per-step scheduler.step(), plus Lightning's epoch step with lightning_epoch_step; epoch:
  Lightning's alone, MixVPR), warmup_steps (MixVPR's warmup; with multistep per epoch only,
  `config.check`). Configs from before these settings are linear, per step.
  """
  name = optim_cfg.get("schedule", "linear")
  interval = optim_cfg.get("schedule_interval", "step")
  warmup = int(optim_cfg.get("warmup_steps", 0))
  lr = optim_cfg.lr
  if warmup:
    return warmup_multistep_lr(lr, optim_cfg.milestones, optim_cfg.gamma, warmup, steps_per_epoch)
  epoch_step = interval == "epoch" or optim_cfg.get("lightning_epoch_step", True)
  spe = steps_per_epoch if epoch_step else None
  if name == "linear" and interval == "step":
    s, e, n = optim_cfg.lr_start_factor, optim_cfg.lr_end_factor, optim_cfg.lr_total_iters
    return linear_lr(lr, s, e, n, spe)

  def schedule(count):
    k = scheduler_steps(count, spe, interval)
    if name == "linear":
      frac = jnp.minimum(k, optim_cfg.lr_total_iters).astype(jnp.float32)
      s, e = optim_cfg.lr_start_factor, optim_cfg.lr_end_factor
      return lr * (s + (e - s) * frac / optim_cfg.lr_total_iters)
    if name == "multistep":
      return lr * multistep_factor(k, optim_cfg.milestones, optim_cfg.gamma)
    return lr * cosine_factor(k, optim_cfg.t_max)

  return schedule


# ------------------------------------------------------------------------------ optimizers
def adamw(
  schedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0
) -> optax.GradientTransformation:
  return optax.chain(
    optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
    optax.add_decayed_weights(weight_decay),
    optax.scale_by_learning_rate(schedule),
  )


def sgd(schedule, momentum: float = 0.9, weight_decay: float = 0.0):
  """torch.optim.SGD(momentum, weight_decay), dampening 0, not Nesterov."""
  return optax.chain(
    optax.add_decayed_weights(weight_decay),
    optax.trace(decay=momentum, nesterov=False),
    optax.scale_by_learning_rate(schedule),
  )


def make_optimizer(optim_cfg, steps_per_epoch: int) -> tuple[optax.GradientTransformation, Any]:
  """(optax transformation, schedule) of `config.optim`; configs written before the optimizer
  and schedule names existed are AdamW + LinearLR."""
  schedule = make_schedule(optim_cfg, steps_per_epoch)
  name = optim_cfg.get("name", "adamw")
  if name == "sgd":
    tx = sgd(schedule, optim_cfg.get("momentum", 0.9), optim_cfg.weight_decay)
  else:  # "adam" too: the official configure_optimizers builds torch.optim.AdamW for it
    tx = adamw(schedule, optim_cfg.b1, optim_cfg.b2, optim_cfg.eps, optim_cfg.weight_decay)
  return tx, schedule
