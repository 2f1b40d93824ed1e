r"""The SALAD paper's recipe: DINOv2 ViT-B/14 (last 4 blocks trained) + SALAD (m=64, l=128, g=256),
GSV-Cities, 60 places x 4 images at 224x224, AdamW 6e-5, LinearLR to 0.2 over 4000 steps,
4 epochs; validation at 322x322.

  python train.py --config configs/gsv.py --workdir runs/gsv \
      --config.init=dinov2_vitb14_pretrain.pth --config.data.root=/data/GSVCities \
      --config.eval.sets=msls_val,pitts30k_val --config.eval.data_root=/data

`--config configs/gsv.py:runlocal` is a few-step smoke test of the same pipeline.
"""

from salad_jax.configs import base_config


def get_config(arg=None):
  c = base_config()
  c.init = ""  # set to the DINOv2 ViT-B/14 hub weights (dinov2_vitb14_pretrain.pth)
  if arg == "runlocal":
    c.num_epochs = 1
    c.stop_after_steps = 2
    c.data.places_per_batch = 4
    c.data.num_workers = 0
    c.eval.sets = ""
  elif arg:
    raise ValueError(f"unknown config argument {arg!r} (use runlocal)")
  return c
