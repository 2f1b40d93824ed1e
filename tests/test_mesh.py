"""The data x fsdp mesh: device order on 8 CPU devices, `config.mesh.dcn_data` groups (CPU
devices have no slices: N consecutive groups stand in for them), the checks' one-line errors,
and the topology-aware order on described TPU slices (with libtpu, compile-only, no chip)."""

import os

import jax
import ml_collections
import numpy as np
import pytest

from salad_jax import errors, sharding
from salad_jax.train import config as config_lib


def _ids(mesh):
  return np.vectorize(lambda d: d.id)(mesh.devices).tolist()


def test_cpu_order_and_dcn_groups():
  assert jax.device_count() == 8
  mesh = sharding.make_mesh(fsdp=2)
  assert mesh.axis_names == ("data", "fsdp")
  assert _ids(mesh) == [[0, 1], [2, 3], [4, 5], [6, 7]]
  assert sharding.describe_mesh(mesh) == "data=4 x fsdp=2: [[0, 1], [2, 3], [4, 5], [6, 7]]"
  # dcn_data=2: two groups of 4 (devices 0-3, 4-7) stand in for two slices; fsdp stays inside
  # one, the outer half of `data` spans them. Given in any order, groups follow (process, id).
  shuffled = [jax.devices()[i] for i in (5, 2, 7, 0, 3, 6, 1, 4)]
  mesh = sharding.make_mesh(shuffled, fsdp=2, dcn_data=2)
  assert _ids(mesh) == [[0, 1], [2, 3], [4, 5], [6, 7]]
  assert [[d.id for d in g] for g in sharding.mesh_groups(shuffled, 4)] == [
    [0, 1],
    [2, 3],
    [4, 5],
    [6, 7],
  ]
  mesh = sharding.make_mesh(fsdp=1, dcn_data=8)  # pure data parallelism over 8 groups
  assert mesh.shape == {"data": 8, "fsdp": 1}
  # the batch: device (i, j) holds rows of block i * fsdp + j, so a DCN group holds one
  # contiguous half of the batch
  mesh = sharding.make_mesh(fsdp=2, dcn_data=2)
  x = sharding.global_batch({"x": np.arange(16)}, mesh)["x"]
  rows = {s.device.id: s.data.tolist() for s in x.addressable_shards}
  assert rows == {i: [2 * i, 2 * i + 1] for i in range(8)}


@pytest.mark.parametrize(
  "fsdp,dcn_data,message,hint",
  [
    (3, 0, "config.mesh.fsdp=3 does not divide the 8 device(s)", "use one of [1, 2, 4, 8]"),
    (1, 3, "config.mesh.dcn_data=3 does not divide the 8 device(s)", "use one of [1, 2, 4, 8]"),
    (
      8,
      2,
      "config.mesh.fsdp=8 does not divide the 4 devices of each of the 2 DCN groups",
      "use one of [1, 2, 4]",
    ),
    (1, -1, "config.mesh.dcn_data=-1 must be an integer >= 0", "0 (auto"),
  ],
)
def test_layouts_that_do_not_fit_are_one_line(fsdp, dcn_data, message, hint):
  with pytest.raises(errors.UserError) as e:
    sharding.make_mesh(fsdp=fsdp, dcn_data=dcn_data)
  assert message in e.value.message and hint in e.value.hint, (e.value.message, e.value.hint)
  assert "\n" not in e.value.message + e.value.hint
  config = config_lib.base_config()
  config.mesh.fsdp, config.mesh.dcn_data = fsdp, dcn_data
  with pytest.raises(errors.UserError, match="config.mesh"):
    config_lib.check_mesh(config)


def test_config_checks_dcn_data():
  config = config_lib.base_config()
  assert config.mesh.dcn_data == 0  # auto: one group per TPU slice
  config_lib.check(config)
  config_lib.check_mesh(config)
  with config.unlocked():
    config.mesh = ml_collections.ConfigDict(dict(fsdp=1, dcn_data="2"))
  with pytest.raises(errors.UserError, match=r"config.mesh.dcn_data = '2'"):
    config_lib.check(config)


@pytest.fixture(scope="module")
def topologies():
  """TPU devices described by libtpu (compile-only: no chip). Skipped without libtpu, which
  is not a dependency (`pip install "libtpu==0.0.42.*"`)."""
  pytest.importorskip("libtpu")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no chip to own
  from jax.experimental import topologies as topo

  try:
    return {
      "v5e:2x4": list(topo.get_topology_desc("v5e:2x4", "tpu").devices),
      "v5e:2x4 x2": list(topo.get_topology_desc("v5e:2x4", "tpu", num_slices=2).devices),
      "v5e:4x4": list(topo.get_topology_desc("v5e:4x4", "tpu").devices),
    }
  except Exception as e:  # noqa: BLE001  (a libtpu that cannot describe topologies here)
    pytest.skip(f"libtpu cannot describe TPU topologies here: {e}")


def test_tpu_slice_order_follows_the_torus(topologies):
  """v5e 2x4 (chips at x in 0..1, y in 0..3): the mesh walks the torus as a ring, 0 1 2 3 7 6
  5 4, so consecutive fsdp members are ICI neighbours (id order would put 3 next to 4, which
  are not neighbours)."""
  devs = topologies["v5e:2x4"]
  assert sharding.num_slices(devs) is None  # one slice described without num_slices
  assert _ids(sharding.make_mesh(devs, fsdp=8)) == [[0, 1, 2, 3, 7, 6, 5, 4]]
  assert _ids(sharding.make_mesh(devs, fsdp=2)) == [[0, 1], [2, 3], [7, 6], [5, 4]]
  # 8 x 2 on a 4x4 torus needs a physical axis split: allowed, still a valid mesh
  mesh = sharding.make_mesh(topologies["v5e:4x4"], fsdp=2)
  assert mesh.shape == {"data": 8, "fsdp": 2}
  assert sorted(np.ravel(_ids(mesh))) == list(range(16))


def test_two_slices_data_parallel_over_dcn(topologies):
  devs = topologies["v5e:2x4 x2"]
  assert sharding.num_slices(devs) == 2
  mesh = sharding.make_mesh(devs, fsdp=8)  # dcn_data=0: one group per slice
  ring = [0, 1, 2, 3, 7, 6, 5, 4]
  assert _ids(mesh) == [[100000 + i for i in ring], [200000 + i for i in ring]]
  for row in mesh.devices:  # an fsdp group never crosses a slice
    assert len({d.slice_index for d in row}) == 1
  mesh = sharding.make_mesh(devs, fsdp=2, dcn_data=2)
  assert mesh.shape == {"data": 8, "fsdp": 2}
  assert [d.slice_index for d in mesh.devices[:, 0]] == [0, 0, 0, 0, 1, 1, 1, 1]
  with pytest.raises(errors.UserError) as e:
    sharding.make_mesh(devs, fsdp=8, dcn_data=1)
  assert "form 2 TPU slice(s)" in e.value.message and "dcn_data=2" in e.value.hint
  with pytest.raises(errors.UserError, match="8 devices of each of the 2 DCN groups"):
    sharding.make_mesh(devs, fsdp=16)
