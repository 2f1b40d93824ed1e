"""Data: GSV-Cities (`gsv_cities`, its pack: `pack`, `pack_shards`, `pack_records`,
`tfds_gsv`), the training input pipeline (`pipeline`, `augment`, `images`, `source`), evaluation
sets (`eval_sets`, `benchmarks`), the data checker (`check`) and the embedded demo dataset
(`demo`)."""
