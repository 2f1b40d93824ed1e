"""Flax modules: DINOv2 ViT, the SALAD head, the Sinkhorn assignment, pos-embed resampling."""
