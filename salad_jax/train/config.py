"""train.py's settings: the defaults (the SALAD paper's recipe; configs/*.py start from
`base_config()`) and their checks.

`check(config)` runs before anything is generated, written or compiled. Each bad value is one
`UserError` naming the setting (`config.data.img_per_place`), its value and what it must be: a
value that would crash later (a zero step count), be caught only at the first evaluation (after a
whole epoch of training), or train something meaningless without a word (a negative learning
rate, batches without positives) stops here instead. `check_data` and `check_trainable` check the
settings against the training data and the model once those are known.
"""

from __future__ import annotations

import math
import re
from typing import Any

import ml_collections

from salad_jax import losses, sharding
from salad_jax.data.gsv_cities import city_names
from salad_jax.errors import UserError, note
from salad_jax.evaluation.recall import check_recall_values
from salad_jax.models import vit
from salad_jax.models.config import ModelConfig
from salad_jax.models.grads import GRAD_REDUCE_DTYPES
from salad_jax.train import optim


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_epochs = 4
  c.log_every_steps = 10
  c.stop_after_steps = 0  # > 0: stop early (after checkpointing); for smoke tests
  # '' = random init; a converted / trained salad_jax dir; or a torch .ckpt/.pth/.safetensors
  # (a DINOv2 hub .pth gives the backbone, the head starts fresh)
  c.init = ""
  c.model = ml_collections.ConfigDict(ModelConfig().to_dict())
  # devices = data x fsdp: the batch is split over all of them; params and optimizer state are
  # sharded over fsdp groups (1 = replicated, plain data parallelism). dcn_data: the part of
  # `data` that spans TPU slices over the data-centre network (0 = auto: one per slice, 1 on
  # devices without slices; on CPU/GPU N > 1 splits the devices into N groups); fsdp stays
  # inside a slice (salad_jax.sharding.make_mesh)
  c.mesh = ml_collections.ConfigDict(dict(fsdp=1, dcn_data=0))

  c.data = ml_collections.ConfigDict()
  # folder: the GSV-Cities JPEG files | tfds: a pack (python -m salad_jax.data.tfds_gsv), the
  # images pre-resized to image_size: same batches, ~3x less CPU per image | demo
  c.data.source = "folder"
  c.data.root = "../data/GSVCities"
  c.data.cities = (
    "Bangkok,BuenosAires,LosAngeles,MexicoCity,OSL,Rome,Barcelona,Chicago,Madrid,"
    "Miami,Phoenix,TRT,Boston,Lisbon,Medellin,Minneapolis,PRG,WashingtonDC,Brussels,"
    "London,Melbourne,Osaka,PRS"
  )
  c.data.tfds_data_dir = ""  # source=tfds: the pack's --data_dir (or the pack directory itself)
  c.data.places_per_batch = 60
  c.data.img_per_place = 4
  c.data.min_img_per_place = 4
  c.data.image_size = (224, 224)  # a resized pack must hold this size (checked)
  c.data.randaugment = True
  c.data.num_workers = 8  # grain worker processes (each reads whole batches)
  c.data.num_threads = 4  # threads per process over the places of a batch
  c.data.demo_seed = 0

  c.optim = ml_collections.ConfigDict()
  # sgd | adam | adamw as the official configure_optimizers builds them ('adam' is torch AdamW
  # there, and here): train/optim.py
  c.optim.name = "adamw"
  c.optim.lr = 6e-5
  c.optim.weight_decay = 9.5e-9
  c.optim.momentum = 0.9  # sgd
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8  # adam, adamw
  c.optim.schedule = "linear"  # linear | multistep | cosine (torch.optim.lr_scheduler)
  # step: the scheduler steps after every optimizer step (serizba/salad), and also at each
  # epoch end with lightning_epoch_step (Lightning's own step); epoch: at epoch ends only (MixVPR)
  c.optim.schedule_interval = "step"
  c.optim.lightning_epoch_step = True
  c.optim.lr_start_factor = 1.0  # linear
  c.optim.lr_end_factor = 0.2
  c.optim.lr_total_iters = 4000
  c.optim.milestones = (5, 10, 15)  # multistep, in scheduler steps
  c.optim.gamma = 0.3
  c.optim.t_max = 4000  # cosine
  c.optim.warmup_steps = 0  # MixVPR's linear warmup (with multistep per epoch)
  # regex over param paths; auto = the official backbone wrapper's frozen part (DINOv2: all but
  # the last num_trainable_blocks blocks; ResNet: layers_to_freeze)
  c.optim.freeze = "auto"

  # salad_jax.losses.vpr_loss: any loss and miner of the official get_loss / get_miner (miner
  # 'none': no miner); alpha, beta, base: MultiSimilarityLoss's (the official values)
  c.loss = ml_collections.ConfigDict(
    dict(
      name="MultiSimilarityLoss",
      miner="MultiSimilarityMiner",
      miner_margin=0.1,
      alpha=1.0,
      beta=50.0,
      base=0.0,
    )
  )

  c.eval = ml_collections.ConfigDict()
  c.eval.sets = ""  # comma-separated: benchmark names (msls_val, pitts30k_val, ...) or folder:<dir>
  c.eval.data_root = ""
  c.eval.index_root = ""
  c.eval.image_size = (322, 322)
  c.eval.batch_size = 32
  c.eval.recall_values = (1, 5, 10, 15, 20, 25)
  c.eval.positive_dist_threshold = 25.0
  c.eval.search = "faiss"
  c.eval.num_workers = 4
  c.eval.at_start = False  # also evaluate the untrained model

  # every_secs > 0: also save when that much wall time passed since the last save (a step count
  # is a different wall time on different hardware); 0 = off
  c.checkpoint = ml_collections.ConfigDict(
    dict(every_steps=500, every_secs=0.0, keep_last=3, keep_best=1)
  )
  # JAX's persistent compilation cache: auto = <workdir>/compile_cache (restarts and every host
  # of a pod skip the compiles), a path or gs:// URL (shared by runs), '' = off
  c.compile_cache_dir = "auto"
  return c


# ------------------------------------------------------------------------------ checks
HINT = "fix it with --config.{key}=... or in the config file"


def _fail(key: str, value: Any, must: str) -> UserError:
  return UserError(f"config.{key} = {value!r}: {must}", HINT.format(key=key))


def _int(c, key: str, low: int, must: str | None = None) -> int:
  v = _get(c, key)
  if isinstance(v, bool) or not isinstance(v, int) or v < low:
    raise _fail(key, v, must or f"must be an integer >= {low}")
  return v


def _real(
  c, key: str, low: float, *, strict: bool, high: float | None = None, must: str | None = None
) -> float:
  v = _get(c, key)
  ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
  ok = ok and (v > low if strict else v >= low) and (high is None or v <= high)
  if not ok:
    bound = (f"> {low}" if strict else f">= {low}") + (
      f" and <= {high}" if high is not None else ""
    )
    raise _fail(key, v, must or f"must be a finite number {bound}")
  return float(v)


def _get(c, key: str):
  for part in key.split("."):
    c = c[part]
  return c


def _size(c, key: str, model: ModelConfig | None = None) -> tuple[int, int]:
  v = _get(c, key)
  values = list(v) if isinstance(v, (list, tuple)) else [v]
  if len(values) != 2 or any(isinstance(x, bool) or not isinstance(x, int) for x in values):
    raise _fail(key, v, "must be two integers (H, W), e.g. (224, 224)")
  try:
    if model is None:
      vit.check_image_shape((1, values[0], values[1], 3))
    else:
      model.check_image_shape((1, values[0], values[1], 3))
  except ValueError as e:
    msg = e.message if isinstance(e, UserError) else str(e)
    hint = e.hint if isinstance(e, UserError) and e.hint else HINT.format(key=key)
    raise UserError(f"config.{key} = {tuple(values)}: {msg}", hint) from None
  return values[0], values[1]


def model_config(config) -> ModelConfig:
  """config.model as a ModelConfig; a bad field or combination is one UserError."""
  try:
    return ModelConfig.from_dict(dict(config.model))
  except ValueError as e:
    msg = e.message if isinstance(e, UserError) else str(e)
    hint = e.hint if isinstance(e, UserError) and e.hint else "fix config.model"
    raise UserError(f"config.model: {msg}", hint) from None


def no_miner(miner) -> bool:
  """`config.loss.miner` values that mean no miner."""
  return miner is None or (isinstance(miner, str) and miner.lower() in ("", "none"))


MS_DEFAULTS = dict(alpha=1.0, beta=50.0, base=0.0)  # the official MultiSimilarityLoss


def _check_loss(config) -> None:
  name, miner = _get(config, "loss.name"), _get(config, "loss.miner")
  try:
    losses.check_names(name, None if no_miner(miner) else miner)
  except UserError as e:
    key = "loss.name" if name not in losses.LOSSES else "loss.miner"
    raise UserError(f"config.{key}: {e.message}", e.hint) from None
  _real(config, "loss.miner_margin", -math.inf, strict=True, must="must be a finite number")
  _real(config, "loss.alpha", 0.0, strict=True)
  _real(config, "loss.beta", 0.0, strict=True)
  _real(config, "loss.base", -math.inf, strict=True, must="must be a finite number")
  if name != "MultiSimilarityLoss":
    for k, v in MS_DEFAULTS.items():
      if _get(config, f"loss.{k}") != v:
        raise _fail(
          f"loss.{k}", _get(config, f"loss.{k}"), f"applies to MultiSimilarityLoss, not {name}"
        )


def _check_optim(config) -> None:
  name = _get(config, "optim.name")
  if name not in optim.OPTIMIZERS:
    raise _fail("optim.name", name, f"must be one of {', '.join(optim.OPTIMIZERS)}")
  schedule = _get(config, "optim.schedule")
  if schedule not in optim.SCHEDULES:
    raise _fail("optim.schedule", schedule, f"must be one of {', '.join(optim.SCHEDULES)}")
  interval = _get(config, "optim.schedule_interval")
  if interval not in optim.INTERVALS:
    raise _fail("optim.schedule_interval", interval, "must be 'step' or 'epoch'")
  _real(config, "optim.momentum", 0.0, strict=False, high=0.999999, must="must be in [0, 1)")
  milestones = _get(config, "optim.milestones")
  if not isinstance(milestones, (list, tuple)) or any(
    isinstance(m, bool) or not isinstance(m, int) or m < 0 for m in milestones
  ):
    raise _fail("optim.milestones", milestones, "must be a list of integers >= 0")
  _real(config, "optim.gamma", 0.0, strict=True)
  _int(config, "optim.t_max", 1)
  warmup = _int(config, "optim.warmup_steps", 0)
  if warmup and (schedule, interval) != ("multistep", "epoch"):
    raise _fail(
      "optim.warmup_steps",
      warmup,
      "is MixVPR's warmup, which runs with schedule='multistep' and schedule_interval='epoch' "
      "only (set those, or warmup_steps=0)",
    )


def check(config) -> None:
  """Raises a `UserError` for the first setting that cannot train or evaluate as asked."""
  _int(config, "seed", 0)
  _int(config, "num_epochs", 1)
  _int(config, "log_every_steps", 1)
  if config.get("stop_after_steps") is not None:
    _int(config, "stop_after_steps", 0, "must be an integer >= 0 (0: run every epoch)")
  _int(config, "mesh.fsdp", 1)
  if config.mesh.get("dcn_data") is not None:
    _int(config, "mesh.dcn_data", 0, "must be an integer >= 0 (0: one per TPU slice)")
  # data: the loss needs several places (negatives) and several images of each (positives)
  _int(
    config,
    "data.places_per_batch",
    2,
    "must be an integer >= 2: the loss needs other places as negatives (the paper: 60)",
  )
  k = _int(
    config,
    "data.img_per_place",
    2,
    "must be an integer >= 2: the loss needs positives, "
    "other images of the same place (the paper: 4)",
  )
  _int(
    config,
    "data.min_img_per_place",
    k,
    f"must be an integer >= data.img_per_place ({k}): "
    "places are drawn from those with enough images",
  )
  _int(config, "model.num_clusters", 1)
  # model fields named in one line each (the ModelConfig checks combinations; SALAD's sizes
  # and dropout here, with their config key)
  for key in ("cluster_dim", "token_dim", "hidden_dim"):
    _int(config, f"model.{key}", 1)
  if not 0 <= _real(config, "model.dropout", 0.0, strict=False, high=1.0) < 1:
    raise _fail("model.dropout", _get(config, "model.dropout"), "must be in [0, 1)")
  model = model_config(config)
  _size(config, "data.image_size", model)
  names = city_names(config.data.cities)
  repeated = sorted({c for c in names if names.count(c) > 1})
  if repeated:  # each place would be in the data twice, as two places: its own images as negatives
    raise _fail("data.cities", config.data.cities, f"lists {', '.join(repeated)} more than once")
  _int(config, "data.num_workers", 0)
  _int(config, "data.num_threads", 1)
  # optimizer and schedule (torch AdamW / LinearLR bounds)
  _real(config, "optim.lr", 0.0, strict=True)
  _real(config, "optim.weight_decay", 0.0, strict=False)
  _real(config, "optim.b1", 0.0, strict=False, high=0.999999, must="must be in [0, 1)")
  _real(config, "optim.b2", 0.0, strict=False, high=0.999999, must="must be in [0, 1)")
  _real(config, "optim.eps", 0.0, strict=True)
  _real(config, "optim.lr_start_factor", 0.0, strict=True, high=1.0, must="must be in (0, 1]")
  _real(config, "optim.lr_end_factor", 0.0, strict=False, high=1.0, must="must be in [0, 1]")
  _int(config, "optim.lr_total_iters", 1)
  _check_optim(config)
  freeze = _get(config, "optim.freeze")
  if not isinstance(freeze, str):
    raise _fail("optim.freeze", freeze, "must be 'auto' or a regex over param paths")
  try:
    re.compile(freeze)
  except re.error as e:
    raise _fail("optim.freeze", freeze, f"is not a valid regex ({e})") from None
  _check_loss(config)
  if model.is_resnet and not config.init and model.layers_to_freeze >= 0:
    note(
      f"config.model.layers_to_freeze={model.layers_to_freeze} freezes layers of a randomly "
      "initialised ResNet (the official wrapper freezes only pretrained ones: -1 there)"
    )
  # evaluation: checked now, not at the end of the first epoch
  _size(config, "eval.image_size", model)
  _int(config, "eval.batch_size", 1)
  _int(config, "eval.num_workers", 0)
  _real(
    config,
    "eval.positive_dist_threshold",
    0.0,
    strict=True,
    must="must be a positive number of metres (the paper: 25)",
  )
  if _get(config, "eval.search") not in ("faiss", "jax"):
    raise _fail("eval.search", _get(config, "eval.search"), "must be 'faiss' or 'jax'")
  try:
    check_recall_values(_get(config, "eval.recall_values"))
  except UserError as e:
    raise UserError(
      f"config.eval.recall_values: {e.message}", HINT.format(key="eval.recall_values")
    ) from None
  # checkpoints: keeping none would delete the checkpoint the last line names
  _int(config, "checkpoint.every_steps", 1)
  _int(
    config,
    "checkpoint.keep_last",
    1,
    "must be an integer >= 1 (the newest checkpoint is what a rerun resumes from)",
  )
  _int(config, "checkpoint.keep_best", 0)
  if config.checkpoint.get("every_secs") is not None:
    _real(
      config,
      "checkpoint.every_secs",
      0.0,
      strict=False,
      must="must be a number of seconds >= 0 (0: no time-based saves)",
    )
  cache = config.get("compile_cache_dir", "")
  if not isinstance(cache, str):
    raise _fail("compile_cache_dir", cache, "must be 'auto', a directory or gs:// path, or ''")
  reduce = _get(config, "model.grad_reduce_dtype") if "grad_reduce_dtype" in config.model else None
  if reduce is not None and reduce not in GRAD_REDUCE_DTYPES:
    raise _fail(
      "model.grad_reduce_dtype",
      reduce,
      f"must be one of {', '.join(GRAD_REDUCE_DTYPES)} (the dtype weight gradients are summed "
      "in under bf16 compute)",
    )


def check_mesh(config, devices=None) -> None:
  """`config.mesh` against the devices (default: all) and their TPU slices: `mesh.dcn_data`
  must be the number of slices (or 0), `mesh.fsdp` must divide the devices of one slice. Needs
  the backend (after `jax.distributed.initialize`), so it is not part of `check`."""
  sharding.check_mesh(devices, config.mesh.fsdp, config.mesh.get("dcn_data", 0))


def check_data(config, num_places: int) -> None:
  """Settings against the training data: more places per batch than the data has would make one
  step of mostly padding."""
  if config.data.places_per_batch > num_places:
    raise UserError(
      f"config.data.places_per_batch = {config.data.places_per_batch}: more than the "
      f"{num_places} places of the training data",
      f"use at most {num_places} (the paper: 60 of GSV-Cities' ~62,000)",
    )


def check_trainable(config, freeze: str, train, frozen) -> None:
  """The freeze regex against the model's params: freezing everything trains nothing (an error);
  a regex that matches nothing trains everything (a note)."""
  if not train:
    raise UserError(
      f"config.optim.freeze={config.optim.freeze!r} freezes every parameter: nothing would train",
      "use 'auto' (the backbone wrapper's frozen part) or a regex that leaves the head trainable",
    )
  if config.optim.freeze != "auto" and freeze and not frozen:
    note(
      f"config.optim.freeze={freeze!r} matches no parameter: every parameter trains (use "
      "'auto' for SALAD's frozen backbone part)"
    )
