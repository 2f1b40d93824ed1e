"""The workdir's lock lives in `salad_jax.files.lock` (one lock for workdirs and output folders,
local or on GCS). This name is the same module object, so imports and test patches of
`salad_jax.train.lock` keep working."""

import sys

from salad_jax.files import lock as _lock

sys.modules[__name__] = _lock
