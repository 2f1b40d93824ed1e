"""Evaluation sets (`EvalSet`: database and query images, ground-truth positives) and the UTM-named
folder sets of VPR-methods-evaluation.

Folder layout: `<database_folder>` and `<queries_folder>` of images named
`.../@<utm_east>@<utm_north>@...@.jpg`; positives are database images within
`positive_dist_threshold` metres of the query. The reference's benchmarks are in
`salad_jax.data.benchmarks`.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Sequence

import numpy as np

from salad_jax.data import downloader_trees
from salad_jax.data.images import IMAGE_EXTENSIONS
from salad_jax.errors import UserError, note, warning

# image files it does not read: named in a warning, never used silently
OTHER_IMAGE_EXTENSIONS = (
  ".webp",
  ".tif",
  ".tiff",
  ".bmp",
  ".gif",
  ".jp2",
  ".ppm",
  ".pgm",
  ".pbm",
  ".heic",
  ".heif",
  ".avif",
)


@dataclasses.dataclass
class EvalSet:
  name: str
  database_paths: list[str]
  query_paths: list[str]
  positives: list[np.ndarray] | None  # per query: database indices; None = no labels
  challenge: bool = False  # MSLS test: no labels, predictions go to the challenge file
  protocol: str = ""
  positives_radius: float | None = None  # metres of a UTM radius search; None: a ground-truth file
  data_root: str = ""  # a benchmark's --data_root: `salad_jax.data.check` looks there

  @property
  def num_database(self) -> int:
    return len(self.database_paths)

  @property
  def num_queries(self) -> int:
    return len(self.query_paths)

  def check_files(self) -> None:
    """Missing images are one error, raised before any compute: how many, and the first."""
    if not self.database_paths or not self.query_paths:
      raise ValueError(
        f"{self.name}: empty eval set ({self.num_database} database images, "
        f"{self.num_queries} queries)"
      )
    missing = [
      [p for p in paths if not os.path.isfile(p)]
      for paths in (self.database_paths, self.query_paths)
    ]
    if not (missing[0] or missing[1]):
      return
    n = len(missing[0]) + len(missing[1])
    hint = (
      f"`python -m salad_jax.data.check --data_root {self.data_root} --datasets {self.name}` "
      "lists what is missing and where to get it"
      if self.data_root
      else "check the folders (and any <folder>_images_paths.txt list)"
    )
    raise MissingImagesError(
      f"{self.name}: {n} of {self.num_database + self.num_queries} images missing "
      f"({len(missing[0])} of {self.num_database} database, {len(missing[1])} of "
      f"{self.num_queries} queries); first image not found: {(missing[0] + missing[1])[0]}",
      hint,
    )

  def __repr__(self) -> str:
    return f"<{self.name}: {self.num_queries} queries, {self.num_database} database images>"


class MissingImagesError(UserError, FileNotFoundError):
  """Images of an eval set that are not on disk (a `UserError`: one line and a hint)."""


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
        raise FileNotFoundError(
          f"image {p} is a link to {os.path.realpath(p)}, which does not exist"
        )
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
      raise UserError(
        f"{where} lists the same image file twice: {first[key]} and {p} (both "
        f"{os.path.realpath(p)})",
        "remove one of them (links and hard links to one file count as one image)",
      )
    first[key] = p


def read_image_paths(folder: str) -> list[str]:
  """Images under `folder` (recursive, sorted), or the list in `<folder>_images_paths.txt`.

  The extensions VPR-methods-evaluation reads (.jpg, .jpeg, .png, any case), so both tools rank
  the same images; other image files found are named in one warning line.
  """
  if os.path.isfile(folder):
    raise NotADirectoryError(f"{folder} is a file, not a folder of images")
  if not os.path.isdir(folder):
    raise UserError(
      f"folder {folder} does not exist",
      "check the path (relative paths start at "
      "the current directory); `python -m salad_jax.data.check` checks benchmarks",
    )
  listing = folder.rstrip("/") + "_images_paths.txt"
  if os.path.isfile(listing):
    with open(listing) as f:
      paths = [os.path.join(folder, line) for line in f.read().splitlines() if line]
    in_folder = sum(
      os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS and not f.startswith(".")
      for _, _, fs in os.walk(folder)
      for f in fs
    )
    note(
      f"{folder}: using the {len(paths)} images listed in {listing}, not a search of the folder "
      f"({in_folder} image files there); delete or rename the list to use the folder"
    )
    _check_no_duplicates(paths, listing)
    return paths
  paths, others, skipped = _image_files(folder)
  if skipped:
    note(
      f"{folder}: {len(skipped)} linked folder(s) already read not followed again (a link "
      f"loop or a second link to one folder), e.g. {skipped[0]}"
    )
  if others:
    kinds = ", ".join(f"{n} {ext}" for ext, n in sorted(others.items()))
    warning(
      f"{folder}: {sum(others.values())} image files not used ({kinds}): evaluation reads "
      f"{'/'.join(IMAGE_EXTENSIONS)} as VPR-methods-evaluation does; convert them to .jpg to "
      "include them"
    )
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
      raise ValueError(
        f"image path {p} has no UTM coordinates: names must look like "
        "path/to/@utm_east@utm_north@...@.jpg (or pass --no_labels)"
      ) from None
    if not np.isfinite(out[i]).all():
      raise UserError(
        f"image path {p}: its UTM coordinates ({parts[1]}, {parts[2]}) are not finite numbers",
        "names must look like path/to/@utm_east@utm_north@...@.jpg with coordinates in metres",
      )
  return out


def positives_within(db_utm: np.ndarray, q_utm: np.ndarray, radius: float) -> list[np.ndarray]:
  from scipy.spatial import cKDTree

  tree = cKDTree(db_utm)
  return [np.asarray(sorted(ix), np.int64) for ix in tree.query_ball_point(q_utm, r=radius)]


def _check_queries_not_in_database(
  db: Sequence[str], q: Sequence[str], database_folder: str, queries_folder: str, use_labels: bool
) -> None:
  """A query that is also a database image finds itself: R@1 100 that means nothing."""
  if os.path.realpath(database_folder) == os.path.realpath(queries_folder):
    what = (
      f"--queries_folder and --database_folder are the same folder "
      f"({os.path.realpath(queries_folder)}): every query would find itself"
    )
  else:
    db_ids = {_identity(p): p for p in db}
    both = [(p, db_ids[key]) for p in q if (key := _identity(p)) in db_ids]
    if not both:
      return
    same = (
      f"{both[0][0]} is also in the database"
      if both[0][0] == both[0][1]
      else f"{both[0][0]} is {both[0][1]}"
    )
    what = (
      f"{len(both)} of {len(q)} queries are also database images (e.g. {same}): each "
      "would find itself"
    )
  if not use_labels:
    warning(what + " (retrieval only: their first prediction is themselves)")
    return
  raise UserError(
    what + " (R@1 100 that means nothing)",
    "give a database and a query folder with different images",
  )


def folder_set(
  database_folder: str,
  queries_folder: str,
  positive_dist_threshold: float = 25.0,
  use_labels: bool = True,
  name: str | None = None,
) -> EvalSet:
  db = read_image_paths(database_folder)
  q = read_image_paths(queries_folder)
  _check_queries_not_in_database(db, q, database_folder, queries_folder, use_labels)
  positives = None
  if use_labels:
    db_utm, q_utm = utm_of(db), utm_of(q)
    both = np.concatenate([db_utm, q_utm])
    if (np.abs(both[:, 0]) <= 180).all() and (np.abs(both[:, 1]) <= 90).all():
      warning(
        f"the coordinates in the file names under {database_folder} and {queries_folder} "
        "all lie within +-180 / +-90: they look like degrees (latitude/longitude), not UTM "
        f"metres; positives are database images within {positive_dist_threshold:g} of a "
        "query in those units"
      )
    positives = positives_within(db_utm, q_utm, positive_dist_threshold)
  name = (  # the dataset folder of VPR-datasets-downloader's <name>/images/test/database
    name
    or downloader_trees.set_name(database_folder, queries_folder)
    or os.path.basename(os.path.dirname(os.path.abspath(database_folder)))
    or "folder"
  )
  protocol = (
    f"UTM folders, positives within {positive_dist_threshold:g} m"
    if use_labels
    else "no labels (--no_labels): retrieval only, no recalls"
  )
  radius = positive_dist_threshold if use_labels else None
  return EvalSet(name, db, q, positives, protocol=protocol, positives_radius=radius)


# names a set may not take: evaluate.py's files beside the per-set folders (several sets)
RESERVED_NAMES = ("recalls.json", ".salad_jax_outputs.json", "preds")


def unique_names(sets: Sequence[EvalSet], keep: Sequence[bool] = ()) -> list[EvalSet]:
  """The sets with names unique per run (case-insensitively: the output folders may live on a
  case-insensitive disk): a set's name keys its row of the recall table, `recalls.json`, the
  training metrics and its output folder, so two sets of one name overwrote each other's
  results. A set whose name is taken gets `_2` (`_3`, ...) with a note; sets marked in `keep`
  (benchmarks: their names are the protocol's) claim their names first."""
  keep = list(keep) + [False] * (len(sets) - len(keep))
  taken = {n.casefold() for n in RESERVED_NAMES}
  out = list(sets)
  for i in sorted(range(len(sets)), key=lambda i: not keep[i]):
    s = sets[i]
    base = s.name or "folder"
    name, k = base, 2
    while name.casefold() in taken:
      name, k = f"{base}_{k}", k + 1
    taken.add(name.casefold())
    if name != s.name:
      where = f" ({os.path.dirname(s.database_paths[0])}, ...)" if s.database_paths else ""
      note(
        f"two eval sets would both be named {s.name!r}: the set{where} is reported as "
        f"{name!r} (in the recall table, recalls.json and its output folder)"
      )
      out[i] = dataclasses.replace(s, name=name)
  return out


def write_msls_challenge(path: str, eval_set: EvalSet, predictions: np.ndarray) -> None:
  """One line per query: its file stem, then the stems of its predicted database images.

  A prediction of -1 (no result) is left out, never read as the last database image.
  """
  stem = lambda p: os.path.splitext(os.path.basename(p))[0]  # noqa: E731
  with open(path, "w") as f:
    for qi, preds in enumerate(predictions):
      f.write(
        " ".join(
          [stem(eval_set.query_paths[qi])]
          + [stem(eval_set.database_paths[j]) for j in preds if j >= 0]
        )
        + "\n"
      )
