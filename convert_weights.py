r"""Converts weights between PyTorch and salad_jax: any official VPRModel (DINOv2 or ResNet x
SALAD, GeM, ConvAP, CosPlace, MixVPR, NetVLAD), a DINOv2 hub or torchvision ResNet file.

  # official dino_salad.ckpt (or a Lightning .ckpt, a DINOv2 hub .pth, a .safetensors) -> Orbax dir
  python convert_weights.py --src dino_salad.ckpt --dst weights/dino_salad
  # the MixVPR release (ResNet-50 + MixVPR 4096-d: the architecture comes from its keys)
  python convert_weights.py --src resnet50_MixVPR_4096_channels1024_rows4.ckpt --dst weights/mixvpr
  # salad_jax checkpoint (converted dir or train.py workdir) -> official-layout PyTorch state_dict
  python convert_weights.py --src runs/gsv --dst salad_from_jax.pth

Both may be URLs (gs://bucket/...). --overwrite only ever replaces what salad_jax wrote: a converted directory (salad_config.json +
params/, nothing else) or a weight file carrying salad_jax's marker; anything else is refused.
"""

import os

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string(
  "src", None, "PyTorch .ckpt/.pth/.safetensors, or a salad_jax dir.", required=True
)
flags.DEFINE_string(
  "dst",
  None,
  "Output: a directory (-> Orbax), or a .pth/.ckpt/.safetensors file (-> PyTorch state_dict).",
  required=True,
)
flags.DEFINE_bool("overwrite", False, "Replace an existing destination that salad_jax wrote.")
flags.DEFINE_integer(
  "seed", 0, "Seed of the fresh head when --src is a backbone-only DINOv2 / ResNet file."
)
flags.DEFINE_multi_string(
  "model",
  [],
  "FIELD=VALUE: a model config field that a torch --src leaves open (its keys and "
  "hyper_parameters do not fix it), e.g. --model salad_assignment=softmax, --model s1=3, "
  "--model norm_layer=true, or the head of a backbone-only file: --model aggregator=gem.",
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax

  import salad_jax
  from salad_jax import cli
  from salad_jax.files import paths
  from salad_jax.models.config import parse_overrides
  from salad_jax.weights import converted, torch_files

  cli.quiet_logs()
  src, dst = FLAGS.src, FLAGS.dst  # local paths or URLs (gs://...)
  if not paths.exists(src):  # both ends checked before anything is read or converted
    raise FileNotFoundError(f"--src {src} does not exist")
  if not paths.is_url(src) and os.path.isfile(src) and not os.access(src, os.R_OK):
    raise PermissionError(f"--src {src} is not readable (permission denied)")
  converted.check_destination(dst, FLAGS.overwrite)
  overrides = parse_overrides(FLAGS.model)

  model = salad_jax.load(src, rng=jax.random.key(FLAGS.seed), **overrides)
  if torch_files.file_kind(dst):
    model.to_torch(dst, overwrite=FLAGS.overwrite)
    kind = "PyTorch state_dict"
  else:
    model.save(dst, overwrite=FLAGS.overwrite)
    kind = "salad_jax Orbax checkpoint"
  c = model.config
  salad = c.aggregator == "salad"
  sizes = f", m={c.num_clusters} l={c.cluster_dim} g={c.token_dim}" if salad else ""
  print(
    f"wrote {kind} to {dst}: {c.describe()}{sizes}"
    + (f"; source sha256 {model.source['sha256'][:16]}..." if "sha256" in model.source else "")
  )


if __name__ == "__main__":
  from salad_jax import cli

  cli.run(main)
