"""Shared test helpers: a small random SALAD as torch + JAX twins."""

import numpy as np
import torch

from salad_jax.weights import convert, infer

import torch_reference as tr


def torch_model(variant="S/14", seed=0, **kw):
  return tr.randomize_(tr.VPRModel(variant, **kw), seed=seed).eval()


def state_dict_np(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def twin(variant="S/14", seed=0, **kw):
  """(torch model, JAX params, ModelConfig) with identical weights."""
  tm = torch_model(variant, seed, **kw)
  sd = state_dict_np(tm)
  config, _ = infer.infer_config(sd)
  return tm, convert.torch_to_params(sd, config), config


def torch_describe(tm, x_nhwc):
  with torch.no_grad():
    return tm(torch.from_numpy(np.ascontiguousarray(x_nhwc)).permute(0, 3, 1, 2)).numpy()


def images(n=2, hw=(224, 224), seed=0):
  return np.random.default_rng(seed).standard_normal((n,) + tuple(hw) + (3,)).astype(np.float32)


def make_gsv(root, cities, size=(40, 30), seed=0):
  """Writes a small GSV-Cities tree: cities = {name: [images per place, ...]} (place ids 0..n-1).

  Place p of city c is filled with a colour unique to (c, p), so tests can tell images apart.
  Returns {(city, place_id): [file names]}.
  """
  import csv
  import os

  from PIL import Image

  from salad_jax.data.gsv_cities import image_name

  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, "Dataframes"), exist_ok=True)
  out = {}
  for ci, (city, counts) in enumerate(cities.items()):
    os.makedirs(os.path.join(root, "Images", city), exist_ok=True)
    rows = []
    for pid, n in enumerate(counts):
      lat, lon = float(rng.uniform(-60, 60)), float(rng.uniform(-170, 170))
      names = []
      for k in range(n):
        row = [pid, 2010 + k, 1 + k % 12, (37 * k) % 360, city, lat, lon, f"pano{ci}x{pid}x{k}"]
        name = image_name(city, pid, row[1], row[2], row[3], lat, lon, row[7])
        color = (40 * ci + 10, (pid * 7) % 256, (k * 50) % 256)
        Image.new("RGB", size, color).save(os.path.join(root, "Images", city, name), quality=95)
        names.append(name)
        rows.append(row)
      out[(city, pid)] = names
    rows = [rows[i] for i in rng.permutation(len(rows))]  # CSV rows in no particular order
    with open(os.path.join(root, "Dataframes", f"{city}.csv"), "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(["place_id", "year", "month", "northdeg", "city_id", "lat", "lon", "panoid"])
      w.writerows(rows)
  return out


def parity_diffs(tm, params, fwd, feats, batch):
  """Max abs JAX-vs-torch differences of descriptor, patch features, cls token, assignment.

  fwd(params, x) -> (descriptors, {"intermediates": ...}); feats(params, x) -> (map, token).
  """
  import jax

  xt = torch.from_numpy(batch).permute(0, 3, 1, 2)
  with torch.no_grad():
    d_t = tm(xt).numpy()
    p_t = tm.aggregator.last_assignment.numpy()
    f_t, t_t = tm.backbone(xt)
  with jax.default_matmul_precision("highest"):
    d_j, inter = fwd(params, batch)
    f_j, t_j = feats(params, batch)
  p_j = np.asarray(inter["intermediates"]["aggregator"]["assignment"][0])
  return {
    "descriptor": np.abs(np.asarray(d_j) - d_t).max(),
    "features": np.abs(np.asarray(f_j) - f_t.permute(0, 2, 3, 1).numpy()).max(),
    "token": np.abs(np.asarray(t_j) - t_t.numpy()).max(),
    "assignment": np.abs(p_j - p_t).max(),
    "shape": np.shape(d_j),
  }


def random_params(model_cfg, seed=0):
  """Params of the shapes of ModelConfig `model_cfg` without compiling an init (fast): normal(0.02)
  weights, LayerNorm/LayerScale scales at 1, the dustbin at 1."""
  from salad_jax.train import optim

  rng = np.random.default_rng(seed)
  flat = {}
  for path, shape in convert.param_shapes(model_cfg).items():
    name = "/".join(path)
    one = name.endswith(("/scale", "/gamma", "dust_bin"))
    flat[name] = (
      np.ones(shape, np.float32) if one else (0.02 * rng.standard_normal(shape)).astype(np.float32)
    )
  return optim.unflatten(flat)


def tiny_optim_config():
  """The paper's AdamW and LinearLR over a 10-step schedule (with 2 steps per epoch the
  Lightning epoch step shows within a few steps)."""
  import ml_collections

  return ml_collections.ConfigDict(
    dict(
      lr=6e-5,
      weight_decay=9.5e-9,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      lr_start_factor=1.0,
      lr_end_factor=0.2,
      lr_total_iters=10,
      lightning_epoch_step=True,
      freeze="auto",
    )
  )


def tiny_train_setup(model_cfg, params, mesh):
  """(state, jitted step) of the paper's optimizer and loss on `mesh` (a 10-step schedule,
  2 steps per epoch, so the Lightning epoch step shows within a few steps)."""
  import jax

  from salad_jax.train import optim, trainer
  from salad_jax.train import state as train_state

  tx, schedule = optim.make_optimizer(tiny_optim_config(), steps_per_epoch=2)
  freeze = optim.default_freeze_regex(model_cfg)
  state = train_state.create_state(params, tx, freeze, mesh, jax.random.PRNGKey(1))
  step = trainer.make_train_step(
    model_cfg, tx, freeze, dict(alpha=1.0, beta=50.0, base=0.0, epsilon=0.1), schedule, mesh
  )
  return state, step


def place_batch(i, places=8, k=4, hw=56, padded_last=0):
  """Batch i of `places` x `k` noisy images around a colour per place (uint8), labels, valid;
  the last `padded_last` entries marked padding."""
  rng = np.random.default_rng(i)
  base = rng.integers(0, 256, (places, 1, hw, hw, 3))
  imgs = np.clip(base + rng.integers(-30, 30, (places, k, hw, hw, 3)), 0, 255).astype(np.uint8)
  valid = np.ones(places * k, bool)
  if padded_last:
    valid[-padded_last:] = False
  return {
    "images": imgs.reshape(places * k, hw, hw, 3),
    "labels": np.repeat(np.arange(places) + 10 * i, k).astype(np.int32),
    "valid": valid,
  }


def run_program(path, args, cwd):
  """`python <path> <args>` run from `cwd` in this process (cheaper than a subprocess): returns
  (exit status, stdout, stderr). The flags the program itself defines are removed afterwards
  (those of the libraries it imports stay, as their modules do), so it can run again."""
  import contextlib
  import io
  import os
  import runpy
  import sys

  from absl import app, flags

  app.define_help_flags()
  out, err, code = io.StringIO(), io.StringIO(), 0
  argv, here = sys.argv, os.getcwd()
  try:
    os.chdir(cwd)
    sys.argv = [str(path)] + [str(a) for a in args]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      try:
        runpy.run_path(str(path), run_name="__main__")
      except SystemExit as e:
        code = e.code
  finally:
    sys.argv = argv
    os.chdir(here)
    for flag in list(flags.FLAGS.flags_by_module_dict().get(str(path), [])):
      if flag.name in flags.FLAGS:
        delattr(flags.FLAGS, flag.name)
    flags.FLAGS.unparse_flags()
  return code, out.getvalue(), err.getvalue()
