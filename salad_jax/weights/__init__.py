"""Weights: PyTorch files read and written safely (`torch_files`), the official state_dict layout
<-> Flax params (`convert`), the model a checkpoint holds (`infer`), the converted-checkpoint
directory (`converted`), params checksums (`checksum`), a training run's checkpoints read for
inference (`run_checkpoints`) and reading Orbax checkpoints (`orbax_reads`)."""
