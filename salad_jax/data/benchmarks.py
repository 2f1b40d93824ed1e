"""The reference's VPR benchmarks (MSLS, Pittsburgh, Nordland, SPED) and the sets a run asks for.

Benchmarks (`--data_root`): images under `<data_root>/<dataset folder>/` and the reference's `.npy`
index files (GSV-Cities / SALAD `datasets/` folder) under `<index_root>` (default
`<data_root>/datasets`). Object `.npy` files are read with a restricted unpickler that only
rebuilds numpy arrays, never arbitrary objects.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Sequence

import numpy as np

from salad_jax.data.eval_sets import EvalSet, folder_set, positives_within
from salad_jax.errors import UserError
from salad_jax.files import paths


# ------------------------------------------------------------------------------ safe .npy
class _NumpyOnlyUnpickler(pickle.Unpickler):
  ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
  }

  def find_class(self, module, name):
    if (module, name) in self.ALLOWED:
      return super().find_class(module, name)
    raise pickle.UnpicklingError(
      f"refusing to unpickle {module}.{name}: only numpy arrays are allowed"
    )


def load_npy(path: str) -> np.ndarray:
  """np.load for the reference's index files; object arrays via a numpy-only unpickler."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"index file not found: {path}")
  with open(path, "rb") as f:
    version = np.lib.format.read_magic(f)
    read_header = (
      np.lib.format.read_array_header_1_0
      if version == (1, 0)
      else np.lib.format.read_array_header_2_0
    )
    shape, _, dtype = read_header(f)
    if not dtype.hasobject:
      f.seek(0)
      return np.load(f, allow_pickle=False)
    try:
      arr = _NumpyOnlyUnpickler(io.BytesIO(f.read())).load()
    except pickle.UnpicklingError as e:
      raise ValueError(f"{path}: {e}") from None
  if not isinstance(arr, np.ndarray) or arr.shape != shape:
    raise ValueError(f"{path}: not a valid object .npy array")
  return arr


# ------------------------------------------------------------------------------ benchmarks
# name -> (images folder under data_root, index files under index_root)
BENCHMARKS = {
  "msls_val": (
    "mapillary",
    "msls_val/msls_val_dbImages.npy",
    "msls_val/msls_val_qImages.npy",
    "msls_val/msls_val_pIdx.npy",
  ),
  "msls_test": (
    "mapillary",
    "msls_test/msls_test_dbImages.npy",
    "msls_test/msls_test_qImages.npy",
    None,
  ),
  "pitts30k_val": (
    "Pittsburgh",
    "Pittsburgh/pitts30k_val_dbImages.npy",
    "Pittsburgh/pitts30k_val_qImages.npy",
    "Pittsburgh/pitts30k_val_gt.npy",
  ),
  "pitts30k_test": (
    "Pittsburgh",
    "Pittsburgh/pitts30k_test_dbImages.npy",
    "Pittsburgh/pitts30k_test_qImages.npy",
    "Pittsburgh/pitts30k_test_gt.npy",
  ),
  "pitts250k_test": (
    "Pittsburgh",
    "Pittsburgh/pitts250k_test_dbImages.npy",
    "Pittsburgh/pitts250k_test_qImages.npy",
    "Pittsburgh/pitts250k_test_gt.npy",
  ),
  "nordland": (
    "Nordland",
    "Nordland/Nordland_dbImages.npy",
    "Nordland/Nordland_qImages.npy",
    "Nordland/Nordland_gt.npy",
  ),
  "sped": ("SPEDTEST", "SPED/SPED_dbImages.npy", "SPED/SPED_qImages.npy", "SPED/SPED_gt.npy"),
}
ALIASES = {"msls": "msls_val", "mslsval": "msls_val", "msls_challenge": "msls_test"}


def _pitts_gt_from_mat(
  mat_path: str, db: Sequence[str], q: Sequence[str], radius: float | None
) -> list[np.ndarray]:
  """Ground truth from the NetVLAD `dbStruct` .mat: UTM radius search (posDistThr, 25 m)."""
  from scipy.io import loadmat

  s = loadmat(mat_path)["dbStruct"][0, 0]
  names = s.dtype.names
  get = {n: s[n] for n in names}
  db_names = [str(x[0][0]) if np.ndim(x[0]) else str(x[0]) for x in get["dbImage"]]
  q_names = [str(x[0][0]) if np.ndim(x[0]) else str(x[0]) for x in get["qImage"]]
  utm_db, utm_q = np.asarray(get["utmDb"], np.float64).T, np.asarray(get["utmQ"], np.float64).T
  thr = float(np.asarray(get["posDistThr"]).ravel()[0]) if radius is None else radius
  db_pos = {n: i for i, n in enumerate(db_names)}
  q_pos = {n: i for i, n in enumerate(q_names)}

  def index(paths, table, prefix=""):
    out = []
    for p in paths:
      key = p[len(prefix) :] if p.startswith(prefix) else p
      if key not in table:
        raise ValueError(f"{mat_path}: image {p} of the index is not in the .mat struct")
      out.append(table[key])
    return np.asarray(out)

  di, qi = index(db, db_pos), index(q, q_pos, "queries_real/")
  return positives_within(utm_db[di], utm_q[qi], thr)


def benchmark_set(
  name: str,
  data_root: str,
  index_root: str | None = None,
  positive_dist_threshold: float | None = None,
) -> EvalSet:
  key = ALIASES.get(name.lower(), name.lower())
  if key not in BENCHMARKS:
    raise ValueError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}")
  folder, db_file, q_file, gt_file = BENCHMARKS[key]
  if not os.path.isdir(data_root):
    raise (NotADirectoryError if os.path.exists(data_root) else FileNotFoundError)(
      f"--data_root {data_root} is {'a file, not a folder' if os.path.exists(data_root) else 'missing'}; "
      f"`python -m salad_jax.data.check --data_root <dir>` shows what goes where"
    )
  index_root = index_root or os.path.join(data_root, "datasets")
  if os.path.isfile(index_root):
    raise NotADirectoryError(f"--index_root {index_root} is a file, not a folder of index files")
  if not os.path.isdir(index_root):
    raise FileNotFoundError(
      f"{key}: index folder {index_root} not found; copy the `datasets/` folder of "
      "serizba/salad (or amaralibey/gsv-cities) there, or pass --index_root"
    )
  db = [str(x) for x in load_npy(os.path.join(index_root, db_file))]
  q = [str(x) for x in load_npy(os.path.join(index_root, q_file))]
  positives = None
  protocol = ""
  if key == "msls_val":
    q_idx = load_npy(os.path.join(index_root, "msls_val/msls_val_qIdx.npy"))
    q = [q[i] for i in q_idx]
    protocol = f"MSLS val, GSV-Cities index: {len(q)} queries (qIdx) / {len(db)} database images"
  if gt_file is not None:
    gt_path = os.path.join(index_root, gt_file)
    if os.path.isfile(gt_path):
      gt = load_npy(gt_path)
      positives = [np.asarray(x, np.int64).ravel() for x in gt]
    elif key.startswith("pitts"):
      mat = os.path.join(index_root, "Pittsburgh", key + ".mat")
      if not os.path.isfile(mat):
        raise FileNotFoundError(f"{key}: neither {gt_path} nor the NetVLAD struct {mat} exists")
      positives = _pitts_gt_from_mat(mat, db, q, positive_dist_threshold)
      protocol = f"{key}: ground truth from {os.path.basename(mat)} UTM radius search"
    else:
      raise FileNotFoundError(f"{key}: ground-truth file {gt_path} not found")
    if len(positives) != len(q):
      raise ValueError(f"{key}: ground truth has {len(positives)} entries for {len(q)} queries")
  root = os.path.join(data_root, folder)
  to_abs = lambda rel: os.path.join(root, rel)  # noqa: E731
  return EvalSet(
    key,
    [to_abs(p) for p in db],
    [to_abs(p) for p in q],
    positives,
    challenge=key == "msls_test",
    protocol=protocol or key,
  )


def parse_set(
  spec: str,
  data_root: str = "",
  index_root: str | None = None,
  positive_dist_threshold: float = 25.0,
) -> EvalSet:
  """`folder:<dir>` (dir/database + dir/queries) or a benchmark name under data_root."""
  if spec.startswith("folder:"):
    root = spec[len("folder:") :]
    return folder_set(
      os.path.join(root, "database"),
      os.path.join(root, "queries"),
      positive_dist_threshold,
      name=os.path.basename(os.path.normpath(root)),
    )
  if not data_root:
    raise ValueError(f"eval set {spec!r} needs --data_root (or config.eval.data_root)")
  return benchmark_set(spec, data_root, index_root)


def requested_sets(
  database_folder: str | None,
  queries_folder: str | None,
  datasets: Sequence[str],
  data_root: str,
  index_root: str | None,
  positive_dist_threshold: float,
  use_labels: bool = True,
  output_dir: str | None = None,
) -> list[EvalSet]:
  """evaluate.py's sets: the two folders (if given), then each benchmark under data_root.
  `output_dir` may not lie inside an image folder (a rerun would read its pictures as images)."""
  hint = "see --helpshort for the flags"
  for flag, value in (
    ("--database_folder", database_folder),
    ("--queries_folder", queries_folder),
    ("--data_root", data_root),
  ):
    if value and paths.is_url(value):
      raise UserError(
        f"{flag} {value}: evaluation images are read from local disk",
        "copy them to this machine (gsutil -m cp -r ...) and give the local folder",
      )
  sets = []
  if database_folder or queries_folder:
    if not (database_folder and queries_folder):
      raise UserError("--database_folder and --queries_folder go together", hint)
    out = paths.real(output_dir) if output_dir else None  # a URL is inside no local folder
    for flag, folder in (
      ("--database_folder", database_folder),
      ("--queries_folder", queries_folder),
    ):
      real = os.path.realpath(folder)
      if out is not None and (out == real or out.startswith(real + os.sep)):
        raise UserError(
          f"--output_dir {output_dir} is inside {flag} {folder}: its prediction "
          "pictures would be read as images by the next run",
          "choose an --output_dir outside the image folders",
        )
    sets.append(
      folder_set(database_folder, queries_folder, positive_dist_threshold, use_labels=use_labels)
    )
  for name in datasets:
    if not data_root:
      raise UserError("--datasets needs --data_root", hint)
    sets.append(benchmark_set(name, data_root, index_root or None, positive_dist_threshold))
  if not sets:
    raise UserError(
      "nothing to evaluate: give --database_folder/--queries_folder or --datasets", hint
    )
  return sets
