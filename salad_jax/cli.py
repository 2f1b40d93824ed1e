"""Small helpers shared by the absl entry points."""

from absl import flags, logging


def quiet_logs() -> None:
  """Orbax and JAX log every step at INFO; keep the console readable unless --verbosity is given."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
