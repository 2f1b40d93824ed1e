r"""GSV-Cities baseline: ResNet-50 + GeM (p learned from 3), 2048-d at 320x320, trained with
MixVPR's recipe (`resnet50_mixvpr.gsv_baseline`).

Should reach about the GeM row of the SALAD paper's Table 1 (ResNet-50 GeM trained on
GSV-Cities): MSLS-val R@1 78.2, Pitts250k-test 87.0, SPED 66.7, Nordland 21.6. Found here only
in a third-party copy of that table, not in the paper itself: not confirmed.

  python train.py --config configs/resnet50_gem.py --workdir runs/gem \
      --config.init=resnet50-0676ba61.pth --config.data.root=/data/GSVCities ...
"""

from salad_jax.train.config import base_config

from configs.resnet50_mixvpr import gsv_baseline


def get_config(arg=None):
  c = gsv_baseline(base_config())
  c.model.aggregator = "gem"
  c.model.p = 3.0
  if arg:
    raise ValueError(f"unknown config argument {arg!r}")
  return c
