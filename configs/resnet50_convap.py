r"""GSV-Cities baseline: ResNet-50 + ConvAP (Conv-AP of the GSV-Cities paper), 8192-d
(2048 x 2 x 2) at 320x320, trained with MixVPR's recipe (`resnet50_mixvpr.gsv_baseline`); the
aggregator arguments of amaralibey/MixVPR main.py's ConvAP example (in_channels 2048,
out_channels 2048).

Should reach (GSV-Cities README, ResNet50 Conv-AP 8192-d [2048x2x2]): MSLS-val R@1 83.1,
Pitts30k-test 90.5, Pitts250k-test 92.8 (the README's 2048-d [512x2x2] row: MSLS-val 83.4;
`--config.model.out_channels=512`). The README trained with its own repository's recipe, which
was not in the sources read here; this config uses MixVPR's.

  python train.py --config configs/resnet50_convap.py --workdir runs/convap \
      --config.init=resnet50-0676ba61.pth --config.data.root=/data/GSVCities ...
"""

from salad_jax.train.config import base_config

from configs.resnet50_mixvpr import gsv_baseline


def get_config(arg=None):
  c = gsv_baseline(base_config())
  c.model.aggregator = "convap"
  c.model.out_channels, c.model.s1, c.model.s2 = 2048, 2, 2
  if arg:
    raise ValueError(f"unknown config argument {arg!r}")
  return c
