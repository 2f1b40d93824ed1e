"""Training: the settings and their checks (`config`), the train state (`state`), the jitted step
and the loop (`trainer.train_and_evaluate`), the optimizer (`optim`), what a run reports
(`metrics`), its Orbax checkpoints (`checkpoint`), and its workdir (`workdir`: the record of the
settings; `lock`)."""
