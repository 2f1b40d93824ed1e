"""Evaluation sets: UTM-named folders (VPR-methods-evaluation layout) and the reference's benchmarks.

Folder layout: `<database_folder>` and `<queries_folder>` of images named
`.../@<utm_east>@<utm_north>@...@.jpg`; positives are database images within
`positive_dist_threshold` metres of the query.

Benchmarks (`--data_root`): images under `<data_root>/<dataset folder>/` and the reference's `.npy`
index files (GSV-Cities / SALAD `datasets/` folder) under `<index_root>` (default
`<data_root>/datasets`). Object `.npy` files are read with a restricted unpickler that only
rebuilds numpy arrays, never arbitrary objects.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
from typing import Sequence

import numpy as np

from salad_jax.errors import UserError, note, warning

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # VPR-methods-evaluation's read_images_paths
# image files it does not read: named in a warning, never used silently
OTHER_IMAGE_EXTENSIONS = (".webp", ".tif", ".tiff", ".bmp", ".gif", ".jp2", ".ppm", ".pgm", ".pbm",
                          ".heic", ".heif", ".avif")


@dataclasses.dataclass
class EvalSet:
  name: str
  database_paths: list[str]
  query_paths: list[str]
  positives: list[np.ndarray] | None  # per query: database indices; None = no labels
  challenge: bool = False  # MSLS test: no labels, predictions go to the challenge file
  protocol: str = ""

  @property
  def num_database(self) -> int:
    return len(self.database_paths)

  @property
  def num_queries(self) -> int:
    return len(self.query_paths)

  def check_files(self) -> None:
    """A missing image is an error naming the file, raised before any compute."""
    if not self.database_paths or not self.query_paths:
      raise ValueError(f"{self.name}: empty eval set ({self.num_database} database images, "
                       f"{self.num_queries} queries)")
    for p in (*self.database_paths, *self.query_paths):
      if not os.path.isfile(p):
        raise FileNotFoundError(f"{self.name}: image not found: {p}")

  def __repr__(self) -> str:
    return f"<{self.name}: {self.num_queries} queries, {self.num_database} database images>"


# ------------------------------------------------------------------------------ folders
def _image_files(folder: str) -> tuple[list[str], collections.Counter, list[str]]:
  """(image paths, other image files per extension, symlinked folders not followed) under `folder`.

  As VPR-methods-evaluation's `glob(folder/**/*)`: recursive, hidden names skipped, symlinked
  folders followed, but a folder already read (a link loop, two links to one folder) only once.
  A dangling link with an image extension is an error naming it.
  """
  paths, others, skipped = [], collections.Counter(), []
  seen = {os.path.realpath(folder)}
  for root, dirs, files in os.walk(folder, followlinks=True):
    dirs.sort()
    for d in list(dirs):
      real = os.path.realpath(os.path.join(root, d))
      if d.startswith(".") or real in seen:
        dirs.remove(d)
        if not d.startswith("."):
          skipped.append(f"{os.path.join(root, d)} -> {real}")
      seen.add(real)
    for f in files:
      ext = os.path.splitext(f)[1].lower()
      p = os.path.join(root, f)
      if f.startswith(".") or not (ext in IMAGE_EXTENSIONS or ext in OTHER_IMAGE_EXTENSIONS):
        continue
      if not os.path.exists(p):
        raise FileNotFoundError(f"image {p} is a link to {os.path.realpath(p)}, which does not exist")
      if os.path.isfile(p):
        if ext in IMAGE_EXTENSIONS:
          paths.append(p)
        else:
          others[ext] += 1
  return sorted(paths), others, skipped


def _identity(path: str):
  """What makes two names one file: its device and inode (links, hard links), else its real path."""
  try:
    st = os.stat(path)
    return st.st_dev, st.st_ino
  except OSError:
    return os.path.realpath(path)


def _check_no_duplicates(paths: Sequence[str], where: str) -> None:
  """The same file under two names (links, hard links) is an error: they may carry different
  coordinates and would take two of the top-K places."""
  first: dict = {}
  for p in paths:
    key = _identity(p)
    if key in first:
      raise UserError(f"{where} lists the same image file twice: {first[key]} and {p} (both "
                      f"{os.path.realpath(p)})", "remove one of them (links and hard links to one "
                      "file count as one image)")
    first[key] = p


def read_image_paths(folder: str) -> list[str]:
  """Images under `folder` (recursive, sorted), or the list in `<folder>_images_paths.txt`.

  The extensions VPR-methods-evaluation reads (.jpg, .jpeg, .png, any case), so both tools rank
  the same images; other image files found are named in one warning line.
  """
  if os.path.isfile(folder):
    raise NotADirectoryError(f"{folder} is a file, not a folder of images")
  if not os.path.isdir(folder):
    raise UserError(f"folder {folder} does not exist", "check the path (relative paths start at "
                    "the current directory); `python -m salad_jax.data.check` checks benchmarks")
  listing = folder.rstrip("/") + "_images_paths.txt"
  if os.path.isfile(listing):
    with open(listing) as f:
      paths = [os.path.join(folder, line) for line in f.read().splitlines() if line]
    in_folder = sum(os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS and not f.startswith(".")
                    for _, _, fs in os.walk(folder) for f in fs)
    note(f"{folder}: using the {len(paths)} images listed in {listing}, not a search of the folder "
         f"({in_folder} image files there); delete or rename the list to use the folder")
    _check_no_duplicates(paths, listing)
    return paths
  paths, others, skipped = _image_files(folder)
  if skipped:
    note(f"{folder}: {len(skipped)} linked folder(s) already read not followed again (a link "
         f"loop or a second link to one folder), e.g. {skipped[0]}")
  if others:
    kinds = ", ".join(f"{n} {ext}" for ext, n in sorted(others.items()))
    warning(f"{folder}: {sum(others.values())} image files not used ({kinds}): evaluation reads "
            f"{'/'.join(IMAGE_EXTENSIONS)} as VPR-methods-evaluation does; convert them to .jpg to "
            "include them")
  if not paths:
    raise FileNotFoundError(f"folder {folder} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
  _check_no_duplicates(paths, folder)
  return paths


def utm_of(paths: Sequence[str]) -> np.ndarray:
  """[N, 2] (east, north) from file names `@east@north@...` (the folder path may hold '@' too)."""
  out = np.empty((len(paths), 2), np.float64)
  for i, p in enumerate(paths):
    parts = os.path.basename(p).split("@")
    try:
      out[i] = float(parts[1]), float(parts[2])
    except (IndexError, ValueError):
      raise ValueError(f"image path {p} has no UTM coordinates: names must look like "
                       "path/to/@utm_east@utm_north@...@.jpg (or pass --no_labels)") from None
    if not np.isfinite(out[i]).all():
      raise UserError(f"image path {p}: its UTM coordinates ({parts[1]}, {parts[2]}) are not "
                      "finite numbers", "names must look like path/to/@utm_east@utm_north@...@.jpg "
                      "with coordinates in metres")
  return out


def positives_within(db_utm: np.ndarray, q_utm: np.ndarray, radius: float) -> list[np.ndarray]:
  from scipy.spatial import cKDTree
  tree = cKDTree(db_utm)
  return [np.asarray(sorted(ix), np.int64) for ix in tree.query_ball_point(q_utm, r=radius)]


def _check_queries_not_in_database(db: Sequence[str], q: Sequence[str], database_folder: str,
                                   queries_folder: str, use_labels: bool) -> None:
  """A query that is also a database image finds itself: R@1 100 that means nothing."""
  if os.path.realpath(database_folder) == os.path.realpath(queries_folder):
    what = (f"--queries_folder and --database_folder are the same folder "
            f"({os.path.realpath(queries_folder)}): every query would find itself")
  else:
    db_ids = {_identity(p): p for p in db}
    both = [(p, db_ids[key]) for p in q if (key := _identity(p)) in db_ids]
    if not both:
      return
    same = (f"{both[0][0]} is also in the database" if both[0][0] == both[0][1]
            else f"{both[0][0]} is {both[0][1]}")
    what = (f"{len(both)} of {len(q)} queries are also database images (e.g. {same}): each "
            "would find itself")
  if not use_labels:
    warning(what + " (retrieval only: their first prediction is themselves)")
    return
  raise UserError(what + " (R@1 100 that means nothing)",
                  "give a database and a query folder with different images")


def folder_set(database_folder: str, queries_folder: str, positive_dist_threshold: float = 25.0,
               use_labels: bool = True, name: str | None = None) -> EvalSet:
  db = read_image_paths(database_folder)
  q = read_image_paths(queries_folder)
  _check_queries_not_in_database(db, q, database_folder, queries_folder, use_labels)
  positives = None
  if use_labels:
    db_utm, q_utm = utm_of(db), utm_of(q)
    both = np.concatenate([db_utm, q_utm])
    if (np.abs(both[:, 0]) <= 180).all() and (np.abs(both[:, 1]) <= 90).all():
      warning(f"the coordinates in the file names under {database_folder} and {queries_folder} "
              "all lie within +-180 / +-90: they look like degrees (latitude/longitude), not UTM "
              f"metres; positives are database images within {positive_dist_threshold:g} of a "
              "query in those units")
    positives = positives_within(db_utm, q_utm, positive_dist_threshold)
  name = name or os.path.basename(os.path.dirname(os.path.abspath(database_folder))) or "folder"
  protocol = (f"UTM folders, positives within {positive_dist_threshold:g} m" if use_labels
              else "no labels (--no_labels): retrieval only, no recalls")
  return EvalSet(name, db, q, positives, protocol=protocol)


# ------------------------------------------------------------------------------ safe .npy
class _NumpyOnlyUnpickler(pickle.Unpickler):
  ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
             ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
             ("numpy._core.multiarray", "scalar")}

  def find_class(self, module, name):
    if (module, name) in self.ALLOWED:
      return super().find_class(module, name)
    raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")


def load_npy(path: str) -> np.ndarray:
  """np.load for the reference's index files; object arrays via a numpy-only unpickler."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"index file not found: {path}")
  with open(path, "rb") as f:
    version = np.lib.format.read_magic(f)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
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
    "msls_val": ("mapillary", "msls_val/msls_val_dbImages.npy", "msls_val/msls_val_qImages.npy",
                 "msls_val/msls_val_pIdx.npy"),
    "msls_test": ("mapillary", "msls_test/msls_test_dbImages.npy", "msls_test/msls_test_qImages.npy", None),
    "pitts30k_val": ("Pittsburgh", "Pittsburgh/pitts30k_val_dbImages.npy",
                     "Pittsburgh/pitts30k_val_qImages.npy", "Pittsburgh/pitts30k_val_gt.npy"),
    "pitts30k_test": ("Pittsburgh", "Pittsburgh/pitts30k_test_dbImages.npy",
                      "Pittsburgh/pitts30k_test_qImages.npy", "Pittsburgh/pitts30k_test_gt.npy"),
    "pitts250k_test": ("Pittsburgh", "Pittsburgh/pitts250k_test_dbImages.npy",
                       "Pittsburgh/pitts250k_test_qImages.npy", "Pittsburgh/pitts250k_test_gt.npy"),
    "nordland": ("Nordland", "Nordland/Nordland_dbImages.npy", "Nordland/Nordland_qImages.npy",
                 "Nordland/Nordland_gt.npy"),
    "sped": ("SPEDTEST", "SPED/SPED_dbImages.npy", "SPED/SPED_qImages.npy", "SPED/SPED_gt.npy"),
}
ALIASES = {"msls": "msls_val", "mslsval": "msls_val", "msls_challenge": "msls_test"}


def _pitts_gt_from_mat(mat_path: str, db: Sequence[str], q: Sequence[str],
                       radius: float | None) -> list[np.ndarray]:
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
      key = p[len(prefix):] if p.startswith(prefix) else p
      if key not in table:
        raise ValueError(f"{mat_path}: image {p} of the index is not in the .mat struct")
      out.append(table[key])
    return np.asarray(out)
  di, qi = index(db, db_pos), index(q, q_pos, "queries_real/")
  return positives_within(utm_db[di], utm_q[qi], thr)


def benchmark_set(name: str, data_root: str, index_root: str | None = None,
                  positive_dist_threshold: float | None = None) -> EvalSet:
  key = ALIASES.get(name.lower(), name.lower())
  if key not in BENCHMARKS:
    raise ValueError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}")
  folder, db_file, q_file, gt_file = BENCHMARKS[key]
  if not os.path.isdir(data_root):
    raise (NotADirectoryError if os.path.exists(data_root) else FileNotFoundError)(
        f"--data_root {data_root} is {'a file, not a folder' if os.path.exists(data_root) else 'missing'}; "
        f"`python -m salad_jax.data.check --data_root <dir>` shows what goes where")
  index_root = index_root or os.path.join(data_root, "datasets")
  if os.path.isfile(index_root):
    raise NotADirectoryError(f"--index_root {index_root} is a file, not a folder of index files")
  if not os.path.isdir(index_root):
    raise FileNotFoundError(
        f"{key}: index folder {index_root} not found; copy the `datasets/` folder of "
        "serizba/salad (or amaralibey/gsv-cities) there, or pass --index_root")
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
  return EvalSet(key, [to_abs(p) for p in db], [to_abs(p) for p in q], positives,
                 challenge=key == "msls_test", protocol=protocol or key)


def parse_set(spec: str, data_root: str = "", index_root: str | None = None,
              positive_dist_threshold: float = 25.0) -> EvalSet:
  """`folder:<dir>` (dir/database + dir/queries) or a benchmark name under data_root."""
  if spec.startswith("folder:"):
    root = spec[len("folder:"):]
    return folder_set(os.path.join(root, "database"), os.path.join(root, "queries"),
                      positive_dist_threshold, name=os.path.basename(os.path.normpath(root)))
  if not data_root:
    raise ValueError(f"eval set {spec!r} needs --data_root (or config.eval.data_root)")
  return benchmark_set(spec, data_root, index_root)


def requested_sets(database_folder: str | None, queries_folder: str | None,
                   datasets: Sequence[str], data_root: str, index_root: str | None,
                   positive_dist_threshold: float, use_labels: bool = True,
                   output_dir: str | None = None) -> list[EvalSet]:
  """evaluate.py's sets: the two folders (if given), then each benchmark under data_root.
  `output_dir` may not lie inside an image folder (a rerun would read its pictures as images)."""
  hint = "see --helpshort for the flags"
  sets = []
  if database_folder or queries_folder:
    if not (database_folder and queries_folder):
      raise UserError("--database_folder and --queries_folder go together", hint)
    out = os.path.realpath(output_dir) if output_dir else None
    for flag, folder in (("--database_folder", database_folder), ("--queries_folder", queries_folder)):
      real = os.path.realpath(folder)
      if out is not None and (out == real or out.startswith(real + os.sep)):
        raise UserError(f"--output_dir {output_dir} is inside {flag} {folder}: its prediction "
                        "pictures would be read as images by the next run",
                        "choose an --output_dir outside the image folders")
    sets.append(folder_set(database_folder, queries_folder, positive_dist_threshold,
                           use_labels=use_labels))
  for name in datasets:
    if not data_root:
      raise UserError("--datasets needs --data_root", hint)
    sets.append(benchmark_set(name, data_root, index_root or None, positive_dist_threshold))
  if not sets:
    raise UserError("nothing to evaluate: give --database_folder/--queries_folder or --datasets", hint)
  return sets


def write_msls_challenge(path: str, eval_set: EvalSet, predictions: np.ndarray) -> None:
  """One line per query: its file stem, then the stems of its predicted database images.

  A prediction of -1 (no result) is left out, never read as the last database image.
  """
  stem = lambda p: os.path.splitext(os.path.basename(p))[0]  # noqa: E731
  with open(path, "w") as f:
    for qi, preds in enumerate(predictions):
      f.write(" ".join([stem(eval_set.query_paths[qi])] +
                       [stem(eval_set.database_paths[j]) for j in preds if j >= 0]) + "\n")
