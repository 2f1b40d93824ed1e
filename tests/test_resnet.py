"""ResNet backbones (serizba/salad's torchvision wrapper) vs the pure-torch oracle, fp32 on CPU.

Random weights and BN states (tests/torch_resnet.py `randomize_`); relative errors are
max |jax - torch| / max |torch| (per tensor for BN states, Frobenius per tensor for gradients).
"""

import copy
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch_resnet as tr
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from salad_jax.errors import UserError
from salad_jax.models import batchnorm, resnet, resnet_layout

ARCHS = list(resnet.VARIANTS)
INPUT = {"resnet101": (1, 32), "resnet152": (1, 32)}  # (batch, side): the deep ones small
CROPS = [(), (4,), (3, 4)]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
  """These convs are small: torch's second thread spin-waits more than it helps (with other
  processes on the two cores, the torch side took 20x the CPU time)."""
  n = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(n)


@functools.lru_cache(maxsize=None)
def model(arch):
  """A randomised official wrapper (eval mode, layers_to_freeze=2); copy it before training."""
  torch.manual_seed(0)
  tm = tr.OfficialResNet(arch, pretrained=True, layers_to_freeze=2, arch=arch)
  return tr.randomize_(tm, seed=sum(map(ord, arch))).eval()


def state_dict(tm):
  return {k: v.detach().numpy().copy() for k, v in tm.model.state_dict().items()}


def images(n, side, seed=0):
  return np.random.default_rng(seed).standard_normal((n, side, side, 3)).astype(np.float32)


def torch_nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)


def torch_features(tm, x):
  with torch.no_grad():
    return tm(torch_nchw(x)).permute(0, 2, 3, 1).numpy()


def rel_err(a, b):
  """(max abs, max abs / max |b|)."""
  d = float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())
  return d, d / max(float(np.abs(b).max()), 1e-30)


def leaf(tree, path):
  for p in path:
    tree = tree[p]
  return np.asarray(tree)


@pytest.mark.parametrize("arch", ARCHS)
def test_eval_features_match_torch(arch):
  tm = model(arch)
  n, side = INPUT.get(arch, (2, 64))
  x = images(n, side, seed=1)
  ref = torch_features(tm, x)
  sd = state_dict(tm)
  assert resnet_layout.infer_arch({k: v.shape for k, v in sd.items()}) == (arch, ())
  out = resnet.ResNet(arch).apply(resnet_layout.state_dict_to_variables(sd, arch), x)
  assert out.shape == ref.shape == (n, side // 32, side // 32, resnet.out_channels(arch))
  abs_err, rel = rel_err(out, ref)
  print(f"{arch} eval {n}x{side}x{side}: max abs {abs_err:.2e}, rel {rel:.2e}")
  assert rel <= 1e-5


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2"])
def test_train_mode_forward_bn_updates_and_gradients_match_torch(arch):
  """One train-mode call with layers_to_freeze=2: features, running stats (unbiased var) and
  counters of every BN (frozen layers' too); for resnet18/50 also the gradients of a scalar loss
  of the features w.r.t. the trainable params, and `freeze_regex` selects exactly the params
  torch leaves without a gradient.

  Gradients are compared with the torch model run in float64: torch's own float32 gradients
  are up to 1e-2 (Frobenius) off it for resnet50 here, in tensors whose gradient is a sum that
  cancels (e.g. layer4.0.bn3.bias, before train-mode BNs); ours are within 1e-5.
  """
  sd = state_dict(model(arch))
  x = images(2, 64, seed=2)
  tm = copy.deepcopy(model(arch)).train()
  ref = torch_features(tm, x)
  after = state_dict(tm)
  w = np.random.default_rng(4).standard_normal(ref.shape)
  with_grads = arch in ("resnet18", "resnet50")

  variables = resnet_layout.state_dict_to_variables(sd, arch)
  net = resnet.ResNet(arch, layers_to_freeze=2)

  def loss(params):
    y, state = net.apply(
      {"params": params, "batch_stats": variables["batch_stats"]},
      x,
      train=True,
      mutable=["batch_stats"],
    )
    return jnp.sum(y * w.astype(np.float32)), (y, state)

  if with_grads:
    (_, (out, state)), grads_j = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      variables["params"]
    )
  else:
    _, (out, state) = loss(variables["params"])
  abs_err, rel = rel_err(out, ref)
  got = resnet_layout.variables_to_state_dict({"params": variables["params"], **state}, arch)
  worst = 0.0
  for k, v in after.items():
    if k.endswith("num_batches_tracked"):
      assert got[k] == v == sd[k] + 1, k
    elif k.endswith(("running_mean", "running_var")):
      assert not np.array_equal(v, sd[k]), k
      worst = max(worst, rel_err(got[k], v)[1])
  print(
    f"{arch} train: features max abs {abs_err:.2e}, rel {rel:.2e}; running stats worst "
    f"rel {worst:.2e}"
  )
  assert rel <= 1e-5 and worst <= 1e-5
  if not with_grads:
    return

  t64 = copy.deepcopy(model(arch)).double().train()
  (t64(torch_nchw(x).double()).permute(0, 2, 3, 1) * torch.from_numpy(w)).sum().backward()
  grads_t = {k: p.grad for k, p in t64.model.named_parameters()}
  frozen_t = {k for k, g in grads_t.items() if g is None}
  rows = [r for r in resnet_layout.torch_layout(arch) if r[1] == "params"]
  assert [r[0] for r in rows] == list(grads_t)
  pattern = re.compile(resnet.freeze_regex(2))
  frozen_j = {t for t, _, path, _ in rows if pattern.search("backbone/" + "/".join(path))}
  assert frozen_j == frozen_t and any(k.startswith("layer2.") for k in frozen_t)
  worst = (0.0, "")
  for tkey, _, path, kind in rows:
    g = leaf(grads_j, path)
    if tkey in frozen_t:
      assert not g.any(), tkey  # the stop_gradient after layer2
      continue
    ref = resnet_layout._to_flax(grads_t[tkey].numpy(), kind)
    worst = max(worst, (float(np.linalg.norm(g - ref) / np.linalg.norm(ref)), tkey))
  print(
    f"{arch} grads: {len(rows) - len(frozen_t)} trainable tensors, worst Frobenius rel "
    f"vs torch fp64 {worst[0]:.2e} ({worst[1]})"
  )
  assert worst[0] <= 1e-4, worst


@pytest.mark.parametrize(
  "arch,crop,channels",
  [
    ("resnet50", (4,), 1024),
    ("resnet50", (3, 4), 512),
    ("resnet18", (4,), 256),
    ("resnet18", (3, 4), 128),
  ],
)
def test_cropped_backbones_match_torch(arch, crop, channels):
  tm = tr.OfficialResNet(arch, pretrained=True, layers_to_crop=list(crop)).eval()
  loaded = tm.model.load_state_dict(model(arch).model.state_dict(), strict=False)
  assert not loaded.missing_keys  # the cropped stages' keys are the unexpected ones
  assert tm.out_channels == channels == resnet.out_channels(arch, crop)
  sd = state_dict(tm)
  assert not any(k.startswith("layer4") for k in sd)
  assert resnet_layout.infer_arch({k: v.shape for k, v in sd.items()}) == (arch, crop)
  x = images(2, 64, seed=1)
  ref = torch_features(tm, x)
  out = resnet.ResNet(arch, crop).apply(resnet_layout.state_dict_to_variables(sd, arch, crop), x)
  side = 64 // (16 if crop == (4,) else 8)
  assert out.shape == ref.shape == (2, side, side, channels)
  abs_err, rel = rel_err(out, ref)
  print(f"{arch} crop {list(crop)}: max abs {abs_err:.2e}, rel {rel:.2e}")
  assert rel <= 1e-5


def test_out_channels_and_names_follow_the_official_wrapper():
  for name in ARCHS + ["resnet50_custom", "my_resnet18", "resnext101_32x8d"]:
    arch = resnet.official_arch(name)
    assert arch == tr.official_arch(name)
    for crop in CROPS:
      assert resnet.out_channels(arch, crop) == tr.official_out_channels(name, crop), (name, crop)
  # the official lookup tests 'resnet50' before 'wide_resnet50_2': that name builds a resnet50
  assert resnet.official_arch("wide_resnet50_2") == "resnet50"
  for bad in ("vit_b", "resnet50_swsl"):
    with pytest.raises(UserError):
      resnet.official_arch(bad)


def test_cropping_layer3_alone_is_refused():
  """The official wrapper accepts [3] and then fails in forward (layer4 gets layer2's output)."""
  tm = tr.OfficialResNet("resnet18", pretrained=False, layers_to_crop=[3])
  with pytest.raises(RuntimeError):
    tm(torch.zeros(1, 3, 64, 64))
  for crop in [(3,), (2, 4), (5,)]:
    with pytest.raises(UserError, match="layers_to_crop"):
      jax.eval_shape(
        lambda x: resnet.ResNet("resnet18", crop).init(jax.random.key(0), x),
        jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32),
      )


def test_sharded_batch_gives_global_batch_statistics():
  """Batch split over 8 devices under jit: same features and BN updates as one device (global
  statistics; per-device ones would differ, as the one-image control shows)."""
  assert len(jax.devices()) == 8
  tm = model("resnet18")
  variables = resnet_layout.state_dict_to_variables(state_dict(tm), "resnet18")
  x = images(8, 64, seed=6)
  step = jax.jit(
    lambda v, x: resnet.ResNet("resnet18").apply(v, x, train=True, mutable=["batch_stats"])
  )
  one_out, one_state = step(variables, x)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
  vs = jax.device_put(variables, NamedSharding(mesh, PartitionSpec()))
  assert len(xs.addressable_shards) == 8 and xs.addressable_shards[0].data.shape[0] == 1
  out, state = step(vs, xs)
  assert len(out.sharding.device_set) == 8
  abs_err, rel = rel_err(out, one_out)
  worst = max(rel_err(a, b)[1] for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(one_state)))
  print(
    f"8 devices vs 1: features max abs {abs_err:.2e}, rel {rel:.2e}; BN state worst rel {worst:.2e}"
  )
  assert rel <= 1e-5 and worst <= 1e-5
  train = copy.deepcopy(tm).train()
  assert rel_err(out, torch_features(train, x))[1] <= 1e-5  # torch on the whole batch
  alone = torch_features(train, x[:1])  # one device's shard on its own: other statistics
  assert rel_err(alone, one_out[:1])[1] > 1e-2


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_torch_flax_torch_is_bit_exact(arch):
  tm = model(arch)
  sd = state_dict(tm)
  assert [r[0] for r in resnet_layout.torch_layout(arch)] == list(sd)
  back = resnet_layout.variables_to_state_dict(
    resnet_layout.state_dict_to_variables(sd, arch), arch
  )
  assert list(back) == list(sd)
  for k, v in sd.items():
    assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k
  tm.model.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_infer_arch_on_every_arch_and_crop(arch):
  full = {k: tuple(v.shape) for k, v in model(arch).model.state_dict().items()}
  for crop in CROPS:
    shapes = {k: s for k, s in full.items() if k.split(".")[0] not in {f"layer{c}" for c in crop}}
    want = "resnet50" if crop == (3, 4) and arch == "resnet101" else arch  # the same network
    assert resnet_layout.infer_arch(shapes) == (want, crop)
  torchvision_file = dict(full, **{"fc.weight": (1000, full["bn1.weight"][0]), "fc.bias": (1000,)})
  assert resnet_layout.infer_arch(torchvision_file) == (arch, ())


def test_infer_arch_and_conversion_errors_name_what_they_found():
  full = {k: tuple(v.shape) for k, v in model("resnext50_32x4d").model.state_dict().items()}
  x8d = {
    k: ((s[0], 8) + s[2:] if k.endswith("conv2.weight") and len(s) == 4 else s)
    for k, s in full.items()
  }
  with pytest.raises(UserError, match="groups 16"):
    resnet_layout.infer_arch(x8d)
  with pytest.raises(UserError, match="missing: layer2.1.bn1.running_var"):
    resnet_layout.infer_arch({k: s for k, s in full.items() if k != "layer2.1.bn1.running_var"})
  with pytest.raises(UserError, match=r"wrong shapes: layer3.0.conv1.weight \(512, 256, 1, 1\)"):
    resnet_layout.infer_arch(dict(full, **{"layer3.0.conv1.weight": (512, 256, 1, 1)}))
  with pytest.raises(UserError, match="unexpected: extra.weight"):
    resnet_layout.infer_arch(dict(full, **{"extra.weight": (3,)}))
  with pytest.raises(UserError, match="stages with blocks"):
    resnet_layout.infer_arch({k: s for k, s in full.items() if not k.startswith("layer3.")})
  with pytest.raises(UserError, match="not numbered"):
    resnet_layout.infer_arch({k: s for k, s in full.items() if not k.startswith("layer2.1.")})
  with pytest.raises(UserError, match="not a torchvision ResNet"):
    resnet_layout.infer_arch({"cls_token": (1, 1, 768)})
  # a full torchvision file converts for a cropped model: the wrapper drops layer4 and fc
  sd = dict(
    state_dict(model("resnet18")),
    **{"fc.weight": np.zeros((1000, 512), np.float32), "fc.bias": np.zeros(1000, np.float32)},
  )
  v = resnet_layout.state_dict_to_variables(sd, "resnet18", [4])
  assert "layer4_0" not in v["params"] and "layer3_1" in v["params"]
  with pytest.raises(UserError, match="unexpected: bogus"):
    resnet_layout.state_dict_to_variables(dict(sd, bogus=np.zeros(1)), "resnet18")
  with pytest.raises(UserError, match="unknown ResNet arch"):
    resnet.ResNet("resnet200").init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_freeze_regex_matches_the_official_requires_grad():
  rows = [r for r in resnet_layout.torch_layout("resnet18") if r[1] == "params"]
  for level in range(-1, 5):
    tm = tr.OfficialResNet("resnet18", pretrained=True, layers_to_freeze=level)
    frozen_t = {k for k, p in tm.model.named_parameters() if not p.requires_grad}
    regex = resnet.freeze_regex(level, prefix="model/backbone/")
    frozen_j = {
      t for t, _, p, _ in rows if regex and re.search(regex, "model/backbone/" + "/".join(p))
    }
    assert frozen_j == frozen_t, level
  assert resnet.freeze_regex(-1) == ""  # the official pretrained=False: nothing frozen
  untouched = tr.OfficialResNet("resnet18", pretrained=False, layers_to_freeze=2)
  assert all(p.requires_grad for p in untouched.parameters())
  assert resnet.freeze_regex(4) == resnet.freeze_regex(3)  # layer4 is never frozen
  assert not re.search(resnet.freeze_regex(3), "backbone/layer4_0/conv1/kernel")
  assert not re.search(resnet.freeze_regex(3), "aggregator/conv1/kernel")


def test_init_follows_torchvision_and_bn_edge_cases():
  net = resnet.ResNet("resnext50_32x4d")
  shapes = jax.eval_shape(
    lambda r, x: net.init(r, x),
    jax.random.key(0),
    jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32),
  )
  for _, coll, path, kind in resnet_layout.torch_layout("resnext50_32x4d"):
    dtype = functools.reduce(lambda t, p: t[p], path, shapes[coll]).dtype
    assert dtype == (np.int32 if kind == resnet_layout.INT else np.float32)
  # kaiming_normal_(fan_out, relu): std sqrt(2 / (out * kh * kw)), grouped convs too; untruncated
  for shape in [(3, 3, 4, 256), (1, 1, 256, 1024)]:
    k = np.asarray(resnet._conv_init(jax.random.key(1), shape, jnp.float32))
    assert abs(k.std() / (2 / (shape[3] * shape[0] * shape[1])) ** 0.5 - 1) < 0.02, shape
    assert np.abs(k).max() / k.std() > 3 and abs(k.mean()) < 0.02 * k.std()
  bn = batchnorm.BatchNorm()
  v = bn.init(jax.random.key(0), jnp.ones((2, 4, 4, 8)), train=True)
  assert {k: float(a.sum()) for k, a in v["params"].items()} == {"scale": 8.0, "bias": 0.0}
  stats = v["batch_stats"]
  assert (stats["running_mean"] == 0).all() and (stats["running_var"] == 1).all()
  assert stats["num_batches_tracked"].dtype == jnp.int32 and stats["num_batches_tracked"] == 0
  # train mode with one value per channel: torch raises, so do we
  with pytest.raises(ValueError):
    tr.OfficialResNet("resnet18", pretrained=False).train()(torch.zeros(1, 3, 32, 32))
  with pytest.raises(UserError, match="more than 1 value per channel"):
    bn.apply(v, jnp.ones((1, 1, 1, 8)), train=True, mutable=["batch_stats"])
  with pytest.raises(UserError, match="NHWC"):
    jax.eval_shape(
      lambda x: net.init(jax.random.key(0), x), jax.ShapeDtypeStruct((1, 3, 32, 32), jnp.float32)
    )


def test_bfloat16_compute_keeps_float32_statistics():
  net = resnet.ResNet("resnet18", dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  variables = jax.eval_shape(net.init, jax.random.key(0), x)
  out, state = jax.eval_shape(
    lambda v, x: net.apply(v, x, train=True, mutable=["batch_stats"]), variables, x
  )
  assert out.dtype == jnp.bfloat16
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables["params"]))
  assert all(a.dtype in (jnp.float32, jnp.int32) for a in jax.tree.leaves(state))
  # the statistics of bf16 activations are float32 sums: those of the same values in float32
  h = jnp.asarray(images(2, 8, seed=8) * 3 + 1, jnp.bfloat16)
  bn16, bn32 = batchnorm.BatchNorm(dtype=jnp.bfloat16), batchnorm.BatchNorm()
  v = bn32.init(jax.random.key(0), h.astype(jnp.float32))
  y16, s16 = bn16.apply(v, h, train=True, mutable=["batch_stats"])
  y32, s32 = bn32.apply(v, h.astype(jnp.float32), train=True, mutable=["batch_stats"])
  assert y16.dtype == jnp.bfloat16
  for a, b in zip(jax.tree.leaves(s16), jax.tree.leaves(s32)):
    assert a.dtype == b.dtype and np.array_equal(a, b)
  assert np.array_equal(y16, y32.astype(jnp.bfloat16))
