r"""Converts SALAD / DINOv2 weights between PyTorch and salad_jax.

  # official dino_salad.ckpt (or a Lightning .ckpt, a DINOv2 hub .pth, a .safetensors) -> Orbax dir
  python convert_weights.py --src dino_salad.ckpt --dst weights/dino_salad
  # salad_jax checkpoint (converted dir or train.py workdir) -> official-layout PyTorch state_dict
  python convert_weights.py --src runs/gsv --dst salad_from_jax.pth
"""

import os

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("src", None, "PyTorch .ckpt/.pth/.safetensors, or a salad_jax dir.", required=True)
flags.DEFINE_string("dst", None, "Output: a directory (-> Orbax), or a .pth/.ckpt/.safetensors "
                    "file (-> PyTorch state_dict).", required=True)
flags.DEFINE_bool("overwrite", False, "Replace an existing destination.")
flags.DEFINE_integer("seed", 0, "Seed of the fresh head when --src is a backbone-only DINOv2 file.")


def main(argv):
  del argv
  import jax

  import salad_jax
  from salad_jax import cli, convert

  cli.quiet_logs()

  model = salad_jax.load(FLAGS.src, rng=jax.random.key(FLAGS.seed))
  dst = FLAGS.dst
  if dst.endswith(convert.TORCH_SUFFIXES + (convert.SAFETENSORS_SUFFIX,)):
    if os.path.exists(dst) and not FLAGS.overwrite:
      raise app.UsageError(f"{dst} exists; pass --overwrite to replace it")
    model.to_torch(dst)
    kind = "PyTorch state_dict"
  else:
    model.save(dst, overwrite=FLAGS.overwrite)
    kind = "salad_jax Orbax checkpoint"
  c = model.config
  print(f"wrote {kind} to {dst}: ViT-{c.variant}{' +registers' if c.registers else ''}, "
        f"m={c.num_clusters} l={c.cluster_dim} g={c.token_dim} -> {c.descriptor_dim}-d descriptors"
        + (f"; source sha256 {model.source['sha256'][:16]}..." if "sha256" in model.source else ""))


if __name__ == "__main__":
  from salad_jax import cli
  cli.run(main)
