"""GSV-Cities reader, the reference's place sampler, the grain pipeline and the TFDS build."""

import os

import numpy as np
import pytest
from PIL import Image

from salad_jax.data import gsv_cities, pipeline

from helpers import make_gsv

CITIES = {
  "Alpha": [4, 5, 3, 6, 4, 8, 4, 2, 5, 4],
  "Beta": [4, 4, 7, 4, 1, 4],
  "Gamma": [6, 4, 4, 4, 5],
}


@pytest.fixture(scope="module")
def gsv(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("gsv"))
  files = make_gsv(root, CITIES)
  return root, files, gsv_cities.read_gsv_cities(root, tuple(CITIES))


def test_image_name_rule():
  name = gsv_cities.image_name("PRS", 100_042, 2016, 7, 5, 48.8566, 2.35, "abcXYZ")
  assert name == "PRS_0000042_2016_07_005_48.8566_2.35_abcXYZ.jpg"


def test_reader_prefixes_ids_drops_small_places_and_finds_every_file(gsv):
  root, files, ds = gsv
  kept = [
    (ci, p) for ci, (c, counts) in enumerate(CITIES.items()) for p, n in enumerate(counts) if n >= 4
  ]
  assert ds.num_places == len(kept)
  assert sorted(ds.place_ids.tolist()) == sorted(ci * 100_000 + p for ci, p in kept)
  for pos in range(ds.num_places):
    ci, pid = divmod(int(ds.place_ids[pos]), 100_000)
    city = list(CITIES)[ci]
    names = sorted(os.path.basename(str(ds.paths[i])) for i in ds.place_images(pos))
    assert names == sorted(files[(city, pid)])
    assert all(os.path.isfile(ds.image_path(i)) for i in ds.place_images(pos))


def test_reader_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="Dataframes.*kaggle"):
    gsv_cities.read_gsv_cities(str(tmp_path), ("London",))
  make_gsv(str(tmp_path), {"Tiny": [2, 3, 1]})
  with pytest.raises(ValueError, match="no place .* has >= 4 images"):
    gsv_cities.read_gsv_cities(str(tmp_path), ("Tiny",))
  with pytest.raises(FileNotFoundError, match="Missing.csv") as e:
    gsv_cities.read_gsv_cities(str(tmp_path), ("Tiny", "Missing"))
  # issue 20: one line that says which cities there are and where to choose them
  assert "(Dataframes/ has 1 cities: Tiny)" in e.value.message
  assert "train.py --config.data.cities=Tiny,..." in e.value.hint
  (tmp_path / "Dataframes" / "Empty.csv").write_text(
    "place_id,year,month,northdeg,city_id,lat,lon,panoid\n"
  )
  with pytest.raises(ValueError, match="no place"):
    gsv_cities.read_gsv_cities(str(tmp_path), ("Empty",))


def test_epoch_order_is_city_major_shuffled_within_cities_and_reshuffled_each_epoch(gsv):
  _, _, ds = gsv
  o0, o1 = gsv_cities.epoch_place_order(ds, 0, 0), gsv_cities.epoch_place_order(ds, 0, 1)
  assert sorted(o0.tolist()) == list(range(ds.num_places)) == sorted(o1.tolist())
  cities0 = ds.place_city[o0]
  assert (np.diff(cities0) >= 0).all()  # cities in list order, never interleaved
  assert not np.array_equal(o0, o1)  # a new shuffle every epoch
  np.testing.assert_array_equal(o0, gsv_cities.epoch_place_order(ds, 0, 0))  # deterministic
  assert not np.array_equal(o0, gsv_cities.epoch_place_order(ds, 1, 0))  # depends on the seed


def test_first_appearance_order_favours_places_with_more_images(gsv):
  """pandas sample(frac=1) + unique: a place with many rows tends to come first in its city."""
  _, _, ds = gsv
  big = int(np.argmax(np.diff(ds.place_start) * (ds.place_city == 0)))  # Alpha place with 8 images
  ranks = [list(gsv_cities.epoch_place_order(ds, 0, e)).index(big) for e in range(300)]
  assert np.mean(ranks) < (ds.place_city == 0).sum() / 2 - 0.5


def _batches(ds, n_proc=1, proc=0, **kw):
  args = dict(
    places_per_batch=4,
    img_per_place=4,
    image_size=(28, 28),
    num_epochs=2,
    seed=3,
    randaugment=False,
  )
  args.update(kw)
  it, spec = pipeline.train_dataset(ds, process_index=proc, process_count=n_proc, **args)
  return list(it), spec


def test_batches_are_place_major_with_k_distinct_images_and_a_padded_last_batch(gsv):
  _, _, ds = gsv
  batches, spec = _batches(ds)
  assert spec.steps_per_epoch == -(-ds.num_places // 4) and len(batches) == 2 * spec.steps_per_epoch
  seen = []
  for b in batches[: spec.steps_per_epoch]:
    assert b["images"].shape == (16, 28, 28, 3) and b["images"].dtype == np.uint8
    labels, valid = b["labels"].reshape(4, 4), b["valid"].reshape(4, 4)
    for p in range(4):
      if not valid[p].any():
        assert (labels[p] == -1).all()
        continue
      assert valid[p].all() and (labels[p] == labels[p, 0]).all()
      imgs = b["images"].reshape(4, 4, 28, 28, 3)[p]
      keys = {tuple(im[14, 14]) for im in imgs}  # each image of a place has its own colour
      assert len(keys) == 4
      seen.append(int(labels[p, 0]))
  assert sorted(seen) == sorted(ds.place_ids.tolist())  # every place once per epoch
  last = batches[spec.steps_per_epoch - 1]
  assert last["valid"].sum() == 16 - (4 * spec.steps_per_epoch - ds.num_places) * 4


def test_two_processes_split_every_batch_and_cover_each_place_once(gsv):
  _, _, ds = gsv
  full, spec = _batches(ds, num_epochs=1)
  p0, _ = _batches(ds, n_proc=2, proc=0, num_epochs=1)
  p1, _ = _batches(ds, n_proc=2, proc=1, num_epochs=1)
  assert len(p0) == len(p1) == spec.steps_per_epoch
  for f, a, b in zip(full, p0, p1):
    np.testing.assert_array_equal(np.concatenate([a["labels"], b["labels"]]), f["labels"])
    np.testing.assert_array_equal(np.concatenate([a["images"], b["images"]]), f["images"])
  ids = np.concatenate([b["labels"][b["valid"]] for b in p0 + p1])
  assert sorted(set(ids.tolist())) == sorted(ds.place_ids.tolist())


def test_processes_pad_whole_places_when_places_do_not_divide(gsv):
  """5 places over 2 processes: 3 each, process 1's third a padding place; the real places and
  their example ids are one process's batch (ids: place position in the step x K + k)."""
  _, _, ds = gsv
  full, _ = _batches(ds, num_epochs=1, places_per_batch=5)
  p0, spec = _batches(ds, n_proc=2, proc=0, num_epochs=1, places_per_batch=5)
  p1, _ = _batches(ds, n_proc=2, proc=1, num_epochs=1, places_per_batch=5)
  assert spec.local_places == 3 and spec.padding_places == 1
  for f, a, b in zip(full, p0, p1):
    assert a["images"].shape == b["images"].shape == (12, 28, 28, 3)
    assert not b["valid"][8:].any() and (b["ids"][8:] == -1).all() and (b["labels"][8:] == -1).all()
    for key in ("images", "labels", "valid", "ids"):
      np.testing.assert_array_equal(np.concatenate([a[key], b[key][:8]]), f[key])
  ids = full[0]["ids"]
  np.testing.assert_array_equal(ids, np.arange(20))


def test_iterator_state_restores_the_identical_next_batch(gsv):
  _, _, ds = gsv
  it, _ = pipeline.train_dataset(
    ds, places_per_batch=4, img_per_place=4, image_size=(28, 28), num_epochs=2, seed=0
  )
  it = iter(it)
  for _ in range(3):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(2)]
  fresh, _ = pipeline.train_dataset(
    ds, places_per_batch=4, img_per_place=4, image_size=(28, 28), num_epochs=2, seed=0
  )
  fresh = iter(fresh)
  fresh.set_state(state)
  for w in want:
    got = next(fresh)
    for k in w:
      np.testing.assert_array_equal(got[k], w[k])


def test_worker_processes_give_the_same_batches(gsv):
  _, _, ds = gsv
  a, _ = _batches(ds, num_epochs=1, randaugment=True)
  b, _ = _batches(ds, num_epochs=1, randaugment=True, num_workers=2)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["images"], y["images"])
    np.testing.assert_array_equal(x["labels"], y["labels"])


def test_corrupt_and_missing_training_images_become_black_and_are_counted(tmp_path):
  root = str(tmp_path)
  files = make_gsv(root, {"Solo": [4, 4]})
  bad = os.path.join(root, "Images", "Solo", files[("Solo", 0)][1])
  with open(bad, "wb") as f:
    f.write(b"\xff\xd8\xff\xe0 definitely not a jpeg")
  os.remove(os.path.join(root, "Images", "Solo", files[("Solo", 1)][2]))
  ds = gsv_cities.read_gsv_cities(root, ("Solo",))
  (b,), _ = _batches(ds, places_per_batch=2, num_epochs=1)
  assert int(b["corrupt"]) == 2
  black = [i for i in range(8) if not b["images"][i].any()]
  assert len(black) == 2


def test_damaged_jpeg_decodes_like_the_reference_and_is_counted_and_logged(tmp_path, caplog):
  from salad_jax.data import images

  root = str(tmp_path)
  files = make_gsv(root, {"Solo": [4]}, size=(200, 150))
  path = os.path.join(root, "Images", "Solo", files[("Solo", 0)][0])
  noise = np.random.default_rng(0).integers(0, 256, (150, 200, 3), dtype=np.uint8)
  Image.fromarray(noise).save(path, quality=90)
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[: int(len(data) * 0.7)])  # the scan data is cut; headers are intact
  ds = gsv_cities.read_gsv_cities(root, ("Solo",))
  (b,), _ = _batches(ds, places_per_batch=1, num_epochs=1)
  assert int(b["corrupt"]) == 1  # decoded (as with PIL's LOAD_TRUNCATED_IMAGES), and counted
  want = np.asarray(
    images.resize(images.decode(data[: int(len(data) * 0.7)], "x", damaged="allow")[0], (28, 28))
  )
  assert any(np.array_equal(im, want) for im in b["images"]) and want.any()
  assert [
    r
    for r in caplog.records
    if "damaged training image" in r.getMessage() and os.path.basename(path) in r.getMessage()
  ]


def _counting(ds):
  """A copy of ds that counts its image reads."""
  import copy
  import threading

  class Counting(type(ds)):
    lock, reads = threading.Lock(), [0]

    def image_path(self, i):  # every reader opens its file by this path
      with self.lock:
        self.reads[0] += 1
      return super().image_path(i)

  out = copy.copy(ds)
  out.__class__ = Counting
  return out


def test_read_ahead_is_bounded_to_a_few_batches(gsv):
  """The prefetch buffer counts batches: it once held max(2 * places, threads) of them."""
  import time

  _, _, ds = gsv
  ds = _counting(ds)
  it, _ = pipeline.train_dataset(
    ds,
    places_per_batch=4,
    img_per_place=4,
    image_size=(28, 28),
    num_epochs=8,
    seed=0,
    num_threads=8,
    randaugment=False,
  )
  it = iter(it)
  next(it)
  time.sleep(1.0)  # let the read-ahead fill up
  per_batch = 16  # the consumed batch + PREFETCH_BATCHES (2) read ahead; it was 8 read ahead
  assert per_batch <= ds.reads[0] <= 3 * per_batch


def test_corrupt_count_matches_the_warnings_at_every_step(tmp_path, caplog):
  root = str(tmp_path)
  files = make_gsv(root, {"Solo": [4] * 12})
  for pid in range(12):  # one unreadable image in every place
    with open(os.path.join(root, "Images", "Solo", files[("Solo", pid)][pid % 4]), "wb") as f:
      f.write(b"not an image")
  ds = gsv_cities.read_gsv_cities(root, ("Solo",))
  it, spec = pipeline.train_dataset(
    ds,
    places_per_batch=2,
    img_per_place=4,
    image_size=(28, 28),
    num_epochs=1,
    seed=0,
    num_threads=4,
    randaugment=False,
  )
  it, total = iter(it), 0
  for _ in range(spec.steps_per_epoch):
    b = next(it)
    total += int(b["corrupt"])
    warned = [
      r
      for r in caplog.records
      if r.levelname == "WARNING" and "unreadable training image" in r.getMessage()
    ]
    assert len(warned) == total
  assert total > 0


def test_eval_batches_have_a_static_shape_and_a_validity_mask(tmp_path):
  paths = []
  for i in range(7):
    p = str(tmp_path / f"{i}.png")
    Image.new("RGB", (50 + i, 40), (i * 30, 0, 0)).save(p)
    paths.append(p)
  batches = list(pipeline.eval_dataset(paths, image_size=(28, 42), batch_size=4))
  assert [b["images"].shape for b in batches] == [(4, 28, 42, 3)] * 2
  np.testing.assert_array_equal(
    np.concatenate([b["index"] for b in batches]), [0, 1, 2, 3, 4, 5, 6, -1]
  )
  assert batches[1]["valid"].tolist() == [True, True, True, False]
  # two processes: each loads its half of every global batch
  halves = [
    list(
      pipeline.eval_dataset(
        paths, image_size=(28, 42), batch_size=4, process_index=i, process_count=2
      )
    )
    for i in range(2)
  ]
  got = np.concatenate([np.concatenate([h[g]["index"] for h in halves]) for g in range(2)])
  np.testing.assert_array_equal(got, [0, 1, 2, 3, 4, 5, 6, -1])
