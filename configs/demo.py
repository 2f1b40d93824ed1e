r"""The embedded demo: a small ViT + SALAD trained from scratch on the generated demo dataset.

  python train.py --config configs/demo.py --workdir runs/demo
  python train.py --config configs/demo.py:mixvpr --workdir runs/demo_mixvpr

`:mixvpr` is the GSV-Cities baseline's family in miniature: a ResNet-18 cut after layer2
(layers_to_crop [3, 4], BatchNorm statistics trained and saved with the params) + MixVPR on its
8x8 map of 64x64 images, SGD with momentum and MixVPR's warmup + multistep schedule.

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
  parts = set((arg or "").split(","))
  if "mixvpr" in parts:
    mixvpr(c)
  if "short" in parts:  # the end-to-end tests
    c.num_epochs = 4 if "mixvpr" not in parts else 1
  if parts - {"", "short", "mixvpr"}:
    raise ValueError(f"unknown config argument {arg!r} (use short, mixvpr or mixvpr,short)")
  return c


def mixvpr(c):
  """ResNet-18 cropped after layer2 + MixVPR (8x8 map -> 8 x 32 = 256-d), from scratch."""
  c.model.backbone = "resnet18"
  c.model.layers_to_crop = (3, 4)
  c.model.layers_to_freeze = -1  # random init: the official wrapper freezes pretrained layers only
  c.model.aggregator = "mixvpr"
  c.model.in_h, c.model.in_w = 8, 8
  c.model.out_channels, c.model.mix_depth, c.model.out_rows = 32, 2, 8
  c.data.image_size = (64, 64)
  c.eval.image_size = (64, 64)
  c.optim.name = "sgd"
  c.optim.lr, c.optim.momentum, c.optim.weight_decay = 0.05, 0.9, 1e-3
  c.optim.schedule, c.optim.schedule_interval = "multistep", "epoch"
  c.optim.milestones, c.optim.gamma, c.optim.warmup_steps = (5, 7), 0.3, 10
