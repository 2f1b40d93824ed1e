"""salad_jax: DINOv2 SALAD visual place recognition in JAX/Flax.

The public API: `load`, `preprocess`, `SaladModel` (inference: `describe`, `describe_folder`),
`Index` and `fit_pca` (retrieval: exact or faiss IVF/IVF-PQ search over image paths,
PCA-whitening), `save_converted`, `ModelConfig`, `VPRModel`, `init_params` (the model) and
`losses`. The package's folders by role: `models/` (the networks), `data/` (datasets and input
pipelines), `train/` (the train state, step, loop, checkpoints and workdir), `evaluation/`
(descriptors, search, Recall@K), `weights/` (PyTorch files, conversion, converted dirs,
checksums), `files/` (writing beside a user's files), `index/` (the retrieval index, its file).
"""

from salad_jax import losses
from salad_jax.index import Index, fit_pca
from salad_jax.inference import SaladModel, load, preprocess
from salad_jax.models.config import ModelConfig
from salad_jax.models.vpr import VPRModel, init_params
from salad_jax.weights.converted import save_converted

__all__ = [
  "losses",
  "Index",
  "ModelConfig",
  "SaladModel",
  "VPRModel",
  "fit_pca",
  "init_params",
  "load",
  "preprocess",
  "save_converted",
]
__version__ = "0.1.0"
