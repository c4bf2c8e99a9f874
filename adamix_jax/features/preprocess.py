"""Feature preprocessing fitted on PUBLIC data only, then applied everywhere.

Linear heads trained with clipped, noisy gradients converge slowly on raw
embeddings, whose coordinates share a large common mean. Centering (and
optionally whitening) with statistics of the public examples improves the
conditioning for every method alike, and costs no privacy: the statistics
never see a private example (docs/design.md, invariant 3). Every mode ends with a
per-example L2 normalisation, so ||x~||^2 = ||[x, 1]||^2 = 2 for all inputs.

Modes:
  * ``none``: L2 normalisation only (also the fallback with no public data).
  * ``center``: subtract the public mean, then normalise.
  * ``whiten``: subtract the public mean, multiply by the inverse square root
    of the Ledoit-Wolf shrunk public covariance (shrinkage chosen in closed
    form from the public data, no tuning), then normalise.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from sklearn import covariance

MODES = ("none", "center", "whiten")


@dataclasses.dataclass(frozen=True)
class Preprocessor:
  mode: str
  mean: np.ndarray  # (d,)
  transform: np.ndarray | None  # (d, d) or None

  def __call__(self, x: np.ndarray) -> np.ndarray:
    # float64: squaring float32 features of magnitude 1e19 or more overflows
    # to inf, and x / inf would silently turn every row into zeros.
    x = np.asarray(x, np.float64)
    bad = ~np.all(np.isfinite(x), axis=1)
    if np.any(bad):
      raise ValueError(
          f"{int(bad.sum())} feature row(s) hold NaN or inf (rows "
          f"{np.flatnonzero(bad)[:5].tolist()}): clean or drop them.")
    x = x - self.mean
    if self.transform is not None:
      x = x @ self.transform
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    zero = norms[:, 0] == 0
    if np.any(zero):
      raise ValueError(
          f"{int(zero.sum())} feature row(s) are zero after centering (rows "
          f"{np.flatnonzero(zero)[:5].tolist()}): they carry no direction to "
          "normalise. Drop them, or use preprocess='none' for all-zero "
          "inputs.")
    return (x / norms).astype(np.float32)

  def to_arrays(self) -> dict[str, np.ndarray]:
    arrays = {"preprocess_mode": np.array(self.mode),
              "preprocess_mean": self.mean}
    if self.transform is not None:
      arrays["preprocess_transform"] = self.transform
    return arrays

  @classmethod
  def from_arrays(cls, arrays) -> "Preprocessor":
    transform = (arrays["preprocess_transform"]
                 if "preprocess_transform" in arrays else None)
    return cls(str(arrays["preprocess_mode"]), arrays["preprocess_mean"],
               transform)


def fit_preprocessor(public_x: np.ndarray, mode: str, dim: int) -> Preprocessor:
  """Fits ``mode`` on the public features (shape (n, dim), n may be 0)."""
  if mode not in MODES:
    raise ValueError(f"preprocess mode must be one of {MODES}, got {mode!r}.")
  public_x = np.asarray(public_x, np.float64).reshape(-1, dim)
  if mode == "none" or len(public_x) < 2:
    return Preprocessor("none", np.zeros(dim, np.float32), None)
  mean = public_x.mean(axis=0)
  if mode == "center":
    return Preprocessor(mode, mean.astype(np.float32), None)
  shrunk = covariance.LedoitWolf().fit(public_x).covariance_
  eigvals, eigvecs = np.linalg.eigh(shrunk)
  floor = 1e-6 * max(float(eigvals.max()), 1e-12)
  inv_sqrt = eigvecs @ np.diag(1.0 / np.sqrt(np.maximum(eigvals, floor))) @ eigvecs.T
  return Preprocessor(mode, mean.astype(np.float32), inv_sqrt.astype(np.float32))
