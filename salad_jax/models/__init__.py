"""Flax modules: DINOv2 ViT, ResNets, the SALAD head and the other heads, the Sinkhorn
assignment, pos-embed resampling; the model (`vpr`), its config (`config`) and the official
arguments that build one (`official`)."""
