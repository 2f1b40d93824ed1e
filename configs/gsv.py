r"""The SALAD paper's recipe: DINOv2 ViT-B/14 (last 4 blocks trained) + SALAD (m=64, l=128, g=256),
GSV-Cities, 60 places x 4 images at 224x224, AdamW 6e-5, LinearLR to 0.2 over 4000 steps,
4 epochs; validation at 322x322.

  python train.py --config configs/gsv.py --workdir runs/gsv \
      --config.init=dinov2_vitb14_pretrain.pth --config.data.root=/data/GSVCities \
      --config.eval.sets=msls_val,pitts30k_val --config.eval.data_root=/data

Which data source for which hardware (the batches are bit-identical either way):
  * the JPEG files (default, `data.source=folder`): CPU runs and small GPUs. One core decodes,
    resizes and augments ~230 images/s through the pipeline (2-core AMD EPYC, idle;
    `python benchmarks/pipeline_throughput.py`), so a host feeds ~230 x (cores - 2) images/s.
  * the pre-resized pack (`:packed`): any host whose accelerators train faster than that, e.g.
    one H200 (~5,000 images/s of this recipe, estimated: ~8 busy cores of the pack, ~22 of the
    files) or a TPU host. One core then delivers ~610 images/s through the pipeline (3.0x the
    JPEG path as it was, through grain; 3.3x per image in one process), ~3,200 without
    RandAugment. Pack once (all cores, resumable), then train from it:

      python -m salad_jax.data.tfds_gsv --manual_dir /data/GSVCities --data_dir /data/tfds \
          --image_size 224,224
      python train.py --config configs/gsv.py:packed --workdir runs/gsv \
          --config.data.tfds_data_dir=/data/tfds --config.data.num_workers=<cores - 2> ...

`--config configs/gsv.py:runlocal` is a few-step smoke test of the same pipeline.
"""

from salad_jax.train.config import base_config


def get_config(arg=None):
  c = base_config()
  c.init = ""  # set to the DINOv2 ViT-B/14 hub weights (dinov2_vitb14_pretrain.pth)
  if arg == "runlocal":
    c.num_epochs = 1
    c.stop_after_steps = 2
    c.data.places_per_batch = 4
    c.data.num_workers = 0
    c.eval.sets = ""
  elif arg == "packed":  # the pre-resized pack: one thread per worker, workers ~ cores - 2
    c.data.source = "tfds"
    c.data.tfds_data_dir = "../data/tfds"
    c.data.num_workers = 14
    c.data.num_threads = 1
  elif arg:
    raise ValueError(f"unknown config argument {arg!r} (use runlocal or packed)")
  return c
