"""The workdir's lock lives in `salad_jax.files.lock` (one lock for workdirs and output folders,
local or on GCS); kept here for imports."""

from salad_jax.files.lock import Lock, UrlLock, make_lock, utc_stamp  # noqa: F401
