"""Precomputed features in a ``.npz`` file (bring your own embeddings)."""

from __future__ import annotations

import os
import pathlib

import numpy as np

from adamix_jax.data import base

REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")


def load_npz_features(path: str | os.PathLike[str],
                      name: str | None = None) -> base.ArraySource:
  """Loads ``x_train, y_train, x_test, y_test`` (and ``class_names``) features.

  Args:
    path: a ``.npz`` written by ``np.savez`` with 2-D float features
      ``x_*`` of shape ``(N, D)`` and integer labels ``y_*`` of shape
      ``(N,)``; optionally ``class_names``, a string array (save it as
      ``np.array(names, dtype=str)``: object arrays are refused because
      loading them would unpickle).
    name: the source's name; defaults to the file name without ``.npz``.

  Returns:
    An ArraySource of kind "feature" with float32 items and splits "train"
    and "test". Without ``class_names`` the classes are 0..max label.

  Raises:
    FileNotFoundError: no such file.
    ValueError: missing keys, non-2-D or mismatched features, NaN/inf,
      label count mismatch, or labels out of range.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"No features file at {path}.")
  where = str(path)
  with np.load(path, allow_pickle=False) as npz:
    missing = [key for key in REQUIRED_KEYS if key not in npz.files]
    if missing:
      raise ValueError(
          f"{where}: missing key(s) {missing}; it has {sorted(npz.files)}. "
          "Save it with np.savez(path, x_train=..., y_train=..., "
          "x_test=..., y_test=..., class_names=... (optional)).")
    try:
      arrays = {key: npz[key] for key in REQUIRED_KEYS}
      class_names = npz["class_names"] if "class_names" in npz.files else None
    except ValueError as error:  # Object arrays need pickle: refused.
      raise ValueError(
          f"{where}: holds an object array ({error}). Save strings as "
          "np.array(names, dtype=str) and numbers as numeric arrays."
      ) from error

  for split in ("train", "test"):
    x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
    if x.ndim != 2:
      raise ValueError(f"{where}: x_{split} must be 2-D (examples, features), "
                       f"got shape {x.shape}.")
    if not (np.issubdtype(x.dtype, np.floating)
            or np.issubdtype(x.dtype, np.integer)):
      raise ValueError(f"{where}: x_{split} must be numeric, got {x.dtype}.")
    if len(x) == 0:
      raise ValueError(f"{where}: x_{split} has no examples.")
    if y.ndim != 1 or len(y) != len(x):
      raise ValueError(
          f"{where}: label count mismatch: x_{split} has {len(x)} rows but "
          f"y_{split} has shape {y.shape}; pass exactly one label per row.")
    base.check_finite(x, f"{where}: x_{split}")
  if arrays["x_train"].shape[1] != arrays["x_test"].shape[1]:
    raise ValueError(
        f"{where}: feature dimensions differ: x_train has "
        f"{arrays['x_train'].shape[1]}, x_test has "
        f"{arrays['x_test'].shape[1]}.")

  if class_names is not None:
    class_names = np.asarray(class_names).reshape(-1).tolist()
    num_classes = len(class_names)
  else:
    # Validate first (integers, none negative) so that max() means something.
    all_labels = base.check_labels(
        np.concatenate([arrays["y_train"], arrays["y_test"]]),
        np.iinfo(np.int64).max, f"{where}: y_train/y_test")
    num_classes = 1 + int(all_labels.max())
  splits = {}
  for split in ("train", "test"):
    labels = base.check_labels(arrays[f"y_{split}"], num_classes,
                               f"{where}: y_{split}")
    splits[split] = base.ArraySplit(
        arrays[f"x_{split}"].astype(np.float32), labels)
  return base.ArraySource(
      name=name if name is not None else path.stem,
      class_names=base.class_names_or_default(class_names, num_classes),
      kind="feature",
      splits=splits)
