"""Crafted feature-space canaries, their white-box scores and the guesses.

The private stage of a linear-head experiment consumes preprocessed feature
vectors (unit L2 norm), so a canary is such a vector with a label. It is an
ordinary private example (Poisson-sampled, clipped, noised); its negative
gradient pushes the augmented head W~ along x~ (e_y - p)^T.

Design. Directions are the rows of a Haar-random orthonormal basis of the
feature space and labels are uniform; the m (direction, label) pairs are
drawn WITHOUT replacement from the d x c grid (so m <= d c). Every canary is
still a random unit vector with a uniformly random label, but two canaries'
directions x u^T (u = e_y - 1/c) are orthogonal, or nearly so when they share
a direction (cosine -1/(c-1)), so included canaries barely leak into each
other's scores. With independent random directions, m = 500 canaries in a
64-dim feature space interfere enough to hide even a noiseless mechanism.

Score (white box, from the released head only):

  score_i = x_i^T (K_T - K_ref) (e_{y_i} - 1/c),

K the kernel rows of W~ (the bias row is left out: it is shared by every
canary of a label, so it carries their collective, not individual, effect)
and K_ref a reference the auditor builds without the inclusion coins (see
``run``). Any score computed from the released model, the canaries and data
that do not depend on the coins keeps the one-run bound sound.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from adamix_jax.audit import bounds


@dataclasses.dataclass(frozen=True)
class Canaries:
  """m canaries and their secret inclusion coins (True: trained on)."""

  x: np.ndarray  # (m, d) float32, unit rows
  y: np.ndarray  # (m,) int64
  included: np.ndarray  # (m,) bool, each True with probability 1/2

  def __post_init__(self):
    m = len(self.y)
    if self.x.ndim != 2 or self.x.shape[0] != m or self.included.shape != (m,):
      raise ValueError(f"canary arrays disagree: x {self.x.shape}, y "
                       f"{self.y.shape}, included {self.included.shape}.")

  @property
  def num_canaries(self) -> int:
    return len(self.y)


def make_canaries(num_canaries: int, dim: int, num_classes: int,
                  seed: int) -> Canaries:
  """m distinct (orthonormal direction, label) pairs and fair inclusion coins.

  All of it comes from ``seed`` alone (never from the data), and the coins
  are drawn last, independently of the canaries.
  """
  if dim <= 0 or num_classes < 2:
    raise ValueError(f"need dim > 0 and num_classes >= 2; got {dim}, "
                     f"{num_classes}.")
  if not 0 < num_canaries <= dim * num_classes:
    raise ValueError(f"num_canaries must be in [1, dim * num_classes = "
                     f"{dim * num_classes}], got {num_canaries}.")
  rng = np.random.default_rng(seed)
  gaussian = rng.standard_normal((dim, dim))
  q, r = np.linalg.qr(gaussian)
  basis = (q * np.sign(np.diag(r))).T  # rows: Haar-random orthonormal basis
  pairs = rng.choice(dim * num_classes, num_canaries, replace=False)
  x = basis[pairs // num_classes]
  y = pairs % num_classes
  included = rng.random(num_canaries) < 0.5
  return Canaries(x=x.astype(np.float32), y=y.astype(np.int64),
                  included=included)


def scores(canaries: Canaries, final_matrix: np.ndarray,
           reference_matrix: np.ndarray) -> np.ndarray:
  """x_i^T (K_T - K_ref) (e_{y_i} - 1/c) for every canary, shape (m,).

  The matrices are augmented heads W~ (d+1, c); only the kernel rows count.
  """
  move = (np.asarray(final_matrix, np.float64) -
          np.asarray(reference_matrix, np.float64))[:-1]
  projected = canaries.x.astype(np.float64) @ move  # (m, c)
  own = projected[np.arange(canaries.num_canaries), canaries.y]
  return own - projected.mean(axis=1)


def guess(canary_scores: np.ndarray, included: np.ndarray,
          num_positive: int, num_negative: int) -> bounds.AuditCounts:
  """Guess "in" for the k+ highest scores, "out" for the k- lowest.

  k+ and k- are fixed before training (the bound would not hold if they
  were picked after seeing which guesses are right). Ties are broken by
  canary index, which is independent of the inclusion coins.
  """
  m = len(canary_scores)
  if num_positive < 0 or num_negative < 0 or num_positive + num_negative > m:
    raise ValueError(f"need k+, k- >= 0 and k+ + k- <= m={m}; got "
                     f"{num_positive}, {num_negative}.")
  order = np.argsort(-np.asarray(canary_scores), kind="stable")
  top = order[:num_positive]
  bottom = order[m - num_negative:]
  correct = int(np.sum(included[top]) + np.sum(~included[bottom]))
  return bounds.AuditCounts(num_canaries=m,
                            num_guesses=num_positive + num_negative,
                            num_correct=correct)
