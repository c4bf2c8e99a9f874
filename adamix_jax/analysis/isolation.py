"""How isolated each example is in feature space, from features only.

The paper's argument (Golatkar et al. 2022, Sec. 4): the examples that pay
most for privacy are the isolated ones in representation space, and those
are also the ones whose accuracy suffers; public examples make fewer private
examples isolated. Two measures, both Euclidean distances between the
feature vectors the linear head sees (after preprocessing):

* ``nearest_public_distance``: distance to the nearest PUBLIC example of the
  example's own class. A class with no public example (zero-shot, or a class
  the public split missed) gives ``inf``: no public neighbour at all, the
  most isolated an example can be. ``quantile_bins`` ranks inf last; the
  figures draw such points at the right edge and say how many.
* ``knn_distance``: mean distance to the k nearest PRIVATE examples (k = 5;
  an example is never its own neighbour, duplicates of it are). Fewer than
  k candidates: the mean over those there are; none: inf.

Larger means more isolated for both. Neither uses labels of other classes,
parameters or test data, so the measures of the test examples (used to bin
the test error) are computed the same way, with the test label for the
first and the private set as the reference for the second.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

DEFAULT_K = 5
_CHUNK = 2048


def _pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Euclidean distances (len(a), len(b)), in float64."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  squared = (np.sum(a * a, axis=1)[:, None] + np.sum(b * b, axis=1)[None, :] -
             2.0 * a @ b.T)
  return np.sqrt(np.maximum(squared, 0.0))


def _check_rows(x: np.ndarray, y: np.ndarray, name: str) -> None:
  if x.ndim != 2 or y.shape != (x.shape[0],):
    raise ValueError(f"{name}: features must be (N, d) and labels (N,), got "
                     f"{x.shape} and {y.shape}.")


def nearest_public_distance(x: np.ndarray, y: np.ndarray,
                            public_x: np.ndarray,
                            public_y: np.ndarray) -> np.ndarray:
  """Distance from each example to the nearest public example of its class.

  Args:
    x, y: (N, d) features and (N,) labels of the examples to measure.
    public_x, public_y: the public set.

  Returns:
    (N,) float64 distances; ``inf`` where the class has no public example.
  """
  x, y = np.asarray(x), np.asarray(y)
  public_x, public_y = np.asarray(public_x), np.asarray(public_y)
  _check_rows(x, y, "examples")
  _check_rows(public_x, public_y, "public set")
  result = np.full(len(y), np.inf)
  for label in np.unique(y):
    rows = np.flatnonzero(y == label)
    reference = public_x[public_y == label]
    if not len(reference):
      continue
    for start in range(0, len(rows), _CHUNK):
      chunk = rows[start:start + _CHUNK]
      result[chunk] = _pairwise_distances(x[chunk], reference).min(axis=1)
  return result


def knn_distance(x: np.ndarray, reference: np.ndarray, k: int = DEFAULT_K,
                 exclude_self: bool = False) -> np.ndarray:
  """Mean distance from each row of ``x`` to its k nearest ``reference`` rows.

  Args:
    x: (N, d) examples to measure.
    reference: (M, d) candidates (the private set).
    k: neighbours averaged.
    exclude_self: ``x`` IS ``reference`` (same rows, same order): row i is
      not its own neighbour (by index: an exact duplicate still counts).

  Returns:
    (N,) float64; inf where there is no candidate.
  """
  x, reference = np.asarray(x), np.asarray(reference)
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}.")
  if exclude_self and x.shape != reference.shape:
    raise ValueError("exclude_self needs x to be the reference set itself.")
  available = reference.shape[0] - (1 if exclude_self else 0)
  result = np.full(x.shape[0], np.inf)
  if available <= 0:
    return result
  take = min(k, available)
  for start in range(0, x.shape[0], _CHUNK):
    stop = min(start + _CHUNK, x.shape[0])
    distances = _pairwise_distances(x[start:stop], reference)
    if exclude_self:
      distances[np.arange(stop - start), np.arange(start, stop)] = np.inf
    nearest = np.partition(distances, take - 1, axis=1)[:, :take]
    result[start:stop] = nearest.mean(axis=1)
  return result


@dataclasses.dataclass(frozen=True)
class IsolationMeasures:
  """Both measures for one set of examples, (N,) each."""

  nearest_public: np.ndarray
  knn_private: np.ndarray

  def as_dict(self) -> dict[str, np.ndarray]:
    return {"nearest_public": self.nearest_public,
            "knn_private": self.knn_private}


MEASURES = ("nearest_public", "knn_private")
MEASURE_LABELS = {
    "nearest_public": "distance to the nearest public example of its class",
    "knn_private": f"mean distance to the {DEFAULT_K} nearest private examples",
}


def private_isolation(private_x: np.ndarray, private_y: np.ndarray,
                      public_x: np.ndarray, public_y: np.ndarray,
                      k: int = DEFAULT_K) -> IsolationMeasures:
  """Both measures for the private examples themselves."""
  return IsolationMeasures(
      nearest_public=nearest_public_distance(private_x, private_y, public_x,
                                             public_y),
      knn_private=knn_distance(private_x, private_x, k, exclude_self=True))


def isolation_of_test_examples(test_x: np.ndarray, test_y: np.ndarray,
                               private_x: np.ndarray, public_x: np.ndarray,
                               public_y: np.ndarray, k: int = DEFAULT_K
                               ) -> IsolationMeasures:
  """Both measures for test examples, computed as for the private ones."""
  return IsolationMeasures(
      nearest_public=nearest_public_distance(test_x, test_y, public_x,
                                             public_y),
      knn_private=knn_distance(test_x, private_x, k))


def quantile_bins(values: np.ndarray, num_bins: int = 5) -> np.ndarray:
  """Bin 0..num_bins-1 of each value by rank: equal-count bins (sizes
  differ by at most one), ties broken by position, inf (and NaN) last."""
  values = np.asarray(values, np.float64)
  if num_bins < 1:
    raise ValueError(f"num_bins must be >= 1, got {num_bins}.")
  order = np.argsort(np.where(np.isnan(values), np.inf, values),
                     kind="stable")
  ranks = np.empty(len(values), np.int64)
  ranks[order] = np.arange(len(values))
  return (ranks * num_bins) // max(len(values), 1)


@dataclasses.dataclass(frozen=True)
class QuantileErrors:
  """Error rate per isolation quantile (bin 0: least isolated).

  error: (num_bins,) fraction misclassified; count: examples per bin;
  upper_edge: the largest isolation value in each bin.
  """

  error: np.ndarray
  count: np.ndarray
  upper_edge: np.ndarray


def error_by_isolation_quantile(isolation: np.ndarray, correct: np.ndarray,
                                num_bins: int = 5,
                                bins: Optional[np.ndarray] = None
                                ) -> QuantileErrors:
  """Error rate of the examples in each isolation quantile.

  Args:
    isolation: (N,) an isolation measure.
    correct: (N,) bool, classified correctly.
    num_bins: quantiles (5: quintiles).
    bins: precomputed ``quantile_bins(isolation, num_bins)`` (the same bins
      for every method).
  """
  isolation = np.asarray(isolation, np.float64)
  correct = np.asarray(correct, bool)
  if correct.shape != isolation.shape:
    raise ValueError("isolation and correct must have the same shape.")
  if bins is None:
    bins = quantile_bins(isolation, num_bins)
  error = np.full(num_bins, np.nan)
  count = np.zeros(num_bins, np.int64)
  upper = np.full(num_bins, np.nan)
  for b in range(num_bins):
    members = bins == b
    count[b] = members.sum()
    if count[b]:
      error[b] = 1.0 - correct[members].mean()
      upper[b] = isolation[members].max()
  return QuantileErrors(error=error, count=count, upper_edge=upper)
