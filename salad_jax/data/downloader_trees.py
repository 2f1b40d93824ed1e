"""The UTM-named folder sets that gmberton/VPR-datasets-downloader writes, found under a root.

Its layout: `<dataset>/images/{train,val,test}/{database,queries}` (pitts30k, pitts250k,
st_lucia, tokyo247, san_francisco, eynsham, nordland, sped, amstertime, svox, baidu; msls as
`msls/images/...` or, from older scripts, `msls/{train,val}/...` with `test` a link to `val`),
and SF-XL's `sf_xl/processed/{val,test}/{database,queries_v1,...}`. Each split with a database
and a queries folder is a folder set (`salad_jax.data.eval_sets.folder_set`), evaluated with
`evaluate.py --database_folder/--queries_folder`; it is named after its dataset folder.
These are not SALAD's raw layout (`mapillary/`, `SPEDTEST/`, ... with the `.npy` index files).
"""

from __future__ import annotations

import dataclasses
import os
import shlex

from salad_jax.data import benchmark_sources
from salad_jax.data.images import IMAGE_EXTENSIONS

SPLITS = ("test", "val", "train")
CONTAINERS = {"images": "", "processed": "", "small": "_small"}  # folder -> name suffix
# (dataset folder, split) -> SALAD's benchmark of that data, compared with in `protocol_notes`
COUNTERPARTS = {
  ("msls", "val"): "msls_val",
  ("pitts30k", "val"): "pitts30k_val",
  ("pitts30k", "test"): "pitts30k_test",
  ("pitts250k", "test"): "pitts250k_test",
  ("nordland", "test"): "nordland",
  ("sped", "test"): "sped",
}
MSLS_VAL = (
  "not SALAD's msls_val protocol (the 740 queries of msls_val_qIdx.npy, positives from "
  "msls_val_pIdx.npy): every val query with positives within 25 m, so its recalls are not "
  "comparable with the paper's MSLS-val (`--datasets msls_val` with the raw MSLS is)"
)


@dataclasses.dataclass
class FolderSet:
  name: str
  database: str
  queries: str
  dataset: str  # the dataset folder's name
  split: str
  links: list[str] = dataclasses.field(default_factory=list)  # other paths to the same split


def _queries_suffix(queries_folder: str) -> str:
  """`queries`, `queries_v1` (SF-XL's test queries): none; `queries_night`: `_night`."""
  q = os.path.basename(os.path.normpath(queries_folder)).lower()
  rest = q[len("queries") :].lstrip("_") if q.startswith("queries") else ""
  return "" if rest in ("", "v1") else "_" + rest


def _layout(database_folder: str) -> tuple[str, str, str] | None:
  """(dataset folder name, split, container suffix) of `<dataset>/[images/]<split>/database`."""
  db = os.path.abspath(database_folder)
  split_dir = os.path.dirname(db)
  split = os.path.basename(split_dir)
  if os.path.basename(db).lower() != "database" or split.lower() not in SPLITS:
    return None
  up = os.path.dirname(split_dir)
  suffix = ""
  if os.path.basename(up).lower() in CONTAINERS:
    suffix = CONTAINERS[os.path.basename(up).lower()]
    up = os.path.dirname(up)
  dataset = os.path.basename(up)
  return (dataset, split.lower(), suffix) if dataset else None


def set_name(database_folder: str, queries_folder: str) -> str | None:
  """The name of a downloader-layout folder set: its dataset folder (`st_lucia`, `sf_xl`),
  `_val`/`_train` for those splits, `_night` for `queries_night`; a name SALAD's benchmarks
  use (`sped`, `nordland`, `msls_val`) gets `_utm`, so that recall tables never mix the two
  protocols. None when the folders are not in that layout."""
  layout = _layout(database_folder)
  if layout is None:
    return None
  dataset, split, suffix = layout
  name = dataset + suffix + ("" if split == "test" else f"_{split}")
  name += _queries_suffix(queries_folder)
  if name.lower() in benchmark_sources.EXPECTED or name.lower() in benchmark_sources.ALIASES:
    name += "_utm"
  return name


def is_tree(path: str) -> bool:
  """Whether `path` is a downloader dataset folder (a split with database/ under it)."""
  for container in ("", *CONTAINERS):
    for split in SPLITS:
      if os.path.isdir(os.path.join(path, container, split, "database")):
        return True
  return False


def _queries_folders(names: list[str]) -> list[str]:
  return sorted(n for n in names if n.lower().startswith("queries"))


def find_sets(root: str, max_depth: int = 5) -> list[FolderSet]:
  """Every `<split>/database` + `<split>/queries*` under root (links followed once); a split
  reached twice (msls's `test` is a link to `val`) is reported once, under its real path."""
  root = os.path.abspath(root)
  base = root.rstrip(os.sep).count(os.sep)
  found: dict[str, list[FolderSet]] = {}  # real split path -> its sets
  seen = set()
  for dirpath, dirnames, _ in os.walk(root, followlinks=True):
    dirnames.sort()
    real = os.path.realpath(dirpath)
    if "database" in dirnames and os.path.basename(dirpath).lower() in SPLITS:
      queries = _queries_folders(dirnames)
      sets = [
        FolderSet(
          set_name(os.path.join(dirpath, "database"), os.path.join(dirpath, q)) or q,
          os.path.join(dirpath, "database"),
          os.path.join(dirpath, q),
          *(_layout(os.path.join(dirpath, "database")) or ("", ""))[:2],
        )
        for q in queries
      ]
      if real in found:  # a link to a split already found: keep the real path's sets
        if not os.path.islink(dirpath):
          found[real], sets = sets, found[real]
        found[real][0].links += [os.path.dirname(s.database) for s in sets[:1]]
      elif sets:
        found[real] = sets
      dirnames[:] = []  # nothing below a split is another split
      continue
    if real in seen or dirpath.count(os.sep) - base >= max_depth:
      dirnames[:] = []
    seen.add(real)
    skip = ("database", "queries", "raw_data", ".")  # image folders: no split below them
    dirnames[:] = [d for d in dirnames if not d.lower().startswith(skip)]
  return [s for sets in found.values() for s in sets]


def count_images(folder: str) -> int:
  """Image files under `folder` as evaluation reads them (its `_images_paths.txt`, else a
  recursive search of .jpg/.jpeg/.png)."""
  listing = folder.rstrip("/") + "_images_paths.txt"
  if os.path.isfile(listing):
    with open(listing) as f:
      return sum(1 for line in f if line.strip())
  return sum(
    not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
    for _, _, files in os.walk(folder, followlinks=True)
    for f in files
  )


def _has_utm_names(folder: str) -> bool:
  for _, _, files in os.walk(folder, followlinks=True):
    for f in sorted(files)[:5]:
      parts = f.split("@")
      try:
        float(parts[1]), float(parts[2])
      except (IndexError, ValueError):
        return False
      return True
  return True


def command(s: FolderSet) -> str:
  """The evaluate.py line that evaluates the set (CHECKPOINT: the user's model)."""
  return (
    f"python evaluate.py --checkpoint CHECKPOINT --database_folder {shlex.quote(s.database)} "
    f"--queries_folder {shlex.quote(s.queries)}"
  )


def protocol_notes(s: FolderSet, n_q: int, n_db: int, expected) -> list[str]:
  """Where the set is not the protocol of SALAD's benchmark of the same data."""
  bench = COUNTERPARTS.get((s.dataset.lower(), s.split))
  if bench is None:
    return []
  if bench == "msls_val":
    return ["warning: " + MSLS_VAL]
  want_q, want_db = expected[bench]
  if (n_q, n_db) == (want_q, want_db):
    return [f"same counts as SALAD's {bench} ({want_q} queries / {want_db} database images)"]
  return [
    f"warning: not SALAD's {bench} protocol ({want_q} queries / {want_db} database images): "
    f"its recalls are not comparable with the paper's {bench}"
  ]


def row(s: FolderSet, expected) -> tuple[str, str, str, list[str]]:
  """(status, queries, database, notes) of the set for `salad_jax.data.check`'s table."""
  n_q, n_db = count_images(s.queries), count_images(s.database)
  notes = [command(s)]
  if s.links:
    notes.append("also reached as " + ", ".join(s.links) + " (a link to the same folders)")
  status = "folders" if n_q and n_db else "partial"
  if not (n_q and n_db):
    empty = [f for f, n in ((s.queries, n_q), (s.database, n_db)) if not n]
    notes.append("no images in " + " or ".join(empty))
  elif not (_has_utm_names(s.database) and _has_utm_names(s.queries)):
    notes.append("file names carry no @utm_east@utm_north@: evaluate it with --no_labels")
  return status, str(n_q), str(n_db), notes + protocol_notes(s, n_q, n_db, expected)
