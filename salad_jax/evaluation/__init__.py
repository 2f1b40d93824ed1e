"""Evaluation: descriptor extraction (`descriptors`), exact search (`search`), Recall@K
(`recall`), the descriptor cache (`descriptor_cache`), and evaluating a model on eval sets
(`evaluate`: evaluate.py's work and the trainer's per-epoch validation)."""
