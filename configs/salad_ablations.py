r"""The SALAD paper's ablations, each a change to its recipe (configs/gsv.py: DINOv2 ViT-B/14,
the last 4 blocks trained, AdamW 6e-5, LinearLR, 4 epochs at 224x224):

  :gem          DINOv2 + GeM, 768-d
  :mixvpr       DINOv2 + MixVPR on the 16x16 map of 224x224 images (768 -> 1024 channels x 4
                rows, 4096-d, MixVPR's 4 mixer layers); evaluated at 224x224 too: MixVPR
                takes only the map size it was built for
  :netvlad      DINOv2 + NetVLAD, 64 clusters x 768 = 49,152-d
  :no_dustbin   SALAD with Sinkhorn but without the dustbin (8448-d)
  :softmax      SALAD with NetVLAD's softmax assignment instead of Sinkhorn (8448-d)
  :blocks=<k>   SALAD with the last k blocks trained (the paper: 4)

The heads other than SALAD take the DINOv2 wrapper's map after the final norm (norm_layer=True,
as the official SALAD training sets it) and no token (return_token=False).

Published figures: the paper's ablation tables (aggregation with a DINOv2 backbone, the
dustbin, trained blocks) were not found in the sources searched here, so none is confirmed; a
third-party summary of the paper quotes DINOv2 + GeM at MSLS Challenge R@1 62.6 against
SALAD's 75.0. The full model's own figure (MSLS-val R@1 92.2, the paper's Table 1) is in
configs/gsv.py.

  python train.py --config configs/salad_ablations.py:no_dustbin --workdir runs/no_dustbin \
      --config.init=dinov2_vitb14_pretrain.pth --config.data.root=/data/GSVCities ...
"""

from salad_jax.train.config import base_config

NAMES = ("gem", "mixvpr", "netvlad", "no_dustbin", "softmax", "blocks=<k>")


def get_config(arg=None):
  c = base_config()
  if arg in ("gem", "mixvpr", "netvlad"):
    c.model.aggregator = arg
    c.model.return_token = False
  if arg == "mixvpr":
    c.model.in_h, c.model.in_w = 16, 16
    c.model.out_channels, c.model.mix_depth, c.model.out_rows = 1024, 4, 4
    c.eval.image_size = (224, 224)
  elif arg == "netvlad":
    c.model.num_clusters = 64
  elif arg == "no_dustbin":
    c.model.salad_dustbin = False
  elif arg == "softmax":
    c.model.salad_assignment = "softmax"
  elif arg and arg.startswith("blocks="):
    c.model.num_trainable_blocks = int(arg.split("=", 1)[1])
  elif arg not in ("gem", "netvlad"):
    raise ValueError(f"unknown config argument {arg!r} (use one of {', '.join(NAMES)})")
  return c
