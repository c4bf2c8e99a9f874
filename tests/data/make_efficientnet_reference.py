"""Makes ``efficientnet_lite0_flower_torch.npz``: the PyTorch reference
logits that ``tests/test_efficientnet.py`` compares the Flax port with.

Run once, in two steps (the reference needs torch, which the test extra
does not install; any throwaway environment will do):

  # 1. the input, with this repository's preprocessing (the project's venv):
  python tests/data/make_efficientnet_reference.py batch /tmp/flower_batch.npy
  # 2. the logits of the reference model code on it (a venv with
  #    torch==2.13.0+cpu and efficientnet-lite-pytorch==0.1.0):
  python tests/data/make_efficientnet_reference.py torch /tmp/flower_batch.npy \
      tests/data/efficientnet_lite0_flower_torch.npz --weights \
      $(python -c "from adamix_jax.models import efficientnet_lite as e; print(e.default_weights_path())")

The npz holds ``logits`` (1, 1000) float32, a summary of the input batch
(``input_sum``, ``input_sum_sq``, ``input_corner``) so the test can tell a
changed preprocessing from a changed model, and ``torch_version``.
"""

from __future__ import annotations

import sys

import numpy as np


def input_summary(batch: np.ndarray) -> dict[str, np.ndarray]:
  batch = np.asarray(batch, np.float64)
  return {"input_sum": np.array(batch.sum()),
          "input_sum_sq": np.array((batch ** 2).sum()),
          "input_corner": batch[0, :4, :4, :].astype(np.float32)}


def make_batch(out: str) -> None:
  from sklearn.datasets import load_sample_image  # pylint: disable=g-import-not-at-top
  from adamix_jax.models import efficientnet_lite  # pylint: disable=g-import-not-at-top
  np.save(out, efficientnet_lite.preprocess([load_sample_image("flower.jpg")]))


def make_reference(batch_path: str, out: str, weights: str) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  import efficientnet_lite_pytorch  # pylint: disable=g-import-not-at-top
  batch = np.load(batch_path)
  model = efficientnet_lite_pytorch.EfficientNet.from_pretrained(
      "efficientnet-lite0", weights_path=weights)
  model.eval()
  with torch.no_grad():
    logits = model(torch.from_numpy(batch.transpose(0, 3, 1, 2).copy()))
  np.savez(out, logits=logits.numpy().astype(np.float32),
           torch_version=np.array(torch.__version__), **input_summary(batch))
  print(f"wrote {out}: top-5 {np.argsort(-logits.numpy()[0])[:5]}")


if __name__ == "__main__":
  if sys.argv[1:2] == ["batch"] and len(sys.argv) == 3:
    make_batch(sys.argv[2])
  elif sys.argv[1:2] == ["torch"] and len(sys.argv) == 6 and sys.argv[4] == "--weights":
    make_reference(sys.argv[2], sys.argv[3], sys.argv[5])
  else:
    sys.exit(__doc__)
