"""The aggregation heads beside SALAD (GeM, ConvAP, CosPlace, MixVPR, NetVLAD) and SALAD's ablation
switches, against pure-torch references (tests/torch_heads.py): descriptors, the torch <-> Flax
layout both ways, parameter gradients and the default inits."""

import collections
import copy
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch_heads as th

from salad_jax.errors import UserError
from salad_jax.models import convap, cosplace, gem, mixvpr, netvlad, salad
from salad_jax.weights import convert

DESC_ATOL, GRAD_RTOL = 1e-6, 1e-5
MEASURED = {}  # name -> (descriptor max abs diff, worst relative grad diff vs torch f64)


def flat(tree, prefix=()):
  out = {}
  for k, v in tree.items():
    if isinstance(v, collections.abc.Mapping):
      out.update(flat(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def to_params(sd, rows):
  """torch state_dict -> nested Flax params through the layout rows (convert's transposes)."""
  params = {}
  for tkey, fpath, kind in rows:
    node = params
    for p in fpath[:-1]:
      node = node.setdefault(p, {})
    node[fpath[-1]] = np.array(convert._to_flax(sd[tkey].detach().numpy(), kind), order="C")
  return params


def to_torch(params, rows):
  f = flat(params)
  assert set(f) == {p for _, p, _ in rows}
  return collections.OrderedDict(
    (t, torch.from_numpy(np.array(convert._to_torch(np.asarray(f[p]), k), order="C")))
    for t, p, k in rows
  )


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def check(name, module, tm, rows, x, token=None, fresh=None):
  """Descriptor parity, strict two-way layout, gradient parity; returns the descriptor."""
  tm.eval()
  sd = tm.state_dict()
  assert [t for t, _, _ in rows] == list(sd)  # every key, in the official order
  params = to_params(sd, rows)
  # the rows cover exactly the module's params, with its shapes
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), x, token))["params"]
  assert {p: tuple(s.shape) for p, s in flat(shapes).items()} == {
    p: v.shape for p, v in flat(params).items()
  }
  # round trip: Flax params -> torch, strictly loadable into a fresh reference, bit-exact
  back = to_torch(params, rows)
  assert list(back) == list(sd)
  fresh.load_state_dict(back, strict=True)
  for k, v in fresh.state_dict().items():
    assert torch.equal(v, sd[k]), k

  out = jax.eval_shape(lambda: module.apply({"params": params}, x, token))
  w = np.random.default_rng(7).standard_normal(out.shape)
  d_t, g32 = torch_grads(tm, rows, x, token, w)
  _, g64 = torch_grads(copy.deepcopy(tm).double(), rows, x, token, w)

  def loss(p):
    d = module.apply({"params": p}, x, token)
    return jnp.sum(d * w.astype(np.float32)), d

  with jax.default_matmul_precision("highest"):
    (_, d_j), g_j = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  diff = float(np.abs(np.asarray(d_j) - d_t).max())
  assert d_j.shape == d_t.shape and diff <= DESC_ATOL, (name, diff)
  # gradients: against torch in float64, within 1e-5 of the largest entry; a tensor whose float32
  # gradient is ill-conditioned (torch's own float32 gradient is further off than that) within
  # twice torch's float32 error; a gradient that is zero in exact arithmetic (SALAD's dust_bin:
  # each Sinkhorn row update absorbs a constant row) within 1e-5 of the largest gradient
  g_j, worst, ill = flat(g_j), [0.0, 0.0], []
  top = max(np.abs(g).max() for g in g64.values())
  for t, p, _ in rows:
    scale, gj = np.abs(g64[t]).max(), np.asarray(g_j[p], np.float64)
    if scale <= 1e-9 * top:
      assert np.abs(gj).max() <= GRAD_RTOL * top, (name, t, np.abs(gj).max() / top)
      ill.append(f"{t}: zero gradient (f64 {scale / top:.0e}, ours {np.abs(gj).max() / top:.0e})")
      continue
    rel = float(np.abs(gj - g64[t]).max() / scale)
    rel_torch32 = float(np.abs(g32[t] - g64[t]).max() / scale)
    assert scale > 0 and rel <= max(GRAD_RTOL, 2 * rel_torch32), (name, t, rel, rel_torch32)
    if rel > GRAD_RTOL:
      ill.append(f"{t}: {rel:.1e} (torch f32 {rel_torch32:.1e})")
    else:
      worst = [max(worst[0], rel), max(worst[1], float(np.abs(gj - g32[t]).max() / scale))]
  MEASURED[name] = (diff, *worst, ill)
  return np.asarray(d_j)


def torch_grads(tm, rows, x, token, w):
  """Descriptor and {torch key: d(sum(desc * w))/d param in the Flax layout} in tm's dtype."""
  dt = next(tm.parameters()).dtype
  args = [nchw(x).to(dt)] + ([] if token is None else [torch.from_numpy(token).to(dt)])
  for p in tm.parameters():
    p.grad = None
  d = tm(*args)
  (d * torch.from_numpy(w).to(dt)).sum().backward()
  return d.detach().numpy(), {
    t: convert._to_flax(tm.get_parameter(t).grad.double().numpy(), k) for t, _, k in rows
  }


def feats(shape, seed, relu=False):
  x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
  return np.maximum(x, 0) if relu else x  # ReLU maps (ResNet) or signed normed tokens (DINOv2)


# ------------------------------------------------------------------------------------ heads
@pytest.mark.parametrize("relu", [True, False])
def test_gem(relu):
  x = feats((2, 10, 13, 384), 1, relu)
  tm = th.randomize_(th.GeMPool(), seed=1)
  d = check(f"gem relu={relu}", gem.GeMPool(), tm, gem.torch_layout(), x, fresh=th.GeMPool())
  assert d.shape == (2, gem.descriptor_dim(384))


@pytest.mark.parametrize("hw,s", [((16, 16), (2, 2)), ((23, 17), (3, 4)), ((3, 5), (4, 2))])
def test_convap(hw, s):
  """Even bins, overlapping bins (23 -> 3, 17 -> 4) and bins repeating cells (3 -> 4)."""
  x = feats((2,) + hw + (768,), 2)
  tm = th.randomize_(th.ConvAP(768, 256, *s), seed=2)
  d = check(
    f"convap {hw}->{s}",
    convap.ConvAP(256, *s),
    tm,
    convap.torch_layout(),
    x,
    fresh=th.ConvAP(768, 256, *s),
  )
  assert d.shape == (2, convap.descriptor_dim(256, *s))


def test_adaptive_bins_equal_torch_pooling():
  for size, out in [(7, 3), (20, 4), (5, 5), (3, 4), (1, 2), (37, 7)]:
    x = np.random.default_rng(size).standard_normal((1, size, size + 2, 2)).astype(np.float32)
    got = convap.adaptive_avg_pool(x, (out, out + 1))
    want = torch.nn.functional.adaptive_avg_pool2d(nchw(x), (out, out + 1)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_cosplace():
  x = feats((2, 16, 16, 768), 3)
  tm = th.randomize_(th.CosPlace(768, 512), seed=3)
  d = check(
    "cosplace", cosplace.CosPlace(512), tm, cosplace.torch_layout(), x, fresh=th.CosPlace(768, 512)
  )
  assert d.shape == (2, cosplace.descriptor_dim(512))


MIXVPR = {  # name: (C, in_h, in_w, out_channels, mix_depth, mlp_ratio, out_rows, relu)
  # the GSV-Cities baseline: ResNet-50 cut after layer3 (1024 ch, stride 16) at 320x320 -> 4096-d
  "gsv_resnet50": (1024, 20, 20, 1024, 4, 1, 4, True),
  "dinov2_322": (768, 23, 23, 1024, 4, 1, 4, False),  # DINOv2 B/14 at 322x322: H/14 = 23
  "small_odd": (64, 5, 7, 32, 2, 1.5, 3, False),  # non-square map, int(hw * 1.5) hidden
}


@pytest.mark.parametrize("name", list(MIXVPR))
def test_mixvpr(name):
  c, h, w, oc, depth, ratio, rows, relu = MIXVPR[name]
  x = feats((1 if c > 512 else 2, h, w, c), 4, relu)
  kw = dict(in_h=h, in_w=w, out_channels=oc, mix_depth=depth, mlp_ratio=ratio, out_rows=rows)
  tm = th.randomize_(th.MixVPR(c, **kw), seed=4)
  d = check(
    f"mixvpr {name}",
    mixvpr.MixVPR(**kw),
    tm,
    mixvpr.torch_layout(depth),
    x,
    fresh=th.MixVPR(c, **kw),
  )
  assert d.shape == (len(x), mixvpr.descriptor_dim(oc, rows))
  if name == "gsv_resnet50":
    assert d.shape == (1, 4096)


def test_mixvpr_wrong_map_size_is_one_user_error():
  m = mixvpr.MixVPR(in_h=20, in_w=20, feature_stride=16)
  with pytest.raises(UserError, match=r"20x20 .*400.* 16x16 \(256") as e:
    jax.eval_shape(m.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 16, 16, 8), np.float32))
  assert "320x320" in str(e.value) and "\n" not in str(e.value)
  y = jax.ShapeDtypeStruct((1, 10, 40, 8), np.float32)  # 400 cells: torch takes it too
  shapes = jax.eval_shape(m.init, jax.random.key(0), y)["params"]
  assert shapes["row_proj"]["kernel"].shape == (400, 4)


@pytest.mark.parametrize(
  "k,c,vladv2,normalize_input",
  [
    (64, 768, False, True),  # the paper's comparison on DINOv2 B/14 features: 49152-d
    (16, 256, True, True),
    (16, 256, False, False),
  ],
)
def test_netvlad(k, c, vladv2, normalize_input):
  x = feats((2, 10, 9, c), 5)
  tm = th.randomize_(th.NetVLAD(k, c, normalize_input, vladv2), seed=5)
  with torch.no_grad():  # trained-like: conv = alpha * centroid (sharp soft assignment)
    tm.conv.weight.copy_(20.0 * tm.centroids[:, :, None, None])
  d = check(
    f"netvlad K={k} C={c} v2={vladv2} norm={normalize_input}",
    netvlad.NetVLAD(k, normalize_input, vladv2),
    tm,
    netvlad.torch_layout(vladv2),
    x,
    fresh=th.NetVLAD(k, c, normalize_input, vladv2),
  )
  assert d.shape == (2, netvlad.descriptor_dim(k, c))


# ------------------------------------------------------------------------- SALAD switches
SWITCHES = [
  dict(),
  dict(dustbin=False),
  dict(assignment="softmax"),
  dict(global_token=False),
  dict(dustbin=False, global_token=False),
]


def switch_id(kw):
  return ",".join(f"{k}={v}" for k, v in kw.items()) or "default"


@pytest.mark.parametrize("kw", SWITCHES, ids=switch_id)
def test_salad_switches(kw):
  x, t = feats((2, 12, 11, 256), 6), feats((2, 256), 7)
  tm = th.randomize_(th.Salad(256, **kw), seed=6)
  module = salad.SALAD(**kw)
  rows = salad.torch_layout(**kw)
  d = check(
    f"salad {kw}",
    module,
    tm,
    rows,
    x,
    t if module.global_token else None,
    fresh=th.Salad(256, **kw),
  )
  assert d.shape == (2, salad.descriptor_dim(global_token=module.global_token))
  if not kw:  # the defaults are convert.py's layout of the official head
    assert [(a, ("aggregator",) + b, c) for a, b, c in rows] == [
      (t[len("aggregator.") :], f, k)
      for t, f, k in convert.layout(convert.ModelConfig(variant="S/14"))
      if t.startswith("aggregator.")
    ]


def test_salad_no_dustbin_marginals_and_small_maps():
  """Without the dustbin, every feature's column sums to 1 and (after many iterations) every
  cluster row to n/m; fewer features than clusters is fine."""
  from salad_jax.models.sinkhorn import log_assignment

  s = np.random.default_rng(8).normal(0, 2, (2, 16, 40)).astype(np.float32)
  p = np.exp(np.asarray(log_assignment(s, None, num_iters=300)))
  assert p.shape == (2, 16, 40)
  np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
  np.testing.assert_allclose(p.sum(2), 40 / 16, rtol=1e-3)
  x = feats((1, 7, 7, 384), 9)  # 49 features < 64 clusters
  tm = th.randomize_(th.Salad(384, dustbin=False), seed=9).eval()
  params = to_params(tm.state_dict(), salad.torch_layout(dustbin=False))
  got = jax.jit(salad.SALAD(dustbin=False).apply)({"params": params}, x, feats((1, 384), 9))
  with torch.no_grad():
    want = tm(nchw(x), torch.from_numpy(feats((1, 384), 9))).numpy()
  assert np.abs(np.asarray(got) - want).max() <= DESC_ATOL
  with pytest.raises(UserError, match="assignment"):
    jax.eval_shape(salad.SALAD(assignment="hard").init, jax.random.key(0), x, None)


def test_sinkhorn_ignores_row_constants():
  """dust_bin and score_3's bias add constants to whole score rows: Sinkhorn's row update
  absorbs them (why their gradients above are zero); softmax over clusters does not."""
  x, t = feats((2, 9, 10, 384), 13), feats((2, 384), 14)
  cases = ((dict(), False), (dict(dustbin=False), False), (dict(assignment="softmax"), True))
  for kw, moves in cases:
    tm = th.randomize_(th.Salad(384, **kw), seed=13).eval()
    params = to_params(tm.state_dict(), salad.torch_layout(**kw))
    moved = jax.tree.map(np.copy, params)
    moved["score_3"]["bias"] += np.random.default_rng(0).normal(0, 2, 64).astype(np.float32)
    if "dust_bin" in moved:
      moved["dust_bin"] = np.float32(-3.0)
    fwd = jax.jit(salad.SALAD(**kw).apply)
    change = np.abs(np.asarray(fwd({"params": moved}, x, t) - fwd({"params": params}, x, t))).max()
    assert (change > 1e-3) if moves else (change <= 1e-6), (kw, change)


def test_bfloat16_compute_keeps_float32_descriptors():
  """dtype=bfloat16 (the accelerator setting): float32 params and outputs, descriptors close to
  the float32 ones (pooling, normalisation and assignment stay in float32)."""
  x = feats((2, 6, 7, 96), 15)
  heads = [
    convap.ConvAP(32, 2, 3, dtype=jnp.bfloat16),
    cosplace.CosPlace(48, dtype=jnp.bfloat16),
    mixvpr.MixVPR(6, 7, 32, 2, 1, 4, dtype=jnp.bfloat16),
    netvlad.NetVLAD(8, vladv2=True, dtype=jnp.bfloat16),
  ]
  for head in heads:
    params = jax.jit(head.init)(jax.random.key(1), x)["params"]
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(params))
    d16 = jax.jit(head.apply)({"params": params}, x)
    d32 = jax.jit(head.clone(dtype=jnp.float32).apply)({"params": params}, x)
    assert d16.dtype == jnp.float32
    cos = np.sum(np.asarray(d16) * np.asarray(d32), axis=-1)
    assert (cos > 0.999).all(), (type(head).__name__, cos)


# ------------------------------------------------------------------------------ default inits
def _uniform_ok(v, fan_in):
  b = fan_in**-0.5
  assert np.abs(v).max() <= b and (v.size < 1000 or abs(v.std() / (b / np.sqrt(3)) - 1) < 0.05)


def init(module, *args):
  return jax.jit(module.init)(jax.random.key(0), *args)["params"]


def test_default_inits_are_torchs():
  x = np.zeros((1, 20, 20, 64), np.float32)
  p = init(mixvpr.MixVPR(20, 20, 256, 2, 1, 4), x)
  for i in range(2):
    for j in (1, 3):  # trunc_normal_(std=0.02) with torch's +-2 bounds: a plain N(0, 0.02^2)
      k = np.asarray(p[f"mix_{i}"][f"mix_{j}"]["kernel"])
      assert abs(k.std() / 0.02 - 1) < 0.01 and np.abs(k).max() > 0.07  # not cut at 2 std
      assert not np.asarray(p[f"mix_{i}"][f"mix_{j}"]["bias"]).any()
    ln = p[f"mix_{i}"]["mix_0"]
    assert (np.asarray(ln["scale"]) == 1).all() and not np.asarray(ln["bias"]).any()
  for name, fan_in in (("channel_proj", 64), ("row_proj", 400)):  # plain nn.Linear init
    _uniform_ok(np.asarray(p[name]["kernel"]), fan_in)
    _uniform_ok(np.asarray(p[name]["bias"]), fan_in)

  y = np.zeros((1, 4, 4, 768), np.float32)
  assert float(init(gem.GeMPool(), y)["p"][0]) == 3.0
  pc = init(cosplace.CosPlace(512), y)
  assert float(pc["gem"]["p"][0]) == 3.0
  _uniform_ok(np.asarray(pc["fc"]["kernel"]), 768)
  _uniform_ok(np.asarray(pc["fc"]["bias"]), 768)
  pa = init(convap.ConvAP(512), y)["channel_pool"]
  _uniform_ok(np.asarray(pa["kernel"]), 768)
  _uniform_ok(np.asarray(pa["bias"]), 768)
  pv = init(netvlad.NetVLAD(64), y)
  assert set(pv["conv"]) == {"kernel"}  # no bias without vladv2, as in the reference
  _uniform_ok(np.asarray(pv["conv"]["kernel"]), 768)
  c = np.asarray(pv["centroids"])  # torch.rand
  assert c.min() >= 0 and c.max() < 1 and abs(c.mean() - 0.5) < 0.01
  shapes = jax.eval_shape(netvlad.NetVLAD(64, vladv2=True).init, jax.random.key(0), y)
  assert set(shapes["params"]["conv"]) == {"kernel", "bias"}
  ps = jax.eval_shape(
    salad.SALAD(dustbin=False, global_token=False).init, jax.random.key(0), y, None
  )["params"]
  assert "dust_bin" not in ps and not any(k.startswith("token") for k in ps)


# --------------------------------------------- the references vs the official code (optional)
SRC = os.environ.get("SALAD_OFFICIAL_SRC")


@pytest.mark.skipif(
  not SRC or not os.path.isdir(os.path.join(SRC or "", "salad/models/aggregators")),
  reason="set SALAD_OFFICIAL_SRC to a folder holding salad/models (serizba/salad)",
)
def test_references_equal_official_modules():
  def load(name):
    path = os.path.join(SRC, "salad/models/aggregators", name + ".py")
    spec = importlib.util.spec_from_file_location("official_" + name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

  x = nchw(feats((2, 20, 20, 64), 10, relu=True))
  t = torch.from_numpy(feats((2, 64), 11))
  pairs = [
    (th.GeMPool(), load("gem").GeMPool(), (x,)),
    (th.ConvAP(64, 32, 3, 3), load("convap").ConvAP(64, 32, 3, 3), (x,)),
    (th.CosPlace(64, 32), load("cosplace").CosPlace(64, 32), (x,)),
    (th.MixVPR(64, 20, 20, 32, 2, 1, 4), load("mixvpr").MixVPR(64, 20, 20, 32, 2, 1, 4), (x,)),
    (th.Salad(64, 16, 32, 32), load("salad").SALAD(64, 16, 32, 32), (x, t)),
  ]
  for ours, official, args in pairs:
    th.randomize_(ours, seed=12).eval()
    official.load_state_dict(ours.state_dict(), strict=True)
    official.eval()
    with torch.no_grad():
      want = official(args if len(args) == 2 else args[0])
      got = ours(*args)
    assert torch.allclose(got, want, atol=1e-7, rtol=0), type(official).__name__


def test_zz_report():
  """Prints the parity figures measured above (pytest -s shows them)."""
  for name, (diff, rel64, rel32, ill) in sorted(MEASURED.items()):
    print(
      f"{name:44s} desc {diff:.1e}  grad rel vs torch f64 {rel64:.1e}, vs f32 {rel32:.1e}"
      + (f"; ill-conditioned {ill}" if ill else "")
    )
