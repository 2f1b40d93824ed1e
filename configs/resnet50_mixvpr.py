r"""The GSV-Cities baseline users compare against: ResNet-50 cut after layer3 + MixVPR, 4096-d at
320x320, trained with amaralibey/MixVPR's recipe (its main.py): 120 places x 4 images, SGD
lr 0.05, momentum 0.9, weight decay 1e-3, 650 warmup steps, MultiStepLR over epochs
(milestones 5, 10, 15, 25, 45, gamma 0.3), multi-similarity loss + miner, 80 epochs; conv1,
bn1, layer1 and layer2 frozen (their BatchNorm statistics still update, as in torch).

Should reach (MixVPR README, ResNet50 4096-d): MSLS-val R@1 88.2, Pitts30k-test 91.6,
Pitts250k-test 94.3. The paper (WACV 2023) is quoted at MSLS-val R@1 88.0; that figure was not
found in the sources searched here (the README's was).

  python train.py --config configs/resnet50_mixvpr.py --workdir runs/mixvpr \
      --config.init=resnet50-0676ba61.pth --config.data.root=/data/GSVCities \
      --config.eval.sets=msls_val,pitts30k_val --config.eval.data_root=/data

`--config.init`: torchvision's ImageNet ResNet-50 (IMAGENET1K_V1, what `pretrained=True` loads;
its fc.* and layer4 are dropped). The released MixVPR checkpoint loads as it is:
`salad_jax.load("resnet50_MixVPR_4096_channels(1024)_rows(4).ckpt")`.
"""

from salad_jax.train.config import base_config


def gsv_baseline(c):
  """What the GSV-Cities baselines share: ResNet-50, MixVPR's data and optimizer recipe."""
  c.num_epochs = 80
  c.model.backbone = "resnet50"
  c.model.layers_to_freeze = 2
  c.data.places_per_batch = 120
  c.data.img_per_place = 4
  c.data.image_size = (320, 320)
  c.optim.name = "sgd"
  c.optim.lr, c.optim.momentum, c.optim.weight_decay = 0.05, 0.9, 1e-3
  c.optim.schedule, c.optim.schedule_interval = "multistep", "epoch"
  c.optim.milestones, c.optim.gamma = (5, 10, 15, 25, 45), 0.3
  c.optim.warmup_steps = 650
  c.eval.image_size = (320, 320)
  return c


def get_config(arg=None):
  c = gsv_baseline(base_config())
  c.model.layers_to_crop = (4,)  # layer3's 1024 x 20 x 20 map at 320x320
  c.model.aggregator = "mixvpr"
  c.model.in_h, c.model.in_w = 20, 20
  c.model.out_channels, c.model.mix_depth, c.model.mlp_ratio, c.model.out_rows = 1024, 4, 1.0, 4
  if arg:
    raise ValueError(f"unknown config argument {arg!r}")
  return c
