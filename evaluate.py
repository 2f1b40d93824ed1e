r"""Evaluates a SALAD checkpoint: Recall@K on UTM-named folders or the VPR benchmarks.

  # your own images (VPR-methods-evaluation layout: names @utm_east@utm_north@...@.jpg)
  python evaluate.py --checkpoint weights/dino_salad --database_folder db/ --queries_folder q/ \
      --output_dir runs/eval
  # the paper's benchmarks (images + the reference's .npy index files under --data_root)
  python evaluate.py --checkpoint dino_salad.ckpt --datasets msls_val,nordland,sped \
      --data_root /data --output_dir runs/eval

--checkpoint: a converted dir, a train.py workdir (best checkpoint) or a torch .ckpt/.pth.
"""

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Converted dir, train.py workdir/step dir, or torch .ckpt/.pth/.safetensors.")
flags.DEFINE_string("output_dir", "runs/eval", "Everything evaluate.py writes goes here.")
flags.DEFINE_string("database_folder", None, "Folder of database images (UTM names).")
flags.DEFINE_string("queries_folder", None, "Folder of query images (UTM names).")
flags.DEFINE_float("positive_dist_threshold", 25.0, "Metres within which a database image is a positive.")
flags.DEFINE_list("datasets", [], "Benchmarks: msls_val, msls_test, pitts30k_val, pitts30k_test, "
                  "pitts250k_test, nordland, sped (needs --data_root).")
flags.DEFINE_string("data_root", "", "Root of the benchmark images (mapillary/, Pittsburgh/, Nordland/, SPEDTEST/).")
flags.DEFINE_string("index_root", "", "Folder of the reference .npy index files (default <data_root>/datasets).")
flags.DEFINE_list("recall_values", ["1", "5", "10", "15", "20", "25"], "K values of Recall@K.")
flags.DEFINE_list("image_size", ["322", "322"], "Resize to H,W (one value: square). The paper: 322,322.")
flags.DEFINE_integer("batch_size", 32, "Images per batch (rounded up to a multiple of the devices).")
flags.DEFINE_integer("num_preds_to_save", 0, "Save an image + text file with the top-N of each query.")
flags.DEFINE_bool("save_only_wrong_preds", False, "With --num_preds_to_save: only queries whose top-1 is wrong.")
flags.DEFINE_bool("save_descriptors", False, "Save database_descriptors.npy and queries_descriptors.npy.")
flags.DEFINE_bool("no_labels", False, "Folders without UTM names: retrieve only (use --num_preds_to_save).")
flags.DEFINE_enum("search", "faiss", ["faiss", "jax"], "Exact kNN with faiss, or a sharded JAX matmul + top_k.")
flags.DEFINE_integer("num_workers", 4, "Image loading worker processes.")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype override.")
flags.mark_flag_as_required("checkpoint")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from salad_jax import cli, evaluation, sharding
  from salad_jax.data import eval_sets
  cli.quiet_logs()
  sharding.maybe_initialize_distributed()
  size = [int(v) for v in FLAGS.image_size]
  if len(size) not in (1, 2):
    raise app.UsageError("--image_size takes one or two values (H,W)")
  size = (size[0], size[-1])
  sets = []
  if FLAGS.database_folder or FLAGS.queries_folder:
    if not (FLAGS.database_folder and FLAGS.queries_folder):
      raise app.UsageError("--database_folder and --queries_folder go together")
    sets.append(eval_sets.folder_set(FLAGS.database_folder, FLAGS.queries_folder,
                                     FLAGS.positive_dist_threshold, use_labels=not FLAGS.no_labels))
  for name in FLAGS.datasets:
    if not FLAGS.data_root:
      raise app.UsageError("--datasets needs --data_root")
    sets.append(eval_sets.benchmark_set(name, FLAGS.data_root, FLAGS.index_root or None,
                                        FLAGS.positive_dist_threshold))
  if not sets:
    raise app.UsageError("nothing to evaluate: give --database_folder/--queries_folder or --datasets")
  evaluation.evaluate_checkpoint(
      FLAGS.checkpoint, sets, FLAGS.output_dir, image_size=size, batch_size=FLAGS.batch_size,
      recall_values=tuple(int(k) for k in FLAGS.recall_values), search_method=FLAGS.search,
      num_workers=FLAGS.num_workers, save_descriptors=FLAGS.save_descriptors,
      num_preds_to_save=FLAGS.num_preds_to_save, save_only_wrong_preds=FLAGS.save_only_wrong_preds,
      dtype=FLAGS.dtype)
  print(f"wrote {FLAGS.output_dir}/recalls.json")


if __name__ == "__main__":
  from salad_jax import cli
  cli.run(main)
