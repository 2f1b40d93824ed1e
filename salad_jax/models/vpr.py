"""The place-recognition model: a backbone (DINOv2 or ResNet) x a head, and its variables.

`VPRModel(config)` is the Flax module: `__call__(images) -> descriptors`, `features(images) ->
(map, token)`; its config is `ModelConfig` (`salad_jax.models.config`, re-exported here, as are
the official-argument helpers of `salad_jax.models.official` and `parse_overrides`). ResNet
backbones carry BatchNorm running statistics, a `batch_stats` collection next to `params`:
`init_variables` makes both, `as_variables` turns what the library passes around (a params
tree, or {"params", "batch_stats"}) into the variables `apply` takes. `assignment` gives the
SALAD assignment maps of a forward pass.
"""

from __future__ import annotations

from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from salad_jax.errors import UserError
from salad_jax.models import convap, cosplace, gem, grads, mixvpr, netvlad, resnet, salad, vit
from salad_jax.models.config import DTYPES, HEAD_NAMES, ModelConfig, parse_overrides
from salad_jax.models.official import fields_from_hyper_parameters, from_official, official_fields

# what users and the docs import from here (their homes: models/config.py, models/official.py)
__all__ = [
  "ModelConfig",
  "VPRModel",
  "as_variables",
  "assignment",
  "fields_from_hyper_parameters",
  "from_official",
  "init_params",
  "init_variables",
  "official_fields",
  "parse_overrides",
  "weights_of",
]


def _head(c: ModelConfig, dtype) -> nn.Module:
  a = c.aggregator
  if a == "salad":
    return salad.SALAD(
      c.num_clusters,
      c.cluster_dim,
      c.token_dim,
      c.hidden_dim,
      c.dropout,
      dtype=dtype,
      dustbin=c.salad_dustbin,
      assignment=c.salad_assignment,
      global_token=c.salad_global_token,
    )
  if a == "gem":
    return gem.GeMPool(p_init=float(c.p))
  if a == "convap":
    return convap.ConvAP(c.out_channels, c.s1, c.s2, dtype=dtype)
  if a == "cosplace":
    return cosplace.CosPlace(c.out_dim, dtype=dtype)
  if a == "mixvpr":
    return mixvpr.MixVPR(
      c.in_h,
      c.in_w,
      c.out_channels,
      c.mix_depth,
      c.mlp_ratio,
      c.out_rows,
      feature_stride=c.feature_stride,
      dtype=dtype,
    )
  return netvlad.NetVLAD(c.num_clusters, c.normalize_input, c.vladv2, dtype=dtype)


class VPRModel(nn.Module):
  """`__call__(images [B,H,W,3], train, valid)` -> descriptors [B, D]; `features` -> (map, token).

  `valid` [B] bool (training, optional): padding entries take no part in the BatchNorm
  statistics of a ResNet (the DINOv2 backbone and the heads treat examples independently).
  """

  config: ModelConfig

  def setup(self):
    c = self.config
    dtype = DTYPES[c.dtype]
    if c.is_resnet:
      self.backbone = resnet.ResNet(c.backbone, c.layers_to_crop, c.layers_to_freeze, dtype)
    else:
      self.backbone = vit.DinoViT(
        c.variant,
        c.registers,
        c.num_trainable_blocks,
        dtype,
        c.attention,
        c.micro_batch,
        c.train_micro_batch,
        c.remat,
        final_norm=c.norm_layer,
      )
    self.aggregator = _head(c, dtype)

  def features(self, images, train: bool = False, valid=None):
    """Backbone outputs: the feature map [B, h, w, C] and the cls token [B, C] (after the final
    norm with `norm_layer`); a ResNet has no token (None)."""
    if self.config.is_resnet:
      return self.backbone(images, train=train, valid=valid), None
    gh, gw = vit.check_image_shape(images.shape)
    tokens = self.backbone(images, train=train)
    skip = 1 + (vit.NUM_REGISTERS if self.config.registers else 0)
    return tokens[:, skip:].reshape(images.shape[0], gh, gw, -1), tokens[:, 0]

  def __call__(self, images, train: bool = False, valid=None, example_ids=None):
    """`valid` [B] (training): padding entries, kept out of BatchNorm statistics; `example_ids`
    [B] (training): each image's identity in the step, keying SALAD's dropout."""
    self.config.check_image_shape(images.shape)
    with grads.reduce_dtype(self.config.grad_reduce_dtype):
      feats, token = self.features(images, train=train, valid=valid)
      if self.config.aggregator == "salad":
        return self.aggregator(feats, token, train=train, example_ids=example_ids)
      return self.aggregator(feats, token, train=train)


# ------------------------------------------------------------------------------ variables
def as_variables(weights: Mapping) -> dict:
  """What the library passes around as a model's weights -> the variables `apply` takes.

  `weights` is a params tree (top keys 'backbone', 'aggregator') or, for models with BatchNorm,
  {"params": ..., "batch_stats": ...}.
  """
  if "params" in weights:
    return dict(weights)
  return {"params": weights}


def weights_of(params: Mapping, batch_stats: Mapping | None = None):
  """The inverse of `as_variables`: params alone, or {"params", "batch_stats"}."""
  if batch_stats:
    return {"params": params, "batch_stats": batch_stats}
  return params


def init_variables(config: ModelConfig, rng: jax.Array, image_size=None) -> dict:
  """Fresh variables: {"params"} (+ "batch_stats" for ResNets), as plain dicts. Inits: DINOv2's
  for the ViT, torchvision's for the ResNet, the official modules' for the heads. `image_size`
  (side or (h, w); default one the model takes) does not change the params."""
  model = VPRModel(config)
  size = image_size or config.example_image_size()
  h, w = (size, size) if isinstance(size, int) else size
  x = jnp.zeros((1, h, w, 3), jnp.float32)
  variables = jax.jit(lambda r: model.init(r, x))(rng)
  return {k: jax.tree.map(lambda a: a, dict(v)) for k, v in variables.items()}


def init_params(config: ModelConfig, rng: jax.Array, image_size=None) -> dict:
  """Fresh parameters as a plain dict (`init_variables` also gives BatchNorm statistics)."""
  return init_variables(config, rng, image_size)["params"]


def assignment(model: VPRModel, params, images) -> jax.Array:
  """The SALAD assignment the descriptor aggregates with: [B, m+1, h, w] float32.

  Rows 0..m-1 are the head's own `assignment` (sown by `SALAD.__call__` in the same forward pass
  that makes the descriptor); row m is the dustbin: Sinkhorn ends with the column update, so
  every patch's column sums to 1 and the dustbin holds 1 minus the clusters' mass (0 without
  the dustbin and with the softmax assignment). `params`: the weights (`as_variables`).
  """
  c = model.config
  if c.aggregator != "salad":
    raise UserError(
      f"the model's head is {HEAD_NAMES[c.aggregator]}: assignment maps exist for SALAD only"
    )
  gh, gw = c.check_image_shape(images.shape)
  _, state = model.apply(as_variables(params), images, mutable=["intermediates"])
  p = state["intermediates"]["aggregator"]["assignment"][0]  # [B, m, n]
  dust = jnp.clip(1.0 - p.sum(axis=1, keepdims=True), 0.0, 1.0)
  return jnp.concatenate([p, dust], axis=1).reshape(p.shape[0], p.shape[1] + 1, gh, gw)
