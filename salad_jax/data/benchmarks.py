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

from salad_jax.data import benchmark_sources, downloader_trees
from salad_jax.data.eval_sets import EvalSet, folder_set, positives_within, unique_names
from salad_jax.errors import UserError, note
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


# ------------------------------------------------------------------------------ index checks
INDEX_HINT = (
  "the index files must be the reference's, of the same release as the image lists: copy "
  "the datasets/ folder of serizba/salad again (or pass --index_root)"
)


def _as_indices(x, path: str, what: str) -> np.ndarray:
  """`x` as int64 indices, or a UserError: booleans (a mask?), strings, objects and
  non-integral numbers are not indices (np.asarray(x, np.int64) truncated 2.7 to 2)."""
  try:
    a = np.asarray(x)
  except Exception:  # noqa: BLE001 (ragged or odd objects)
    a = np.asarray([None])
  if a.size == 0:
    return np.zeros(0, np.int64)
  if a.dtype == object:
    try:  # an object array of Python ints
      a = np.asarray(a.tolist())
    except Exception:  # noqa: BLE001
      pass
  flat = np.ravel(a)
  if a.dtype.kind in "iu":
    return flat.astype(np.int64)
  if a.dtype.kind == "f":
    whole = np.isfinite(flat) & (flat == np.round(flat))
    if whole.all():
      return flat.astype(np.int64)
    bad = flat[np.argmin(whole)]
  else:
    bad = flat[0]
  bad = bad.item() if hasattr(bad, "item") else bad
  raise UserError(f"{path}: {what} holds {bad!r} ({a.dtype}): expected integer indices", INDEX_HINT)


def check_query_index(q_idx, num_listed: int, path: str) -> np.ndarray:
  """MSLS-val's qIdx: one integer per query, each a position in qImages (0..num_listed-1).
  A negative one silently took a query from the end of the list."""
  idx = _as_indices(q_idx, path, "the query index")
  out = np.flatnonzero((idx < 0) | (idx >= num_listed))
  if out.size:
    raise UserError(
      f"{path}: entry {out[0]} is {idx[out[0]]}, outside the {num_listed} listed queries "
      f"(0..{num_listed - 1})",
      INDEX_HINT,
    )
  return idx


def check_ground_truth(gt, num_database: int, num_queries: int, path: str) -> list[np.ndarray]:
  """Ground truth (`*_gt.npy`, MSLS `pIdx`): one list of database indices per query, integers
  in 0..num_database-1. An index outside the database never matches a prediction: R@1 0.00
  without a word. Returns the lists as int64 arrays; a UserError names the first bad entry."""
  if np.ndim(gt) == 0:
    raise UserError(f"{path}: expected one list of database indices per query", INDEX_HINT)
  if len(gt) != num_queries:
    raise UserError(
      f"{path}: {len(gt)} ground-truth lists for {num_queries} queries (one per query)",
      INDEX_HINT,
    )
  out = []
  for qi, x in enumerate(gt):
    idx = _as_indices(x, path, f"the list of query {qi}")
    bad = np.flatnonzero((idx < 0) | (idx >= num_database))
    if bad.size:
      raise UserError(
        f"{path}: query {qi} lists database index {idx[bad[0]]}, outside the {num_database} "
        f"database images (0..{num_database - 1})",
        INDEX_HINT,
      )
    out.append(idx)
  return out


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
ALIASES = benchmark_sources.ALIASES


def _pitts_gt_from_mat(
  mat_path: str, db: Sequence[str], q: Sequence[str], radius: float | None
) -> tuple[list[np.ndarray], float]:
  """Ground truth from the NetVLAD `dbStruct` .mat: UTM radius search (`radius`, else its
  posDistThr, 25 m); returns (positives, the radius used)."""
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
  return positives_within(utm_db[di], utm_q[qi], thr), thr


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
  given = index_root
  index_root = index_root or default_index_root(data_root, db_file)
  if os.path.isfile(index_root):
    raise NotADirectoryError(f"--index_root {index_root} is a file, not a folder of index files")
  if not os.path.isdir(index_root):
    where = index_root if given else f"{index_root} (nor ./datasets, SALAD's place)"
    raise FileNotFoundError(
      f"{key}: index folder {where} not found; copy the `datasets/` folder of "
      "serizba/salad (or amaralibey/gsv-cities) there, or pass --index_root"
    )
  if not given and index_root != os.path.join(data_root, "datasets"):
    note(f"{key}: index files from {index_root} (SALAD's place; --index_root chooses another)")
  db = [str(x) for x in load_npy(os.path.join(index_root, db_file))]
  q = [str(x) for x in load_npy(os.path.join(index_root, q_file))]
  positives, radius = None, None
  protocol = ""
  if key == "msls_val":
    q_idx_path = os.path.join(index_root, "msls_val/msls_val_qIdx.npy")
    q_idx = check_query_index(load_npy(q_idx_path), len(q), q_idx_path)
    q = [q[i] for i in q_idx]
    protocol = f"MSLS val, GSV-Cities index: {len(q)} queries (qIdx) / {len(db)} database images"
  if gt_file is not None:
    gt_path = os.path.join(index_root, gt_file)
    if os.path.isfile(gt_path):
      positives = check_ground_truth(load_npy(gt_path), len(db), len(q), gt_path)
    elif key.startswith("pitts"):
      mat = os.path.join(index_root, "Pittsburgh", key + ".mat")
      if not os.path.isfile(mat):
        raise FileNotFoundError(f"{key}: neither {gt_path} nor the NetVLAD struct {mat} exists")
      positives, radius = _pitts_gt_from_mat(mat, db, q, positive_dist_threshold)
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
    positives_radius=radius,
    data_root=data_root,
  )


def default_index_root(data_root: str, index_file: str = "") -> str:
  """Where the index files are when --index_root is not given: `<data_root>/datasets`, else
  `./datasets` (where SALAD's eval.py reads them: its repository's own folder) when that one
  holds `index_file` (any file, if none is named) and the first does not."""
  first, salad = os.path.join(data_root, "datasets"), os.path.abspath("datasets")
  has = lambda root: (  # noqa: E731
    os.path.isfile(os.path.join(root, index_file)) if index_file else os.path.isdir(root)
  )
  return salad if not has(first) and has(salad) else first


def parse_set(
  spec: str,
  data_root: str = "",
  index_root: str | None = None,
  positive_dist_threshold: float = 25.0,
) -> EvalSet:
  """`folder:<dir>` (dir/database + dir/queries) or a benchmark name under data_root."""
  if spec.startswith("folder:"):
    root = spec[len("folder:") :]
    db, q = os.path.join(root, "database"), os.path.join(root, "queries")
    name = downloader_trees.set_name(db, q) or os.path.basename(os.path.normpath(root))
    return folder_set(db, q, positive_dist_threshold, name=name)
  if not data_root:
    raise ValueError(f"eval set {spec!r} needs --data_root (or config.eval.data_root)")
  return benchmark_set(spec, data_root, index_root, positive_dist_threshold)


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
  keep = [False] * len(sets)
  for name in unique_specs(datasets, "--datasets"):
    if not data_root:
      raise UserError("--datasets needs --data_root", hint)
    sets.append(benchmark_set(name, data_root, index_root or None, positive_dist_threshold))
    keep.append(True)
  if not sets:
    raise UserError(
      "nothing to evaluate: give --database_folder/--queries_folder or --datasets", hint
    )
  return unique_names(sets, keep)


def unique_specs(names: Sequence[str], where: str) -> list[str]:
  """`names` (benchmarks, or `folder:<dir>` specs) without repeats of one set (`sped SPED`,
  `msls msls_val`, one folder twice): each is evaluated once, with a note."""
  out, seen = [], {}
  for n in names:
    if n.startswith("folder:"):
      key = "folder:" + os.path.realpath(n[len("folder:") :])
    else:
      key = ALIASES.get(n.lower(), n.lower())
    if key in seen:
      note(f"{where} names {key} twice ({seen[key]} and {n}): evaluated once")
      continue
    seen[key] = n
    out.append(n)
  return out
