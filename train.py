r"""Trains SALAD.

  python train.py --config configs/demo.py --workdir runs/demo
  python train.py --config configs/gsv.py --workdir runs/gsv --config.data.root=/data/GSVCities

Resumes automatically from the latest checkpoint in --workdir. The loop is
`salad_jax.train.trainer.train_and_evaluate`. SIGTERM saves the step reached and exits with 143.
"""

import signal

# A SIGTERM while the libraries load (seconds) is kept for the trainer, not a silent kill.
_EARLY_SIGTERM: list[int] = []
signal.signal(signal.SIGTERM, lambda signum, frame: _EARLY_SIGTERM.append(signum))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config", None, "Config file (get_config), e.g. configs/gsv.py.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and the resolved config go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from salad_jax import cli, sharding
  from salad_jax.train import metrics, trainer

  sharding.maybe_initialize_distributed()  # before anything touches a device
  cli.quiet_logs()
  result = trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  print(metrics.done_line(result))  # what is actually saved, e.g. after stop_after_steps


if __name__ == "__main__":
  from salad_jax.train import preemption

  # SIGTERM from now on: saved at the trainer's next safe point, never raised mid-statement
  preemption.cooperate()
  preemption.install(replace=True)
  if _EARLY_SIGTERM:
    preemption.request()
  from salad_jax import cli

  cli.run(main, config_flags=("config",))
