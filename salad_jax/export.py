r"""Exports `describe` as a `jax.export` artifact (StableHLO) that runs without salad_jax.

  python -m salad_jax.export --checkpoint weights/dino_salad --image_size 322 322 \
      --output salad_322.jaxexport

  # anywhere with jax and flatbuffers installed (pip install jax flatbuffers), no salad_jax:
  import jax, numpy as np
  describe = jax.export.deserialize(open("salad_322.jaxexport", "rb").read())
  descriptors = describe.call(images)  # float32 [B, 322, 322, 3] -> float32 [B, 8448]

The input is a batch of ImageNet-normalised float32 NHWC images of the exported size (resize
with PIL bilinear, /255, mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225): what
`salad_jax.preprocess` does); the batch dimension is symbolic, any B >= 1 runs. The output equals
`SaladModel.describe` (L2-normalised descriptors; measured within 1e-6).

The params are baked into the program as constants: the file is the whole model, its one input
is the images (no params pytree, no weight file, no tree structure for a user to rebuild), and
XLA may fold weight layouts at compile time. The costs: the file is as large as the params
(ViT-B/14 SALAD: ~350 MB), and jax.export's flatbuffer format caps a file at 2 GB, which ViT-g
(4.4 GB of fp32 params) exceeds; it is refused with a one-line error. The blocks run on the whole
batch (`micro_batch=0`: a symbolic batch cannot be split into micro-batches); the attention
kernel is the one `attention="auto"` picks on the exporting machine (chunked softmax on a CPU;
plain XLA on a GPU for fp32), lowered for every platform in --platforms (default cpu, cuda, tpu).

ONNX / TensorRT: go through the strict PyTorch export instead, which writes the official
state_dict layout:

  python convert_weights.py --src weights/dino_salad --dst model.pth
  # in the official repository (github.com/serizba/salad), with torch:
  model = torch.hub.load("serizba/salad", "dinov2_salad", pretrained=False)  # or VPRModel(
  #   backbone_arch="dinov2_vitb14", backbone_config={"num_trainable_blocks": 4,
  #   "return_token": True, "norm_layer": True}, agg_arch="SALAD", agg_config={
  #   "num_channels": 768, "num_clusters": 64, "cluster_dim": 128, "token_dim": 256})
  model.load_state_dict(torch.load("model.pth", weights_only=True), strict=True)
  model.eval()
  torch.onnx.export(model, torch.zeros(1, 3, 322, 322), "salad.onnx", input_names=["images"],
                    output_names=["descriptors"], opset_version=17,
                    dynamic_axes={"images": {0: "batch"}, "descriptors": {0: "batch"}})
  # TensorRT: trtexec --onnx=salad.onnx --saveEngine=salad.plan --minShapes=images:1x3x322x322 \
  #   --optShapes=images:32x3x322x322 --maxShapes=images:64x3x322x322 [--fp16]

(The official model takes NCHW; convert_weights.py checks every key and shape both ways.)
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from salad_jax.errors import UserError
from salad_jax.files import atomic, destinations, paths

FUN_NAME = "salad_jax_describe"  # the exported function's name: how we recognise our files
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
MAX_BYTES = 2**31 - 2**26  # flatbuffers' 2 GB, less room for the program around the constants


def export_describe(model, image_size, platforms: Sequence[str] = DEFAULT_PLATFORMS):
  """`jax.export.Exported` of model.describe at `image_size` (h, w) with a symbolic batch:
  float32 [B, h, w, 3] -> float32 [B, D]; params baked in as constants."""
  import jax
  import jax.numpy as jnp
  from jax import export

  from salad_jax.data.images import as_size
  from salad_jax.models.vpr import VPRModel, as_variables

  h, w = as_size(image_size)
  model.config.check_image_shape((1, h, w, 3))
  platforms = check_platforms(platforms)
  params = jax.tree.map(np.asarray, model.weights)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(params))
  if nbytes > MAX_BYTES:
    raise UserError(
      f"the params are {nbytes / 2**30:.1f} GiB; an exported program with them "
      "baked in must stay under jax.export's 2 GB flatbuffer limit",
      "export ViT-g through ONNX (convert_weights.py --dst model.pth, then "
      "torch.onnx.export: see salad_jax/export.py)",
    )
  module = VPRModel(model.config.replace(micro_batch=0))

  def salad_jax_describe(images):
    return module.apply(as_variables(params), images).astype(jnp.float32)

  (batch,) = export.symbolic_shape("batch")
  spec = jax.ShapeDtypeStruct((batch, h, w, 3), jnp.float32)
  try:
    return export.export(jax.jit(salad_jax_describe), platforms=platforms)(spec)
  except Exception as e:  # a kernel that one of the platforms cannot lower (e.g. cuDNN on cpu)
    first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    raise UserError(
      f"cannot export for {', '.join(platforms)}: {first[:300]}",
      "export for fewer --platforms, or with --attention xla",
    ) from e


def check_serializer() -> None:
  """jax.export (de)serialises with the flatbuffers package, which jax does not require."""
  try:
    import flatbuffers  # noqa: F401
  except ImportError:
    raise UserError(
      "writing or reading a jax.export file needs the flatbuffers package",
      "pip install flatbuffers",
    ) from None


def check_platforms(platforms: Sequence[str]) -> tuple[str, ...]:
  platforms = tuple(p.strip().lower() for p in platforms if p.strip())
  bad = [p for p in platforms if p not in PLATFORMS]
  if bad or not platforms:
    raise UserError(
      f"platforms {', '.join(platforms) or '(none)'}: each one of {', '.join(PLATFORMS)}",
      "e.g. --platforms cpu,cuda",
    )
  return platforms


def save(exported, path: str, overwrite: bool = False) -> int:
  """Writes `exported.serialize()` to `path` atomically (a fresh temporary name beside it, then
  a rename); an existing file is replaced only with `overwrite`, and only if it is an export of
  ours. Returns the bytes written."""
  path = os.fspath(path)
  check_serializer()
  check_destination(path, overwrite)
  data = exported.serialize()
  paths.makedirs(paths.parent(path))  # local, or gs://... (one upload)
  atomic.check_space(path, len(data))
  with atomic.new_file(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
  return len(data)


def load(path: str):
  """The `jax.export.Exported` in `path` (salad_jax not needed for this: see the docstring)."""
  from jax import export

  check_serializer()
  path = os.fspath(path)
  if not paths.isfile(path):
    raise FileNotFoundError(f"no exported model at {path}")
  data = paths.read_bytes(path)
  try:
    exp = export.deserialize(bytearray(data))
  except Exception as e:  # flatbuffers raises whatever the bytes make it hit
    raise UserError(
      f"{path} is not a jax.export file ({type(e).__name__})",
      "export it again: python -m salad_jax.export",
    ) from None
  if exp.fun_name != FUN_NAME:
    raise UserError(f"{path} is a jax.export file of {exp.fun_name!r}, not a salad_jax model")
  return exp


def written_by_us(path: str) -> bool:
  try:
    load(path)
    return True
  except Exception:  # unreadable or someone else's: not ours
    return False


def check_destination(path: str, overwrite: bool) -> None:
  """Refuses a link, a directory, an existing file without `overwrite`, and always a file that
  is not a salad_jax export (`files.destinations.check_file`)."""
  destinations.check_file(
    path, overwrite, written_by_us, flag="--output", kind="export", single="the export"
  )


def _main(argv):
  from absl import app, flags

  import salad_jax
  from salad_jax import argv_compat, cli, inference

  F = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_logs()
  size = argv_compat.image_size(F.image_size)
  platforms = check_platforms(F.platforms)
  check_serializer()
  inference.check_checkpoint_exists(F.checkpoint)
  check_destination(F.output, F.overwrite)  # before the weights are read
  overrides = {k: v for k, v in (("dtype", F.dtype), ("attention", F.attention)) if v}
  model = salad_jax.load(F.checkpoint, **overrides)
  exported = export_describe(model, size, platforms)
  nbytes = save(exported, F.output, F.overwrite)
  print(
    f"wrote {F.output} ({nbytes / 2**20:.1f} MiB): float32 images [batch, {size[0]}, "
    f"{size[1]}, 3] (ImageNet-normalised) -> descriptors float32 [batch, "
    f"{model.descriptor_dim}]; params baked in; platforms {', '.join(exported.platforms)}"
  )


if __name__ == "__main__":
  import sys

  from absl import flags

  from salad_jax import argv_compat, cli, errors

  flags.DEFINE_string(
    "checkpoint", None, "Converted dir, train.py workdir, or torch .ckpt/.pth/.safetensors."
  )
  flags.DEFINE_list("image_size", ["322", "322"], "H W (one value: square); multiples of 14.")
  flags.DEFINE_string("output", None, "The file to write (e.g. salad_322.jaxexport).")
  flags.DEFINE_list(
    "platforms", list(DEFAULT_PLATFORMS), "Platforms to lower for: cpu, cuda, rocm, tpu."
  )
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype override.")
  flags.DEFINE_enum(
    "attention",
    None,
    ["auto", "chunked", "xla", "dot_product_attention"],
    "Attention kernel override (xla: portable to every platform).",
  )
  flags.DEFINE_bool("overwrite", False, "Replace an existing --output that salad_jax wrote.")
  flags.mark_flags_as_required(["checkpoint", "output"])
  try:
    sys.argv, _ = argv_compat.rewrite(sys.argv, *argv_compat.flag_kinds())
  except errors.UserError as e:
    cli.fail(e.message, e.hint)
  cli.run(_main)
