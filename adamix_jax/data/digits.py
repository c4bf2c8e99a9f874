"""scikit-learn's digits: the embedded default dataset (no download)."""

from __future__ import annotations

import numpy as np
from sklearn import datasets
from sklearn import model_selection

from adamix_jax.data import base


def load_digits(test_fraction: float = 0.3, split_seed: int = 0) -> base.ArraySource:
  """The 1797 8x8 digits as 64-d features in [0, 1], split train/test.

  The train/test split is stratified and fixed by ``split_seed`` (not by the
  run seed) so that every run and every seed is evaluated on the same test set.
  """
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
  digits = datasets.load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int64)
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
      x, y, test_size=test_fraction, random_state=split_seed, stratify=y)
  return base.ArraySource(
      name="digits",
      class_names=tuple(str(c) for c in digits.target_names),
      kind="feature",
      splits={"train": base.ArraySplit(x_train, y_train),
              "test": base.ArraySplit(x_test, y_test)})
