"""Checks the ResNet wrapper of tests/torch_resnet.py against serizba/salad's own wrapper.

Runs only when SALAD_OFFICIAL_SRC points to a folder holding `salad/models/` (as for
test_reference_vs_official.py). torchvision cannot be imported next to this torch, so the
official `models/backbones/resnet.py` runs against a stand-in `torchvision` module whose
factories build tests/torch_resnet.py's torchvision-layout ResNet; what is checked is the
wrapper: which factory a name picks, freezing, cropping, out_channels, forward, state_dict keys.
"""

import importlib.util
import os
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch_resnet as tr  # noqa: E402

from salad_jax.models import resnet  # noqa: E402

SRC = os.environ.get("SALAD_OFFICIAL_SRC")
pytestmark = pytest.mark.skipif(
  not SRC, reason="set SALAD_OFFICIAL_SRC to a checkout of the official salad code"
)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
  n = torch.get_num_threads()
  torch.set_num_threads(1)  # small convs: a second thread spin-waits more than it helps
  yield
  torch.set_num_threads(n)


@pytest.fixture(scope="module")
def official():
  built = []

  def factory(arch):
    def make(weights=None):
      built.append((arch, weights))
      return tr.TorchvisionResNet(arch)

    return make

  fake = types.ModuleType("torchvision")
  fake.models = types.SimpleNamespace(**{a: factory(a) for a in tr.ARCHS})
  saved = sys.modules.get("torchvision")
  sys.modules["torchvision"] = fake
  try:
    path = os.path.join(SRC, "salad/models/backbones/resnet.py")
    spec = importlib.util.spec_from_file_location("official_resnet", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
  finally:
    if saved is None:
      sys.modules.pop("torchvision")
    else:
      sys.modules["torchvision"] = saved
  return mod.ResNet, built


NAMES = list(tr.ARCHS) + ["resnext101_32x8d", "my_resnet18"]


@pytest.mark.parametrize("name", NAMES)
def test_name_lookup_crop_and_channels_match_the_official_wrapper(official, name):
  cls, built = official
  for crop in ([], [4], [3, 4]):
    built.clear()
    off = cls(name, pretrained=False, layers_to_freeze=2, layers_to_crop=crop)
    assert built == [(resnet.official_arch(name), None)] == [(tr.official_arch(name), None)]
    assert off.out_channels == tr.official_out_channels(name, crop)
    ours = tr.OfficialResNet(name, pretrained=False, layers_to_crop=crop)
    assert list(off.state_dict()) == list(ours.state_dict())


@pytest.mark.parametrize("level", [-1, 0, 1, 2, 3, 4])
def test_freezing_matches_the_official_wrapper(official, level):
  cls, built = official
  for pretrained in (True, False):
    torch.manual_seed(0)
    off = cls("resnet50", pretrained=pretrained, layers_to_freeze=level)
    ours = tr.OfficialResNet("resnet50", pretrained=pretrained, layers_to_freeze=level)
    assert built[-1][1] == ("IMAGENET1K_V1" if pretrained else None)
    assert [k for k, p in off.named_parameters() if p.requires_grad] == [
      k for k, p in ours.named_parameters() if p.requires_grad
    ]


def test_forward_matches_the_official_wrapper(official):
  cls, _ = official
  for name, crop in [("resnet18", []), ("resnet50", [4]), ("resnext50_32x4d", [3, 4])]:
    off = cls(name, pretrained=True, layers_to_freeze=2, layers_to_crop=crop)
    ours = tr.randomize_(tr.OfficialResNet(name, layers_to_crop=crop), seed=3).eval()
    off.load_state_dict(ours.state_dict(), strict=True)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype("f4"))
    with torch.no_grad():
      assert torch.equal(off.eval()(x), ours(x))
