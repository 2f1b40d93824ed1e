"""Shared test helpers: a small random SALAD as torch + JAX twins."""

import numpy as np
import torch

import torch_reference as tr
from salad_jax import convert


def torch_model(variant="S/14", seed=0, **kw):
  return tr.randomize_(tr.VPRModel(variant, **kw), seed=seed).eval()


def state_dict_np(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def twin(variant="S/14", seed=0, **kw):
  """(torch model, JAX params, ModelConfig) with identical weights."""
  tm = torch_model(variant, seed, **kw)
  sd = state_dict_np(tm)
  config, _ = convert.infer_config(sd)
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
  return {"descriptor": np.abs(np.asarray(d_j) - d_t).max(),
          "features": np.abs(np.asarray(f_j) - f_t.permute(0, 2, 3, 1).numpy()).max(),
          "token": np.abs(np.asarray(t_j) - t_t.numpy()).max(),
          "assignment": np.abs(p_j - p_t).max(), "shape": np.shape(d_j)}


def random_params(mc, seed=0):
  """Params of the shapes of ModelConfig `mc` without compiling an init (fast): normal(0.02)
  weights, LayerNorm/LayerScale scales at 1, the dustbin at 1."""
  from salad_jax import optim
  rng = np.random.default_rng(seed)
  flat = {}
  for path, shape in convert.param_shapes(mc).items():
    name = "/".join(path)
    one = name.endswith(("/scale", "/gamma", "dust_bin"))
    flat[name] = (np.ones(shape, np.float32) if one else
                  (0.02 * rng.standard_normal(shape)).astype(np.float32))
  return optim.unflatten(flat)
