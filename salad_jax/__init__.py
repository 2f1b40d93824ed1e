"""salad_jax: DINOv2 SALAD visual place recognition in JAX/Flax."""

from salad_jax import losses
from salad_jax.inference import SaladModel, load, preprocess, save_converted
from salad_jax.models.vpr import ModelConfig, VPRModel, init_params

__all__ = ["losses", "ModelConfig", "SaladModel", "VPRModel", "init_params", "load", "preprocess",
           "save_converted"]
__version__ = "0.1.0"
