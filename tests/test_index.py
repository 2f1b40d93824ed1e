"""Describe a folder, index it, search it: same neighbours as evaluation's exact search, files
that round-trip and refuse what is not theirs, approximate kinds and PCA-whitening."""

import os
import zipfile

import numpy as np
import pytest
from PIL import Image

import salad_jax
from salad_jax.data import eval_sets
from salad_jax.evaluation import search
from salad_jax.index import PCA, Index, describe_folder, fit_pca


def clustered(n, d, centres=40, noise=0.3, seed=0):
  """Unit vectors around `centres` random directions (descriptors of n images of few places)."""
  rng = np.random.default_rng(seed)
  c = rng.standard_normal((centres, d)).astype(np.float32)
  x = c[rng.integers(0, centres, n)] + noise * rng.standard_normal((n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def noisy_copies(db, n, seed=1, noise=0.05):
  rng = np.random.default_rng(seed)
  q = db[rng.choice(len(db), n, replace=False)] + noise * rng.standard_normal(
    (n, db.shape[1])
  ).astype(np.float32)
  return q / np.linalg.norm(q, axis=1, keepdims=True)


def names(n):
  return [f"db/{i:05d}.jpg" for i in range(n)]


# ------------------------------------------------------------------------------ describe_folder
def test_describe_folder_reads_as_evaluation_in_one_batch_shape(tmp_path, tiny_model_dir):
  rng = np.random.default_rng(0)
  folder = tmp_path / "photos"
  (folder / "street" / "deeper").mkdir(parents=True)
  files = ["a.jpg", "street/b.PNG", "street/c.jpeg", "street/deeper/d.JPG", "e.png"]
  for i, f in enumerate(files):
    size = (60 + 10 * i, 50 + 7 * i)  # all sizes differ: the resize is part of what is checked
    Image.fromarray(rng.integers(0, 256, size[::-1] + (3,), dtype=np.uint8)).save(folder / f)
  (folder / "notes.txt").write_text("not an image")
  model = salad_jax.load(tiny_model_dir)
  shapes = []
  real_describe = model.describe
  model.describe = lambda x: (shapes.append(np.shape(x)), real_describe(x))[1]
  desc, paths = describe_folder(
    model, str(folder), image_size=(56, 56), batch_size=2, progress=False
  )
  assert paths == eval_sets.read_image_paths(str(folder)) and len(paths) == 5
  assert shapes == [(2, 56, 56, 3)] * 3  # 5 images: three batches of one shape, the last padded
  x = salad_jax.preprocess(paths, size=(56, 56))
  want = np.concatenate([real_describe(x[i : i + 2]) for i in (0, 2)] + [real_describe(x[3:5])[1:]])
  assert desc.dtype == np.float32 and desc.shape == (5, model.descriptor_dim)
  np.testing.assert_allclose(desc, want, atol=1e-6)
  # describe a folder, index it, find each image again by its own descriptor
  found, dist = Index(desc, paths).search(desc, 1)
  assert [r[0] for r in found] == paths and np.all(dist[:, 0] < 1e-8)


def test_describe_folder_errors(tmp_path, tiny_model_dir):
  model = salad_jax.load(tiny_model_dir)
  with pytest.raises(ValueError, match="does not exist"):
    describe_folder(model, str(tmp_path / "nowhere"), image_size=(56, 56))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="contains no images"):
    describe_folder(model, str(tmp_path / "empty"), image_size=(56, 56))
  with pytest.raises(ValueError, match="multiples of 14"):
    describe_folder(model, str(tmp_path / "empty"), image_size=(50, 50))


# ------------------------------------------------------------------------------ exact search
def test_exact_search_is_evaluations_faiss_and_jax_search():
  db = np.random.default_rng(2).standard_normal((500, 144)).astype(np.float32)
  db /= np.linalg.norm(db, axis=1, keepdims=True)
  q = noisy_copies(db, 40, noise=0.5)
  index = Index(db, names(500))
  paths, dist = index.search(q, 5)
  d_f, i_f = search.faiss_search(db, q, 5)
  d_j, i_j = search.jax_search(db, q, 5)
  np.testing.assert_array_equal(i_f, i_j)  # the two references agree here (no near ties)
  assert paths == [[f"db/{i:05d}.jpg" for i in row] for row in i_f]
  np.testing.assert_array_equal(dist, d_f)
  np.testing.assert_allclose(dist, d_j, atol=1e-5)
  one, d1 = index.search(q[3], 5)  # a single query [D] gives one list
  assert one == paths[3] and d1.shape == (5,)


def test_fewer_results_than_k_are_none_never_a_path_and_add_extends():
  db = clustered(6, 32, seed=3)
  index = Index(db[:4], names(4))
  paths, dist = index.search(db[:2], 6)
  assert [p[4:] for p in paths] == [[None, None]] * 2 and np.all(np.isinf(dist[:, 4:]))
  assert all(p is not None for row in paths for p in row[:4])
  index.add(db[4:], ["new/a.jpg", "new/b.jpg"])
  assert len(index) == 6 and index.paths[-2:] == ["new/a.jpg", "new/b.jpg"]
  assert index.search(db[5], 1)[0] == ["new/b.jpg"]
  empty = Index(np.zeros((0, 32), np.float32), [])
  assert empty.search(db[0], 2)[0] == [None, None]


def test_bad_inputs_are_one_line_errors():
  db = clustered(20, 32)
  with pytest.raises(ValueError, match="20 descriptors and 19 paths"):
    Index(db, names(19))
  bad = db.copy()
  bad[7, 3] = np.nan
  with pytest.raises(ValueError, match=r"NaN or Inf \(first: db/00007.jpg\)"):
    Index(bad, names(20))
  index = Index(db, names(20))
  with pytest.raises(ValueError, match="have 31 dimensions; this index holds 32-d"):
    index.search(db[:, :31], 1)
  with pytest.raises(ValueError, match="positive integer"):
    index.search(db, 0)
  with pytest.raises(ValueError, match="kind 'hnsw'"):
    Index(db, names(20), kind="hnsw")
  with pytest.raises(ValueError, match="nprobe applies to IVF"):
    index.nprobe = 4


# ------------------------------------------------------------------------------ files
def test_save_load_round_trip_of_every_kind(tmp_path):
  db = clustered(1200, 48, centres=30)
  q = noisy_copies(db, 30)
  paths = [f"photos/ünïcode {i}.jpg" for i in range(len(db))]
  indexes = {
    "exact": Index(db, paths, pca_dim=24),
    "ivf": Index(db, paths, kind="ivf", nlist=8, nprobe=3),
    "ivfpq": Index(db, paths, kind="ivfpq", nlist=8, m=8, nbits=4, nprobe=5),
  }
  for kind, index in indexes.items():
    f = tmp_path / f"{kind}.npz"
    index.save(str(f))
    back = Index.load(str(f))
    assert (back.kind, back.nprobe, back.paths, len(back)) == (kind, index.nprobe, paths, 1200)
    for a, b in zip(index.search(q, 7), back.search(q, 7)):
      np.testing.assert_array_equal(np.asarray(a, object), np.asarray(b, object))
    assert sorted(os.listdir(tmp_path)) == sorted(
      f"{k}.npz" for k in list(indexes)[: list(indexes).index(kind) + 1]
    )  # no temporary left beside it
  back = Index.load(str(tmp_path / "exact.npz"))
  np.testing.assert_array_equal(back.pca.components, indexes["exact"].pca.components)
  with zipfile.ZipFile(tmp_path / "exact.npz") as z:  # plain arrays, no pickled object
    assert sorted(z.namelist()) == [
      "metadata.npy",
      "paths.npy",
      "pca_components.npy",
      "pca_mean.npy",
      "pca_scale.npy",
      "vectors.npy",
    ]


def test_save_refuses_what_it_did_not_write_and_load_errors_are_one_line(tmp_path):
  db = clustered(30, 16)
  index = Index(db, names(30))
  mine = tmp_path / "db.npz"
  index.save(str(mine))
  with pytest.raises(FileExistsError, match="overwrite=True"):
    index.save(str(mine))
  index.add(db[:1], ["extra.jpg"])
  index.save(str(mine), overwrite=True)  # its own file: replaced
  assert len(Index.load(str(mine))) == 31
  foreign = {"photo.npz": None, "notes.txt": b"my notes", "arrays.npz": "npz"}
  for name, content in foreign.items():
    p = tmp_path / name
    if content == "npz":
      np.savez(p, weights=np.ones(3))
    elif content is None:
      np.savez(p, metadata=np.frombuffer(b'{"format": "other"}', np.uint8))
    else:
      p.write_bytes(content)
    before = p.read_bytes()
    with pytest.raises(
      ValueError,
      match=r"refusing to overwrite .*: salad_jax did not write it \(not a salad_jax index\)",
    ):
      index.save(str(p), overwrite=True)
    assert p.read_bytes() == before
  damaged = tmp_path / "damaged.npz"
  damaged.write_bytes(mine.read_bytes()[: len(mine.read_bytes()) // 2])
  pickled = tmp_path / "pickled.npz"
  np.savez(pickled, metadata=np.array([{"format": "salad_jax.index"}], object))
  for p, why in [
    (tmp_path / "notes.txt", "not a readable salad_jax index"),
    (tmp_path / "arrays.npz", "no metadata"),
    (damaged, "not a readable"),
    (pickled, "not a readable"),
    (tmp_path / "photo.npz", "no salad_jax index"),
  ]:
    with pytest.raises(ValueError, match=why) as e:
      Index.load(str(p))
    assert "\n" not in str(e.value)
  with pytest.raises(FileNotFoundError):
    Index.load(str(tmp_path / "missing.npz"))
  # a faiss blob that does not match its recorded checksum is never handed to faiss
  ivf = tmp_path / "ivf.npz"
  Index(clustered(400, 16), names(400), kind="ivf", nlist=4).save(str(ivf))
  with np.load(ivf) as z:
    arrays = {k: z[k] for k in z.files}
  arrays["faiss_index"] = arrays["faiss_index"].copy()
  arrays["faiss_index"][-100] ^= 1
  np.savez(ivf, **arrays)
  with pytest.raises(ValueError, match="checksum"):
    Index.load(str(ivf))


# ------------------------------------------------------------------------------ approximate
def test_ivf_probing_every_list_is_exact_and_ivfpq_recall_is_sane():
  db = clustered(3000, 64, centres=60, noise=0.35)
  q = noisy_copies(db, 100)
  truth = search.faiss_search(db, q, 1)[1][:, 0]
  ivf = Index(db, names(3000), kind="ivf", nlist=20)
  assert ivf.nprobe == 16  # the default: min(nlist, 16)
  ivf.nprobe = 20
  i_exact = search.faiss_search(db, q, 10)[1]
  np.testing.assert_array_equal(ivf.search_indices(q, 10)[0], i_exact)
  ivf.nprobe = 1
  assert np.mean(ivf.search_indices(q, 1)[0][:, 0] == truth) > 0.5
  pq = Index(db, names(3000), kind="ivfpq", nlist=16, m=16, nbits=6, nprobe=16)
  top10 = pq.search_indices(q, 10)[0]
  recall = np.mean([t in row for t, row in zip(truth, top10)])
  assert recall >= 0.9, recall  # the true nearest among the 10 found (PQ codes: 16 bytes/image)
  assert pq.memory_bytes() < Index(db, names(3000)).memory_bytes() / 4
  # trained on other descriptors, then grown with add: the same index
  grown = Index(
    np.zeros((0, 64), np.float32), [], kind="ivfpq", train_on=db, nlist=16, m=16, nbits=6, nprobe=16
  )
  grown.add(db[:1000], names(1000))
  grown.add(db[1000:], names(3000)[1000:])
  np.testing.assert_array_equal(grown.search_indices(q, 10)[0], top10)
  with pytest.raises(ValueError, match="nprobe 17"):
    pq.nprobe = 17
  with pytest.raises(ValueError, match="must divide the dimension 64"):
    Index(db, names(3000), kind="ivfpq", nlist=4, m=7)
  with pytest.raises(ValueError, match="nlist <= the 10 training descriptors"):
    Index(db[:10], names(10), kind="ivf", nlist=16)
  with pytest.raises(ValueError, match="10 training descriptors are fewer than the 64 centroids"):
    Index(db[:10], names(10), kind="ivfpq", nlist=2, m=16, nbits=6)


# ------------------------------------------------------------------------------ PCA
def test_pca_whitening_shapes_and_that_queries_are_whitened():
  rng = np.random.default_rng(5)
  scales = np.geomspace(10, 0.1, 64).astype(np.float32)  # unequal variances: whitening matters
  db = rng.standard_normal((400, 64)).astype(np.float32) * scales + 0.5
  q = db[:25] + 0.1 * rng.standard_normal((25, 64)).astype(np.float32)
  p = fit_pca(db, 16)
  assert isinstance(p, PCA) and (p.input_dim, p.dim, p.whiten) == (64, 16, True)
  assert p.components.shape == (16, 64) and p.mean.shape == (64,)
  np.testing.assert_allclose(p.components @ p.components.T, np.eye(16), atol=1e-5)
  y = ((db - p.mean) @ p.components.T) * p.scale
  np.testing.assert_allclose(np.cov(y.T), np.eye(16), atol=1e-4)  # whitened: unit covariance
  # reference: SVD of the centred database, project, whiten, L2-normalise (signs do not matter)
  mean = db.astype(np.float64).mean(0)
  _, s, vt = np.linalg.svd(db - mean, full_matrices=False)
  proj = (
    lambda x, w: (lambda y: y / np.linalg.norm(y, axis=1, keepdims=True))(  # noqa: E731
      ((x - mean) @ vt[:16].T) / (s[:16] / np.sqrt(len(db) - 1) if w else 1)
    )
  )
  index = Index(db, names(400), pca_dim=16)
  assert (index.dim, index.input_dim) == (16, 64)
  got_i, got_d = index.search_indices(q, 5)
  want_d, want_i = search.faiss_search(
    proj(db, True).astype(np.float32), proj(q, True).astype(np.float32), 5
  )
  np.testing.assert_array_equal(got_i, want_i)
  np.testing.assert_allclose(got_d, want_d, atol=1e-4)
  plain_i = search.faiss_search(
    proj(db, True).astype(np.float32), proj(q, False).astype(np.float32), 5
  )[1]
  assert not np.array_equal(got_i, plain_i)  # queries left unwhitened would rank differently
  # fitted on other descriptors (train_on), or a PCA fitted before (here unwhitened)
  trained = Index(db[:10], names(10), pca_dim=16, train_on=db)
  np.testing.assert_array_equal(trained.pca.components, index.pca.components)
  other = Index(db, names(400), pca=fit_pca(db[::-1].copy(), 16, whiten=False))
  assert not other.pca.whiten and np.allclose(other.pca.scale, 1)
  for bad in (64, 0, 2.5):
    with pytest.raises(ValueError, match="must be an integer in"):
      fit_pca(db[:50], bad)
  with pytest.raises(ValueError, match="takes 64-d"):
    Index(db[:, :32], names(400), pca=p)
