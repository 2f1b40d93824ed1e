"""Prints the measured JAX-vs-PyTorch differences behind the parity tests (fp32, CPU).

Descriptors, backbone patch features, cls token and the Sinkhorn assignment for ViT-S/14 and
ViT-B/14 at the sizes the tests use, random weights with realistic scales.

  python benchmarks/parity_report.py [--variants S/14,B/14]
"""

import argparse

import common  # noqa: F401


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--variants", default="S/14,B/14")
  args = ap.parse_args()

  import jax
  import numpy as np

  from salad_jax.models.vpr import VPRModel

  from helpers import parity_diffs, twin

  print(
    f"{'model':6s} {'size':9s} {'batch':>5s} {'descriptor':>11s} {'patch feat':>11s} "
    f"{'cls token':>11s} {'assignment':>11s}   (max abs diff)"
  )
  for variant in args.variants.split(","):
    tm, params, config = twin(variant, seed=11)
    model = VPRModel(config)
    fwd = jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=["intermediates"]))
    feats = jax.jit(lambda p, x: model.apply({"params": p}, x, method=VPRModel.features))
    for hw in [(224, 224), (322, 322), (518, 518), (224, 322)]:
      x = np.random.default_rng(0).standard_normal((3,) + hw + (3,)).astype(np.float32)
      for batch in (x[:1], x):
        d = parity_diffs(tm, params, fwd, feats, batch)
        print(
          f"{variant:6s} {hw[0]}x{hw[1]:<5d} {len(batch):5d} "
          + " ".join(f"{d[k]:11.2e}" for k in ("descriptor", "features", "token", "assignment"))
        )


if __name__ == "__main__":
  main()
