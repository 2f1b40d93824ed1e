r"""The embedded demo: a small ViT + SALAD trained from scratch on the generated demo dataset.

  python train.py --config configs/demo.py --workdir runs/demo

Generates the data in demo_data/ on first use (same GSV-Cities and UTM-folder layouts, readers,
sampler, RandAugment and evaluator as a real run), trains for a few minutes on 2 CPU cores,
evaluates Recall@K before training and after every epoch, and saves Orbax checkpoints.
"""

from salad_jax.train.config import base_config


def get_config(arg=None):
  c = base_config()
  c.num_epochs = 8
  c.log_every_steps = 5
  c.model.variant = "Nano/14"
  c.model.num_trainable_blocks = 4  # every block; the patch embedding stays as initialised
  c.model.num_clusters = 16  # SALAD-544: m=16, l=32, g=32
  c.model.cluster_dim = 32
  c.model.token_dim = 32
  c.model.hidden_dim = 128
  c.data.source = "demo"
  c.data.root = "demo_data/gsv"
  c.data.cities = "DemoNorth,DemoSouth"
  c.data.places_per_batch = 16
  c.data.image_size = (112, 112)  # 8 x 8 = 64 patches > 16 clusters
  c.data.num_workers = 0
  c.data.num_threads = 4
  c.optim.lr = 1e-3
  c.optim.lr_total_iters = 100
  c.optim.lightning_epoch_step = False
  c.eval.sets = "folder:demo_data/eval"
  c.eval.image_size = (112, 112)
  c.eval.batch_size = 32
  c.eval.num_workers = 0
  c.eval.at_start = True
  c.checkpoint.every_steps = 20
  if arg == "short":  # the end-to-end test
    c.num_epochs = 4
  elif arg:
    raise ValueError(f"unknown config argument {arg!r} (use short)")
  return c
