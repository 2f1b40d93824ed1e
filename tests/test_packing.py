"""Pre-resized GSV-Cities packs: bit-identical batches, bad input, and a pack killed midway."""

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from salad_jax import losses
from salad_jax.data import gsv_cities, images, pack, pack_records, pack_shards, pipeline, tfds_gsv
from salad_jax.errors import UserError

from helpers import make_gsv

CITIES = {
  "Alpha": [4, 5, 3, 6, 4, 8, 4, 2, 5, 4],
  "Beta": [4, 4, 7, 4, 1, 4],
  "Gamma": [6, 4, 4, 4, 5],
}
SIZE = (28, 28)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _textured_gsv(root):
  """make_gsv's tree with noise JPEGs (so resize and RandAugment matter), one unreadable file
  and one truncated JPEG."""
  files = make_gsv(root, CITIES)
  rng = np.random.default_rng(0)
  for (city, _), names in sorted(files.items()):
    for name in names:
      arr = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
      Image.fromarray(arr).save(os.path.join(root, "Images", city, name), quality=90)
  bad = os.path.join(root, "Images", "Alpha", files[("Alpha", 0)][1])
  with open(bad, "wb") as f:
    f.write(b"not a jpeg")
  cut = os.path.join(root, "Images", "Beta", files[("Beta", 1)][2])
  data = open(cut, "rb").read()
  with open(cut, "wb") as f:
    f.write(data[: len(data) * 2 // 3])
  return files


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("gsv"))
  _textured_gsv(root)
  raw, jpeg = str(tmp_path_factory.mktemp("raw")), str(tmp_path_factory.mktemp("jpeg"))
  tfds_gsv.build(root, raw, image_size=SIZE, num_workers=1, images_per_shard=16, progress=False)
  tfds_gsv.build(root, jpeg, num_workers=1, progress=False)
  return root, raw, jpeg


def _epoch(ds, **kw):
  args = dict(
    places_per_batch=4,
    img_per_place=4,
    image_size=SIZE,
    num_epochs=1,
    seed=7,
    randaugment=True,
    num_threads=2,
  )
  args.update(kw)
  return list(pipeline.train_dataset(ds, **args)[0])


PROJ = np.random.default_rng(0).standard_normal((SIZE[0] * SIZE[1] * 3, 32)).astype(np.float32)


@functools.cache
def _loss_fn():
  import jax

  return jax.jit(lambda d, lab, v: losses.multi_similarity_loss(d, lab, valid=v)[0])


def _loss(batch):
  """The multi-similarity loss of fixed random-projection descriptors of the batch."""
  x = images.normalize(batch["images"]).reshape(len(batch["images"]), -1)
  return float(_loss_fn()(x @ PROJ, batch["labels"], batch["valid"]))


def test_packed_batches_are_bit_identical_to_the_files(packs):
  root, raw, jpeg = packs
  files = gsv_cities.read_gsv_cities(root, tuple(CITIES))
  for data_dir, size, ra in ((raw, SIZE, True), (raw, SIZE, False), (jpeg, None, True)):
    ds = tfds_gsv.open_gsv_cities(data_dir, image_size=size)
    assert ds.image_size == (SIZE if size else None)
    want, packed = _epoch(files, randaugment=ra), _epoch(ds, randaugment=ra)
    assert len(packed) == len(want) == 5
    for f, p in zip(want, packed):
      assert sorted(f) == sorted(p)
      for k in f:
        np.testing.assert_array_equal(f[k], p[k], err_msg=k)
      assert _loss(f) == _loss(p)
    assert sum(int(b["corrupt"]) for b in want) > 0  # the bad images were sampled and counted


def test_pack_flags_and_reports_unreadable_and_damaged_images(packs):
  _, raw, _ = packs
  path = pack_records.pack_dir(raw, SIZE)
  meta = json.load(open(os.path.join(path, "metadata.json")))
  assert (meta["unreadable"], meta["damaged"], meta["image_size"]) == (1, 1, list(SIZE))
  ds = tfds_gsv.open_gsv_cities(raw, image_size=SIZE)
  status = {int(ds.source[i]["status"]) for i in range(len(ds.paths))}
  assert status == {images.OK, images.DAMAGED, images.UNREADABLE}
  black = [i for i in range(len(ds.paths)) if ds.source[i]["status"] == images.UNREADABLE]
  assert not np.asarray(ds.read_image(black[0])[0]).any()  # the reference's black image


def test_a_pack_of_another_size_is_a_clear_error(packs):
  _, raw, _ = packs
  with pytest.raises(UserError, match=r"resized to 28x28.*image_size is 32x32"):
    tfds_gsv.open_gsv_cities(raw, image_size=(32, 32))
  with pytest.raises(UserError, match=r"resized to 28x28.*image_size is 32x32"):
    tfds_gsv.open_gsv_cities(pack_records.pack_dir(raw, SIZE), image_size=(32, 32))


def test_corrupt_records_and_cut_shards_are_errors_naming_them(packs, tmp_path):
  _, raw, _ = packs
  src = pack_records.pack_dir(raw, SIZE)
  bad = str(tmp_path / "bad")
  shutil.copytree(src, bad)
  shard = os.path.join(bad, "gsv_cities-train.array_record-00001-of-00006")
  data = bytearray(open(shard, "rb").read())
  data[5000:5064] = bytes(
    64
  )  # inside the 16 records of ~2.5 KB (the file is padded to 64 KiB blocks)
  open(shard, "wb").write(bytes(data))
  ds = tfds_gsv.open_gsv_cities(bad, image_size=SIZE)
  with pytest.raises(tfds_gsv.CorruptRecordError, match=r"corrupt record 1\d in .*bad"):
    for i in range(16, 32):
      ds.read_image(i)
  open(shard, "wb").write(bytes(data[: len(data) // 2]))
  with pytest.raises(tfds_gsv.CorruptRecordError, match=r"shard .*00001-of-00006 holds 0 records"):
    tfds_gsv.open_gsv_cities(bad, image_size=SIZE)


def _records(path):
  ds = tfds_gsv.open_gsv_cities(
    os.path.dirname(os.path.dirname(os.path.dirname(path))), image_size=SIZE, min_img_per_place=1
  )
  return [
    (r["image"], int(r["status"]), r["name"]) for r in (ds.source[i] for i in range(len(ds.paths)))
  ]


def _killed_pack(root, out):
  """`python -m salad_jax.data.tfds_gsv` of `root` in 46 shards, stopped once a shard is
  committed and killed: a real interruption. Returns (final dir, staging dir, committed)."""
  final = pack_records.pack_dir(out, SIZE)
  staging = final + ".partial"
  cmd = [
    sys.executable,
    "-m",
    "salad_jax.data.tfds_gsv",
    "--manual_dir",
    root,
    "--data_dir",
    out,
    "--image_size",
    "28,28",
    "--num_workers",
    "1",
    "--images_per_shard",
    "2",
  ]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 120
    while time.time() < deadline:
      done = [
        f
        for f in (os.listdir(staging) if os.path.isdir(staging) else [])
        if f.endswith("-of-00046")
      ]
      if done:
        proc.send_signal(signal.SIGSTOP)
        break
      assert proc.poll() is None, "the pack ended before it could be interrupted"
      time.sleep(0.005)
    assert done, "no shard was committed in time"
  finally:
    proc.kill()
    proc.wait()
  committed = sorted(f for f in os.listdir(staging) if f.endswith("-of-00046"))
  assert 0 < len(committed) < 46
  return final, staging, committed


def test_a_killed_pack_resumes_in_parallel_and_equals_a_clean_pack(packs, tmp_path, capsys):
  root, raw, _ = packs
  out = str(tmp_path / "out")
  final, staging, committed = _killed_pack(root, out)
  assert not os.path.exists(final)  # never a partial dataset under the final name
  with pytest.raises(FileNotFoundError, match="no gsv_cities TFDS build"):
    tfds_gsv.open_gsv_cities(out, image_size=SIZE)
  pack.pack(root, out, image_size=SIZE, num_workers=2, images_per_shard=2, progress=False)
  assert f"resuming: {len(committed)} of 46 shards" in capsys.readouterr().out
  assert not os.path.exists(staging)
  assert _records(final) == _records(pack_records.pack_dir(raw, SIZE))


def _rewrite_keeping_size_and_mtime(path):
  """Another picture in the same number of bytes, with the old modification time restored."""
  st = os.stat(path)
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # entropy-coded data: other pixels
  open(path, "wb").write(bytes(data))
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
  assert os.path.getsize(path) == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns


def test_a_pack_resumed_after_its_source_changed_writes_those_shards_again(packs, tmp_path, capsys):
  """The resume key had no file identity: a resume mixed old and new images of one city."""
  root = str(tmp_path / "src")
  shutil.copytree(packs[0], root)
  out = str(tmp_path / "out")
  final, _, committed = _killed_pack(root, out)
  shard = int(committed[0].split("-")[-3])
  ds = gsv_cities.read_gsv_cities(root, pack.cities_in(root), min_img_per_place=1)
  i = next(
    int(i)
    for i in ds.order[2 * shard : 2 * shard + 2]
    if pack_shards.encode_image(ds.image_path(int(i)), SIZE)[1] == images.OK
  )
  path, name = ds.image_path(i), str(ds.paths[i])
  old = pack_shards.encode_image(path, SIZE)[0]
  _rewrite_keeping_size_and_mtime(path)
  new = pack_shards.encode_image(path, SIZE)[0]
  assert new != old
  pack.pack(root, out, image_size=SIZE, num_workers=1, images_per_shard=2, progress=False)
  said = capsys.readouterr().out
  if len(committed) > 1:
    assert f"resuming: {len(committed) - 1} of 46 shards" in said
  assert "1 shard(s) already written are written again: their source images changed" in said
  got = [image for image, _, n in _records(final) if n in (name, name.encode())]
  assert got == [new]  # the image as it is now, not as the killed pack read it
  # a finished pack whose source changed is refused, never reported as "already packed"
  _rewrite_keeping_size_and_mtime(path)
  with pytest.raises(UserError, match="was packed from other source files") as e:
    pack.pack(root, out, image_size=SIZE, num_workers=1, images_per_shard=2, progress=False)
  assert f"delete {final}" in e.value.hint


def test_a_staging_dir_of_another_job_is_restarted_from_scratch(packs, tmp_path, capsys):
  root, raw, _ = packs
  out = str(tmp_path / "out")
  staging = pack_records.pack_dir(out, SIZE) + ".partial"
  os.makedirs(staging)
  with open(os.path.join(staging, pack.JOB_FILE), "w") as f:
    json.dump({"images": 3}, f)
  with open(os.path.join(staging, "gsv_cities-train.array_record-00000-of-00006"), "wb") as f:
    f.write(b"left over")
  with open(os.path.join(staging, "gsv_cities-train.array_record-00000-of-00006.json"), "w") as f:
    json.dump({"records": 16, "damaged": [], "unreadable": []}, f)
  pack.pack(root, out, image_size=SIZE, num_workers=1, images_per_shard=16, progress=False)
  assert "starting from scratch" in capsys.readouterr().out
  assert _records(pack_records.pack_dir(out, SIZE)) == _records(pack_records.pack_dir(raw, SIZE))
  with pytest.raises(UserError, match="already holds a different pack"):
    pack.pack(root, out, image_size=SIZE, cities=("Alpha", "Beta"), num_workers=1, progress=False)


def test_cli_errors_are_one_line(tmp_path):
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "salad_jax.data.tfds_gsv",
      "--manual_dir",
      str(tmp_path),
      "--data_dir",
      str(tmp_path / "o"),
      "--image_size",
      "224",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
  )
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert "error: --image_size '224': expected H,W" in r.stderr
  # a size DINOv2 cannot take is refused before packing; a ResNet's pack (MixVPR: 320x320) is not
  common = [sys.executable, "-m", "salad_jax.data.tfds_gsv", "--manual_dir", str(tmp_path)]
  common += ["--data_dir", str(tmp_path / "o"), "--image_size", "320,320"]
  r = subprocess.run(common, cwd=REPO, capture_output=True, text=True)
  assert "error: --image_size 320,320: image 320x320: height and width must be multiples of 14" in (
    r.stderr
  )
  assert "hint: the paper trains at 224,224; a ResNet takes any size" in r.stderr
  r = subprocess.run(common + ["--backbone", "resnet50"], cwd=REPO, capture_output=True, text=True)
  assert "image_size" not in r.stderr and "GSV-Cities not found" in r.stderr  # past the size


def test_the_order_of_the_cities_does_not_make_another_pack(packs, capsys):
  """issue 20: "differs in cities" without the lists; the same cities in another order are the
  same pack (for packing again and for training from it)."""
  from salad_jax.data import source
  from salad_jax.train import config

  root, raw, _ = packs
  build = lambda cities: tfds_gsv.build(  # noqa: E731
    root, raw, cities=cities, image_size=SIZE, num_workers=1, images_per_shard=16, progress=False
  )
  capsys.readouterr()
  build(["Gamma", "Alpha", "Beta"])
  assert "already packed" in capsys.readouterr().out
  with pytest.raises(UserError) as e:
    build(["Beta", "Alpha"])
  assert (
    "differs in cities: it holds Alpha,Beta,Gamma, you asked for Beta,Alpha)" in e.value.message
  )
  c = config.base_config()
  c.data.source, c.data.tfds_data_dir, c.data.image_size = "tfds", raw, SIZE
  c.data.cities, c.data.min_img_per_place = "Gamma,Beta,Alpha", 1
  assert source.open_source(c).cities == ("Alpha", "Beta", "Gamma")  # the pack's order
  c.data.cities = "Gamma,Beta"
  with pytest.raises(UserError, match="holds the cities Alpha,Beta,Gamma, but config.data.cities"):
    source.open_source(c)
