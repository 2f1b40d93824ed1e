r"""Evaluates a VPR checkpoint (SALAD or any other official model): Recall@K on UTM-named folders or the VPR benchmarks.

  # your own images (VPR-methods-evaluation layout: names @utm_east@utm_north@...@.jpg)
  python evaluate.py --checkpoint weights/dino_salad --database_folder db/ --queries_folder q/ \
      --image_size 322 322 --recall_values 1 5 10 20 --output_dir runs/eval
  # the paper's benchmarks (images + the reference's .npy index files under --data_root)
  python evaluate.py --checkpoint dino_salad.ckpt --datasets msls_val nordland sped \
      --data_root /data --output_dir runs/eval --cache_dir cache/

--checkpoint: a converted dir, a train.py workdir (best checkpoint) or a torch .ckpt/.pth.
Lists take spaces (VPR-methods-evaluation, SALAD's eval.py) or commas (--image_size=322,322).
"""

import math
import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS
SALAD_DATA_ROOT = "../data"  # SALAD's eval.py: images under ../data, index files in ./datasets
flags.DEFINE_string(
  "checkpoint", None, "Converted dir, train.py workdir/step dir, or torch .ckpt/.pth/.safetensors."
)
flags.DEFINE_alias("ckpt_path", "checkpoint")  # SALAD's eval.py
flags.DEFINE_string(
  "output_dir",
  "runs/eval",
  "Everything evaluate.py writes goes here. "
  "VPR-methods-evaluation's --log_dir NAME: logs/NAME/<date_time>.",
)
flags.DEFINE_string("database_folder", None, "Folder of database images (UTM names).")
flags.DEFINE_string("queries_folder", None, "Folder of query images (UTM names).")
flags.DEFINE_float(
  "positive_dist_threshold", 25.0, "Metres within which a database image is a positive."
)
flags.DEFINE_list(
  "datasets",
  [],
  "Benchmarks: msls_val, msls_test, pitts30k_val, pitts30k_test, "
  "pitts250k_test, nordland, sped (needs --data_root).",
)
flags.DEFINE_alias(
  "val_datasets", "datasets"
)  # SALAD's eval.py (MSLS, MSLS_Test, Nordland, SPED...)
flags.DEFINE_string(
  "data_root",
  "",
  "Root of the benchmark images (mapillary/, Pittsburgh/, Nordland/, SPEDTEST/); with SALAD's "
  "--val_datasets/--ckpt_path it defaults to SALAD's ../data.",
)
flags.DEFINE_string(
  "index_root",
  "",
  "Folder of the reference .npy index files (default <data_root>/datasets, else ./datasets).",
)
flags.DEFINE_list("recall_values", ["1", "5", "10", "15", "20", "25"], "K values of Recall@K.")
flags.DEFINE_list(
  "image_size", ["322", "322"], "Resize to H W (one value: square). The paper: 322 322."
)
flags.DEFINE_integer(
  "batch_size", 32, "Images per batch (rounded up to a multiple of the devices).", lower_bound=1
)
flags.DEFINE_integer(
  "num_preds_to_save", 0, "Save an image + text file with the top-N of each query.", lower_bound=0
)
flags.DEFINE_bool(
  "save_only_wrong_preds", False, "With --num_preds_to_save: only queries whose top-1 is wrong."
)
flags.DEFINE_bool(
  "save_descriptors",
  False,
  "Save database_descriptors.npy, queries_descriptors.npy and the image paths of their rows"
  " (database_paths.txt, queries_paths.txt).",
)
flags.DEFINE_bool(
  "no_labels", False, "Folders without UTM names: retrieve only (use --num_preds_to_save)."
)
flags.DEFINE_enum(
  "search", "faiss", ["faiss", "jax"], "Exact kNN with faiss, or a sharded JAX matmul + top_k."
)
flags.DEFINE_integer("num_workers", 4, "Image loading worker processes.", lower_bound=0)
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype override.")
flags.DEFINE_enum(
  "device",
  None,
  ["cpu", "cuda", "gpu", "tpu"],
  "Force a JAX platform (default: the accelerator JAX finds).",
)
flags.DEFINE_string(
  "cache_dir",
  None,
  "Reuse descriptors computed before with the same weights, size, dtype and files.",
)
flags.DEFINE_multi_string(
  "model",
  [],
  "FIELD=VALUE: a model config field that a torch --checkpoint leaves open, e.g. "
  "--model salad_assignment=softmax or --model norm_layer=true (convert_weights.py --model).",
)
flags.mark_flag_as_required("checkpoint")
flags.register_validator(
  "positive_dist_threshold",
  lambda v: math.isfinite(v) and v > 0,
  "must be a positive number of metres, e.g. 25",
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from salad_jax import argv_compat, cli, errors
  from salad_jax.data import benchmarks, images
  from salad_jax.evaluation import evaluate, recall
  from salad_jax.files import destinations
  from salad_jax.inference import check_checkpoint_exists
  from salad_jax.models.config import parse_overrides

  cli.quiet_logs()
  size = argv_compat.image_size(FLAGS.image_size)
  if len(FLAGS.image_size) == 1:
    errors.note(
      f"--image_size {size[0]} resizes to {size[0]}x{size[1]} (as SALAD's eval.py); "
      "VPR-methods-evaluation keeps the aspect ratio with one value"
    )
  recall_values = recall.check_recall_values(FLAGS.recall_values)
  images.check_batch_memory(size, FLAGS.batch_size)  # before reading folders or weights
  # checked, not made: the folder appears when the run claims it (a failed start leaves none)
  output_dir = destinations.check_dir(FLAGS.output_dir, "--output_dir", create=False)
  check_checkpoint_exists(FLAGS.checkpoint)
  model_overrides = parse_overrides(FLAGS.model)
  data_root = FLAGS.data_root
  salad_style = FLAGS["val_datasets"].present or FLAGS["ckpt_path"].present
  if not data_root and FLAGS.datasets and salad_style:  # SALAD's eval.py, run from its checkout
    data_root = SALAD_DATA_ROOT
    errors.note(
      f"--data_root not given: SALAD's {data_root} ({os.path.abspath(data_root)}), as its "
      "eval.py (--data_root chooses another)"
    )
  cli.start_jax(FLAGS.device)  # --device, then jax.distributed when configured
  sets = benchmarks.requested_sets(
    FLAGS.database_folder,
    FLAGS.queries_folder,
    FLAGS.datasets,
    data_root,
    FLAGS.index_root,
    FLAGS.positive_dist_threshold,
    use_labels=not FLAGS.no_labels,
    output_dir=FLAGS.output_dir,
  )
  table = evaluate.evaluate_checkpoint(
    FLAGS.checkpoint,
    sets,
    output_dir,
    image_size=size,
    batch_size=FLAGS.batch_size,
    recall_values=recall_values,
    search_method=FLAGS.search,
    num_workers=FLAGS.num_workers,
    save_descriptors=FLAGS.save_descriptors,
    num_preds_to_save=FLAGS.num_preds_to_save,
    save_only_wrong_preds=FLAGS.save_only_wrong_preds,
    dtype=FLAGS.dtype,
    cache_dir=FLAGS.cache_dir,
    model_overrides=model_overrides,
  )
  print(
    f"wrote {output_dir}/recalls.json"
    if table
    else f"retrieval only, no recalls (no labels); outputs in {output_dir}"
  )


if __name__ == "__main__":
  from salad_jax import argv_compat, cli, errors

  try:
    sys.argv, notes = argv_compat.rewrite(
      sys.argv, *argv_compat.flag_kinds(), unsupported=argv_compat.VPR_METHODS_EVALUATION
    )
  except errors.UserError as e:
    cli.fail(e.message, e.hint)
  for note in notes:
    errors.note(note)
  cli.run(main)
