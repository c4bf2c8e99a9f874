"""Checks of training inputs, shared by every entry point (the launcher, the
library trainers, the Flax API): one clear error naming the problem and the
fix, before any work is done and before anything is written.

Why here and not only in the launcher: a library call that trains on 600
labels and 595 feature rows would gather out-of-range rows (JAX clamps the
index), so one example could enter a batch several times with different
labels and move the released sum by more than its bound.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np

from adamix_jax.data.base import check_finite
from adamix_jax.data.base import check_labels

PyTree = Any


def check_rows(x, where: str, *, allow_empty: bool = False) -> np.ndarray:
  """A finite float array with a leading example axis, as float32."""
  x = np.asarray(x)
  if x.ndim < 1:
    raise ValueError(f"{where}: expected an array of examples (leading axis "
                     f"= examples), got a scalar of shape {x.shape}.")
  if x.shape[0] == 0 and not allow_empty:
    raise ValueError(f"{where}: no examples (leading axis of size 0).")
  if not (np.issubdtype(x.dtype, np.floating) or
          np.issubdtype(x.dtype, np.integer) or x.dtype == bool):
    raise ValueError(f"{where}: expected numbers, got dtype {x.dtype}.")
  check_finite(x.astype(np.float64) if x.dtype == np.float16 else x, where)
  x32 = x.astype(np.float32)
  if not np.all(np.isfinite(x32)):
    bad = np.flatnonzero(~np.all(np.isfinite(x32.reshape(len(x32), -1)),
                                 axis=1))
    raise ValueError(f"{where}: {len(bad)} example(s) overflow float32 "
                     f"(|value| > 3.4e38; first rows: {bad[:5].tolist()}). "
                     "Rescale the inputs.")
  return x32


def check_same_length(where: str, **arrays) -> int:
  """All arrays have the same number of examples; returns it."""
  lengths = {name: len(np.asarray(a)) for name, a in arrays.items()}
  if len(set(lengths.values())) > 1:
    described = ", ".join(f"{k}: {v}" for k, v in lengths.items())
    raise ValueError(f"{where}: the arrays must have one row per example, "
                     f"but their lengths differ ({described}).")
  return next(iter(lengths.values()))


def check_params(params: PyTree, where: str) -> None:
  """Every leaf of a parameter tree is finite."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    leaf = np.asarray(leaf)
    if np.issubdtype(leaf.dtype, np.floating) and not np.all(
        np.isfinite(leaf)):
      raise ValueError(f"{where}: parameter {jax.tree_util.keystr(path)} "
                       "holds NaN or inf.")


def check_labeled_set(x, y, num_classes: int, where: str, *,
                      allow_empty: bool = False,
                      dim: Optional[int] = None
                      ) -> tuple[np.ndarray, np.ndarray]:
  """(features float32, labels int64) of one labelled set, validated."""
  x = np.asarray(x)
  y = np.asarray(y)
  if allow_empty and x.size == 0 and y.size == 0:
    return (np.zeros((0,) + ((dim,) if dim else x.shape[1:]), np.float32),
            np.zeros((0,), np.int64))
  check_same_length(where, features=x, labels=y)
  x = check_rows(x, f"{where} features", allow_empty=allow_empty)
  if dim is not None and x.shape[1:] != (dim,):
    raise ValueError(f"{where} features: expected shape (n, {dim}), got "
                     f"{x.shape}.")
  y = check_labels(y, num_classes, f"{where} labels")
  return x, y


def check_linear_head_inputs(private_x, private_y, public_x, public_y,
                             anchor_params: dict,
                             fallback_basis: Optional[Any] = None):
  """The inputs of a private linear-head run, validated and converted.

  Returns:
    (private_x (N, d) float32, private_y (N,) int64, public_x (n, d)
    float32, public_y (n,) int64).
  """
  kernel = np.asarray(anchor_params.get("kernel") if isinstance(
      anchor_params, dict) else None)
  if kernel.ndim != 2 or "bias" not in anchor_params:
    raise ValueError("anchor_params must be {'kernel': (d, c), 'bias': (c,)}"
                     f", got {type(anchor_params).__name__}.")
  dim, num_classes = kernel.shape
  if np.shape(anchor_params["bias"]) != (num_classes,):
    raise ValueError(f"anchor_params: bias has shape "
                     f"{np.shape(anchor_params['bias'])}, expected "
                     f"({num_classes},) for a ({dim}, {num_classes}) kernel.")
  check_params(anchor_params, "anchor_params")
  private_x, private_y = check_labeled_set(
      private_x, private_y, num_classes, "private set", dim=dim)
  public_x, public_y = check_labeled_set(
      np.asarray(public_x).reshape((-1, dim)) if np.size(public_x) == 0
      else public_x, public_y, num_classes, "public set", allow_empty=True,
      dim=dim)
  if fallback_basis is not None:
    basis = check_rows(fallback_basis, "fallback_basis")
    if basis.ndim != 2 or basis.shape[0] != dim + 1:
      raise ValueError(f"fallback_basis: expected shape ({dim + 1}, r), got "
                       f"{basis.shape}.")
  return private_x, private_y, public_x, public_y
