"""Where each of SALAD's benchmarks comes from, how many images its protocol has, and the other
names its folder is often given (the tables of `salad_jax.data.check`)."""

from __future__ import annotations

# other names of a benchmark (SALAD's and VPR-methods-evaluation's) -> ours
ALIASES = {"msls": "msls_val", "mslsval": "msls_val", "msls_challenge": "msls_test"}
# name -> (queries, database images) of the published protocol (shared/reference.md, section 7)
EXPECTED = {
  "msls_val": (740, 18871),
  "msls_test": (1135, 36565),
  "pitts30k_val": (7608, 10000),
  "pitts30k_test": (6816, 10000),
  "pitts250k_test": (8280, 83952),
  "nordland": (2760, 27592),
  "sped": (607, 607),
}
INDEX_SOURCE = (
  "the datasets/ folder of github.com/serizba/salad (the same files are in "
  "github.com/amaralibey/gsv-cities)"
)
SOURCES = {  # images folder -> where to get it, and the layout under <data_root>/<folder>
  "mapillary": (
    "MSLS from github.com/FrederikWarburg/mapillary_sls (mapillary.com/dataset/places)",
    "train_val/<city>/{database,query}/images/*.jpg (val: cph, sf), test/<city>/...",
  ),
  "Pittsburgh": (
    "Pittsburgh250k from data.ciirc.cvut.cz/public/projects/2015netVLAD/Pittsburgh250k/",
    "000/..010/ (database) and queries_real/ (queries)",
  ),
  "Nordland": (
    "the VPR-Bench Nordland linked in serizba/salad's README "
    "(surfdrive.surf.nl/files/index.php/s/sbZRXzYe3l0v67W)",
    "ref/*.jpg and query/*.jpg",
  ),
  "SPEDTEST": (
    "the VPR-Bench SPED linked in serizba/salad's README "
    "(surfdrive.surf.nl/files/index.php/s/sbZRXzYe3l0v67W)",
    "ref/*.jpg and query/*.jpg",
  ),
}
# other names a folder is often given (lower case) -> the name we expect
OTHER_NAMES = {
  "msls": "mapillary",
  "mapillary_sls": "mapillary",
  "pitts": "Pittsburgh",
  "pitts250k": "Pittsburgh",
  "pitts30k": "Pittsburgh",
  "pittsburgh250k": "Pittsburgh",
  "sped": "SPEDTEST",
  "gsv-cities": "GSVCities",
  "gsv_cities": "GSVCities",
}
SEASONS = ("summer", "winter", "spring", "fall")
