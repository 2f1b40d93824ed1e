"""Describe a folder, keep its descriptors in an index, query it: place recognition in deployment.

  model = salad_jax.load("weights/dino_salad")
  db, paths = describe_folder(model, "database/")             # [N, 8448], the image paths
  index = Index(db, paths)                                     # exact search (faiss, squared L2)
  index.save("db.index.npz")
  hits, dists = Index.load("db.index.npz").search(model.describe(queries), k=5)

Exact search is the default: it is what evaluation runs, and at 8448-d a flat index costs 33 KiB
per image and ~28 ms per query per 100k images (batched, 2 CPU cores; benchmarks/index_search.py).
For larger databases, `kind="ivf"` (inverted lists, exact vectors) or `"ivfpq"` (inverted lists
of product-quantised codes: tens to a few hundred bytes per image) search only `nprobe` of
`nlist` lists, learnt from the database or from `train_on`. At 1 M images, IVF-PQ with 64-byte
codes searched 16 of 256 lists in ~3 ms per query (exact: ~280 ms, extrapolated). `pca_dim` (or
a `fit_pca` fitted on another set) projects database and queries with PCA(-whitening) and
L2-normalises them again.

The file (`save`) is an `.npz` read with `allow_pickle=False`: JSON metadata and paths as bytes,
the vectors of an exact index as a float32 array, an IVF index as faiss's own serialization (its
SHA-256 checked before faiss parses it). Nothing in it is executed when loaded.
"""

from salad_jax.index.core import Index
from salad_jax.index.describe import describe_folder
from salad_jax.index.pca import PCA, fit_pca
from salad_jax.index.store import FORMAT, KINDS, VERSION, written_by_us

__all__ = [
  "FORMAT",
  "KINDS",
  "PCA",
  "VERSION",
  "Index",
  "describe_folder",
  "fit_pca",
  "written_by_us",
]
