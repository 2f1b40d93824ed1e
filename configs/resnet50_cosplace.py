r"""GSV-Cities baseline: ResNet-50 + the CosPlace head (GeM then a linear layer), 2048-d at
320x320, trained with MixVPR's recipe (`resnet50_mixvpr.gsv_baseline`) and the multi-similarity
loss (not CosPlace's own classification training); the aggregator arguments of
amaralibey/MixVPR main.py's CosPlace example (in_dim 2048, out_dim 2048).

Published figure: the MixVPR and GSV-Cities papers list CosPlace trained on GSV-Cities; its
numbers were not found in the sources searched here (not confirmed).

  python train.py --config configs/resnet50_cosplace.py --workdir runs/cosplace \
      --config.init=resnet50-0676ba61.pth --config.data.root=/data/GSVCities ...
"""

from salad_jax.train.config import base_config

from configs.resnet50_mixvpr import gsv_baseline


def get_config(arg=None):
  c = gsv_baseline(base_config())
  c.model.aggregator = "cosplace"
  c.model.out_dim = 2048
  if arg:
    raise ValueError(f"unknown config argument {arg!r}")
  return c
