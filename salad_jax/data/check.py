r"""Which VPR benchmarks are on disk, complete, and where the missing pieces go.

  python -m salad_jax.data.check --data_root /data [--index_root /data/datasets] [--gsv_root ...]

For msls_val, msls_test, pitts30k_val, pitts30k_test, pitts250k_test, nordland, sped and
GSV-Cities: the index files (the reference's `datasets/*.npy`), the images they list that exist
against the counts the protocol expects (e.g. MSLS-val 740 queries / 18,871 database images),
which Nordland variant the files are, folders or index files found in the wrong place, and for
anything missing where to get it and where to put it. The UTM-named folder sets of
VPR-datasets-downloader under the root (`st_lucia/images/test/...`, `sf_xl/processed/test/...`)
are listed with their counts and the evaluate.py line for each (`downloader_trees`). Exit
status 0 when everything listed is complete (or an evaluable folder set), 1 otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
from typing import Mapping, Sequence

from salad_jax.data import benchmarks, downloader_trees, gsv_cities
from salad_jax.data.benchmark_sources import (  # noqa: F401 (check.EXPECTED, ...: their old place)
  EXPECTED,
  INDEX_SOURCE,
  OTHER_NAMES,
  SEASONS,
  SOURCES,
)
from salad_jax.data.images import IMAGE_EXTENSIONS
from salad_jax.errors import UserError


@dataclasses.dataclass
class Report:
  name: str
  status: str = "missing"  # complete | partial | missing | invalid (index files that disagree)
  queries: str = "-"
  database: str = "-"
  notes: list[str] = dataclasses.field(default_factory=list)
  todo: list[str] = dataclasses.field(default_factory=list)  # where to get / put what is missing
  invalid: list[str] = dataclasses.field(default_factory=list)  # index files that disagree
  index_root: str = ""  # set when index files are missing


def _walk(root: str, max_depth: int):
  """(dirpath, dirnames, filenames) down to `max_depth` levels below root."""
  base = root.rstrip(os.sep).count(os.sep)
  for dirpath, dirnames, filenames in os.walk(root):
    if dirpath.count(os.sep) - base >= max_depth:
      dirnames[:] = []
    dirnames.sort()
    yield dirpath, dirnames, filenames


@functools.lru_cache(maxsize=8)
def _index_files(root: str, max_depth: int = 4) -> dict[str, list[str]]:
  """file name -> paths of the .npy/.mat files under root (one walk per root)."""
  out: dict[str, list[str]] = {}
  for dirpath, _, files in _walk(root, max_depth):
    for f in files:
      if f.endswith((".npy", ".mat")):
        out.setdefault(f, []).append(os.path.join(dirpath, f))
  return out


def _find_file(root: str, name: str, skip: str) -> str | None:
  found = _index_files(os.path.abspath(root)).get(name, [])
  return next((p for p in found if p != os.path.abspath(skip)), None)


def _find_folder(root: str, want: str, skip: str) -> str | None:
  """A folder named like `want` (any case, or a usual other name) elsewhere under root; never a
  VPR-datasets-downloader folder set (`msls/images/val/...` is not SALAD's raw layout)."""
  for dirpath, dirnames, _ in _walk(root, 2):
    for d in dirnames:
      path = os.path.join(dirpath, d)
      named = d.lower() == want.lower() or OTHER_NAMES.get(d.lower()) == want
      if path != skip and named and not downloader_trees.is_tree(path):
        return path
  return None


def _count_existing(root: str, rel_paths: Sequence[str]) -> tuple[int, str | None]:
  found, first_missing = 0, None
  for p in rel_paths:
    if os.path.isfile(os.path.join(root, p)):
      found += 1
    elif first_missing is None:
      first_missing = os.path.join(root, p)
  return found, first_missing


def _count_glob(root: str, patterns: Sequence[str]) -> int:
  return sum(len(glob.glob(os.path.join(root, p))) for p in patterns)


def nordland_variant(folder: str) -> str:
  """Which Nordland release a folder holds, from its layout and counts."""
  if not os.path.isdir(folder):
    return "not found"
  entries = {e.lower() for e in os.listdir(folder)}
  if {"ref", "query"} <= entries:
    n_ref = _count_glob(folder, ["ref/*.jpg", "ref/*.png"])
    n_q = _count_glob(folder, ["query/*.jpg", "query/*.png"])
    return (
      f"VPR-Bench version (ref/ {n_ref}, query/ {n_q} images; SALAD's protocol: "
      f"{EXPECTED['nordland'][1]} / {EXPECTED['nordland'][0]})"
    )
  if glob.glob(os.path.join(folder, "images", "*", "database")):
    return (
      "VPR-datasets-downloader version (UTM-named folders): evaluate it with "
      "--database_folder/--queries_folder, not --datasets nordland"
    )
  if any(any(s in e for s in SEASONS) for e in entries):
    return (
      "the original 4-season release: not the benchmark split; SALAD's protocol uses the "
      "VPR-Bench subset (ref/, query/)"
    )
  return "unknown layout (expected ref/ and query/)"


def check_benchmark(
  name: str, data_root: str, index_root: str, expected: Mapping[str, tuple[int, int]] = EXPECTED
) -> Report:
  folder, db_file, q_file, gt_file = benchmarks.BENCHMARKS[name]
  r = Report(name)
  images = os.path.join(data_root, folder)
  want_q, want_db = expected[name]
  index_files = [db_file, q_file] + (["msls_val/msls_val_qIdx.npy"] if name == "msls_val" else [])
  index_files += [gt_file] if gt_file else []
  missing_index = []
  for f in index_files:
    path = os.path.join(index_root, f)
    if os.path.isfile(path):
      continue
    if (
      f == gt_file
      and name.startswith("pitts")
      and os.path.isfile(os.path.join(index_root, "Pittsburgh", name + ".mat"))
    ):
      r.notes.append(f"ground truth from Pittsburgh/{name}.mat (no {os.path.basename(f)})")
      continue
    missing_index.append(path)
    elsewhere = _find_file(data_root, os.path.basename(f), path)
    if elsewhere:
      r.notes.append(
        f"index file {elsewhere} is misplaced: move it to {path} (or pass --index_root)"
      )
  if missing_index:
    r.notes.append(
      "missing index files: " + ", ".join(os.path.relpath(p, index_root) for p in missing_index)
    )
    r.index_root = index_root
  _check_indices(name, index_root, r)
  have_images = os.path.isdir(images)
  if not have_images:
    elsewhere = _find_folder(data_root, folder, images)
    if elsewhere:
      r.notes.append(f"images folder {elsewhere} is misplaced: move or link it to {images}")
    get, layout = SOURCES[folder]
    r.todo.append(f"images: {get}; put them in {images}/ as {layout}")
  if name == "nordland" and have_images:
    r.notes.append("Nordland variant: " + nordland_variant(images))
  counts = _listed_counts(name, index_root, images, missing_index, r) if have_images else None
  if counts is None:
    if have_images:
      n = sum(f.lower().endswith(IMAGE_EXTENSIONS) for _, _, fs in os.walk(images) for f in fs)
      r.notes.append(
        f"{n} image files under {images}; without the index files they cannot be "
        f"checked against the protocol"
      )
    r.status = "partial" if (have_images or len(missing_index) < len(index_files)) else "missing"
    return _invalid(r)
  (q_found, q_listed), (db_found, db_listed) = counts
  r.queries, r.database = f"{q_found}/{want_q}", f"{db_found}/{want_db}"
  if (q_listed, db_listed) != (want_q, want_db):
    r.notes.append(
      f"the index lists {q_listed} queries / {db_listed} database images; the protocol "
      f"expects {want_q} / {want_db}: another version of the index files?"
    )
  complete = (
    not missing_index
    and (q_found, db_found) == (want_q, want_db)
    and (q_listed, db_listed) == (want_q, want_db)
  )
  r.status = "complete" if complete else "partial"
  return _invalid(r)


def _invalid(r: Report) -> Report:
  """Index files that name images outside their lists make the set `invalid`, whatever else."""
  if r.invalid:
    r.status = "invalid"
    r.notes += [f"error: {m}" for m in r.invalid]
    r.todo.append(benchmarks.INDEX_HINT)
  return r


def _check_indices(name: str, index_root: str, r: Report) -> None:
  """What evaluate.py refuses: a query index or ground truth that names images outside the
  lists (R@1 0.00 without a word). Each problem goes to `r.invalid`."""
  _, db_file, q_file, gt_file = benchmarks.BENCHMARKS[name]
  paths = {k: os.path.join(index_root, f) for k, f in (("db", db_file), ("q", q_file)) if f}
  if not all(os.path.isfile(p) for p in paths.values()):
    return
  try:
    num_db = len(benchmarks.load_npy(paths["db"]))
    num_q = len(benchmarks.load_npy(paths["q"]))
    if name == "msls_val":
      qidx = os.path.join(index_root, "msls_val/msls_val_qIdx.npy")
      if not os.path.isfile(qidx):
        return
      num_q = len(benchmarks.check_query_index(benchmarks.load_npy(qidx), num_q, qidx))
    gt = os.path.join(index_root, gt_file) if gt_file else ""
    if gt and os.path.isfile(gt):
      benchmarks.check_ground_truth(benchmarks.load_npy(gt), num_db, num_q, gt)
  except (UserError, ValueError) as e:
    r.invalid.append(e.message if isinstance(e, UserError) else str(e))


def _listed_counts(name, index_root, images, missing_index, r: Report):
  """((queries found, listed), (database found, listed)) from the index files, or None."""
  folder, db_file, q_file, _ = benchmarks.BENCHMARKS[name]
  if any(p.endswith((db_file, q_file)) for p in missing_index):
    return None
  db = [str(x) for x in benchmarks.load_npy(os.path.join(index_root, db_file))]
  q = [str(x) for x in benchmarks.load_npy(os.path.join(index_root, q_file))]
  if name == "msls_val":
    qidx = os.path.join(index_root, "msls_val/msls_val_qIdx.npy")
    try:
      q = [q[i] for i in benchmarks.check_query_index(benchmarks.load_npy(qidx), len(q), qidx)]
    except (OSError, UserError):  # missing, or named by _check_indices
      return None
  out = []
  for role, paths in (("query", q), ("database", db)):
    found, first_missing = _count_existing(images, paths)
    if first_missing:
      r.notes.append(
        f"{len(paths) - found} of {len(paths)} {role} images missing, e.g. {first_missing}"
      )
      get, layout = SOURCES[folder]
      todo = f"images: {get}; put them in {images}/ as {layout}"
      if todo not in r.todo:
        r.todo.append(todo)
    out.append((found, len(paths)))
  return tuple(out)


def check_gsv(
  gsv_root: str, data_root: str, cities: Sequence[str] = gsv_cities.TRAIN_CITIES
) -> Report:
  """GSV-Cities: a dataframe per training city, and the images its rows name."""
  r = Report("GSV-Cities")
  if not os.path.isdir(os.path.join(gsv_root, "Dataframes")):
    elsewhere = _find_folder(
      data_root, os.path.basename(gsv_root.rstrip(os.sep)) or "GSVCities", gsv_root
    )
    if elsewhere:
      r.notes.append(
        f"folder {elsewhere} looks like GSV-Cities: move it to {gsv_root} or pass --gsv_root"
      )
    r.todo.append(f"{gsv_cities.HOW_TO_GET.replace('<root>', gsv_root)}")
    r.status = "partial" if os.path.isdir(gsv_root) else "missing"
    return r
  rows = found = 0
  missing_csv, short = [], []
  for i, city in enumerate(cities):
    csv_path = os.path.join(gsv_root, "Dataframes", f"{city}.csv")
    if not os.path.isfile(csv_path):
      missing_csv.append(city)
      continue
    _, names = gsv_cities._read_city(csv_path, i)  # noqa: SLF001 (the reader's own naming)
    n, first_missing = _count_existing(gsv_root, names)
    rows, found = rows + len(names), found + n
    if first_missing:
      short.append(f"{city} {n}/{len(names)} (e.g. {first_missing})")
  r.database = f"{found}/{rows}"
  r.queries = f"{len(cities) - len(missing_csv)}/{len(cities)} cities"
  if missing_csv:
    r.notes.append("missing dataframes: " + ", ".join(f"Dataframes/{c}.csv" for c in missing_csv))
  if short:
    r.notes.append("cities with missing images: " + "; ".join(short))
  if missing_csv or short:
    r.todo.append(gsv_cities.HOW_TO_GET.replace("<root>", gsv_root))
  r.status = "complete" if not (missing_csv or short) else "partial"
  return r


def check_all(
  data_root: str,
  index_root: str | None = None,
  gsv_root: str | None = None,
  names: Sequence[str] | None = None,
  expected: Mapping[str, tuple[int, int]] = EXPECTED,
  gsv_cities_list: Sequence[str] = gsv_cities.TRAIN_CITIES,
) -> list[Report]:
  index_root = index_root or benchmarks.default_index_root(data_root)
  _index_files.cache_clear()  # the tree may have changed since the last check
  out = []
  if names is None:  # everything: SALAD's benchmarks, GSV-Cities and the UTM folder sets
    for fs in downloader_trees.find_sets(data_root):
      status, queries, database, notes = downloader_trees.row(fs, expected)
      out.append(Report(fs.name, status, queries, database, notes))
  names = list(names) if names is not None else list(EXPECTED) + ["gsv_cities"]
  for n in names:
    if n.lower() in ("gsv_cities", "gsv-cities", "gsvcities"):
      out.append(
        check_gsv(gsv_root or os.path.join(data_root, "GSVCities"), data_root, gsv_cities_list)
      )
    else:
      key = benchmarks.ALIASES.get(n.lower(), n.lower())
      if key not in benchmarks.BENCHMARKS:
        raise ValueError(
          f"unknown benchmark {n!r}; known: {sorted(benchmarks.BENCHMARKS)} and gsv_cities"
        )
      out.append(check_benchmark(key, data_root, index_root, expected))
  return out


def shown(reports: Sequence[Report]) -> list[Report]:
  """The reports to list: where folder sets were found, not the benchmarks that are not there
  at all (`format_reports` names them in one line)."""
  if not any(r.status == "folders" for r in reports):
    return list(reports)
  return [r for r in reports if r.status != "missing"]


def format_reports(reports: Sequence[Report]) -> str:
  lines = [f"{'benchmark':<15} {'status':<9} {'queries':>15} {'database':>15}"]
  absent = [r.name for r in reports if r not in shown(reports)]
  for r in sorted(shown(reports), key=lambda r: r.status == "folders"):
    lines.append(f"{r.name:<15} {r.status:<9} {r.queries:>15} {r.database:>15}")
    lines += [f"    {n}" for n in r.notes]
    lines += [f"    get: {t}" for t in r.todo]
  roots = sorted({r.index_root for r in shown(reports) if r.index_root})
  for root in roots:
    lines.append(f"index files: copy {INDEX_SOURCE} to {root}/ (or pass --index_root)")
  if absent:
    lines.append(
      f"not here: {', '.join(absent)} (SALAD's raw layout and index files; "
      "`--datasets NAME` says where to get one)"
    )
  if any(r.status == "folders" for r in reports):
    lines.append(
      "folders: UTM-named folder sets (VPR-datasets-downloader); evaluate each with its line, "
      "CHECKPOINT being your model (e.g. weights/dino_salad.ckpt)"
    )
  return "\n".join(lines)


def _main(argv) -> None:
  import sys

  from absl import app, flags

  F = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not os.path.isdir(F.data_root):
    raise UserError(
      f"--data_root {F.data_root} "
      + ("is a file, not a folder" if os.path.exists(F.data_root) else "does not exist"),
      "give the folder that holds (or will hold) the benchmarks: mapillary/, Pittsburgh/, "
      "Nordland/, SPEDTEST/, GSVCities/ and datasets/ (the index files)",
    )
  reports = check_all(F.data_root, F.index_root or None, F.gsv_root or None, F.datasets or None)
  print(f"data_root {os.path.abspath(F.data_root)}  (counts: images found / the protocol's)")
  print(format_reports(reports))
  sys.exit(0 if all(r.status in ("complete", "folders") for r in shown(reports)) else 1)


if __name__ == "__main__":
  import sys

  from absl import flags

  from salad_jax import argv_compat, cli, errors

  flags.DEFINE_string(
    "data_root", None, "Root of the benchmark images (and datasets/ index files)."
  )
  flags.DEFINE_string(
    "index_root", "", "The reference's .npy index files (default <data_root>/datasets)."
  )
  flags.DEFINE_string("gsv_root", "", "GSV-Cities (default <data_root>/GSVCities).")
  flags.DEFINE_list("datasets", [], "Only these (default: every benchmark and gsv_cities).")
  flags.mark_flag_as_required("data_root")
  try:
    sys.argv, _ = argv_compat.rewrite(sys.argv, *argv_compat.flag_kinds())
  except errors.UserError as e:
    cli.fail(e.message, e.hint)
  cli.run(_main)
