"""The default training/eval configuration (the SALAD paper's recipe); configs/*.py start here."""

import ml_collections

from salad_jax.models.vpr import ModelConfig


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_epochs = 4
  c.log_every_steps = 10
  c.stop_after_steps = 0  # > 0: stop early (after checkpointing); for smoke tests
  # '' = random init; a converted / trained salad_jax dir; or a torch .ckpt/.pth/.safetensors
  # (a DINOv2 hub .pth gives the backbone, the head starts fresh)
  c.init = ""
  c.model = ml_collections.ConfigDict(ModelConfig().to_dict())
  # devices = data x fsdp: the batch is split over all of them; params and optimizer state are
  # sharded over fsdp groups (1 = replicated, plain data parallelism)
  c.mesh = ml_collections.ConfigDict(dict(fsdp=1))

  c.data = ml_collections.ConfigDict()
  # folder: the GSV-Cities JPEG files | tfds: a pack (python -m salad_jax.data.tfds_gsv), the
  # images pre-resized to image_size: same batches, ~3x less CPU per image | demo
  c.data.source = "folder"
  c.data.root = "../data/GSVCities"
  c.data.cities = "Bangkok,BuenosAires,LosAngeles,MexicoCity,OSL,Rome,Barcelona,Chicago,Madrid," \
                  "Miami,Phoenix,TRT,Boston,Lisbon,Medellin,Minneapolis,PRG,WashingtonDC,Brussels," \
                  "London,Melbourne,Osaka,PRS"
  c.data.tfds_data_dir = ""  # source=tfds: the pack's --data_dir (or the pack directory itself)
  c.data.places_per_batch = 60
  c.data.img_per_place = 4
  c.data.min_img_per_place = 4
  c.data.image_size = (224, 224)  # a resized pack must hold this size (checked)
  c.data.randaugment = True
  c.data.num_workers = 8  # grain worker processes (each reads whole batches)
  c.data.num_threads = 4  # threads per process over the places of a batch
  c.data.demo_seed = 0

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 6e-5
  c.optim.weight_decay = 9.5e-9
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
  c.optim.lr_start_factor = 1.0
  c.optim.lr_end_factor = 0.2
  c.optim.lr_total_iters = 4000
  c.optim.lightning_epoch_step = True  # the reference's scheduler also steps at each epoch end
  c.optim.freeze = "auto"  # regex over param paths; auto = SALAD's frozen backbone part

  c.loss = ml_collections.ConfigDict(dict(alpha=1.0, beta=50.0, base=0.0, epsilon=0.1))

  c.eval = ml_collections.ConfigDict()
  c.eval.sets = ""  # comma-separated: benchmark names (msls_val, pitts30k_val, ...) or folder:<dir>
  c.eval.data_root = ""
  c.eval.index_root = ""
  c.eval.image_size = (322, 322)
  c.eval.batch_size = 32
  c.eval.recall_values = (1, 5, 10, 15, 20, 25)
  c.eval.positive_dist_threshold = 25.0
  c.eval.search = "faiss"
  c.eval.num_workers = 4
  c.eval.at_start = False  # also evaluate the untrained model

  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep_last=3, keep_best=1))
  return c
