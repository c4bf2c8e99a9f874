"""Epsilon lower bounds from independent membership trials (Clopper-Pearson).

A trial is one canary, "in" (inserted into the private set) or "out" (never
inserted), and a score computed from what the auditor observed. If the
mechanism is (eps, delta)-DP with respect to that canary, every FIXED test
obeys both neighbouring directions (add and remove):

  "score > tau  => in":  1 - FNR <= e^eps FPR + delta,
  "score <= tau => out": 1 - FPR <= e^eps FNR + delta,

with FPR = P[score > tau | out] and FNR = P[score <= tau | in]. Hence

  eps >= log((1 - delta - FNR) / FPR)  and  eps >= log((1 - delta - FPR) / FNR).

With i.i.d. trials, the false positives among n_out out-trials are
Binomial(n_out, FPR), so a one-sided Clopper-Pearson limit at level beta/2
bounds FPR from above, and likewise FNR; with both limits (Bonferroni:
confidence 1 - beta) substituted, the right-hand sides stay valid lower
bounds on eps. This is the classic multi-run audit (Jagielski et al. 2020,
Nasr et al. 2021); ``whitebox`` makes the trials i.i.d. within ONE run.

The test (direction and tau) must not be chosen on the trials that are
counted: picking the best of thousands of thresholds on the same counts
would be a multiple-testing bias (``test_audit_power_*`` shows it breaks
soundness). ``select_test`` therefore sees only the calibration trials and
``evaluate`` only the others.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import stats

DIRECTIONS = ("high_is_in", "low_is_out")
# The level at which ``select_test`` scores thresholds: far below beta, so
# that it penalises thresholds backed by a handful of errors, whose counts
# on the calibration trials are mostly luck (the winner's curse of a max
# over ~1e5 thresholds). On simulated trials of the digits audit at
# M = 1e6 (sigma / 2, eps 1), selecting at beta = 0.05 instead gave a
# held-out bound of 1.31 on average and 0.97 at worst over 5 splits; at
# 1e-4, 1.42 and 1.36. Any level is sound: only the counted trials' limits
# (at beta) make the bound.
SELECTION_LEVEL = 1e-4


def clopper_pearson_upper(failures: np.ndarray | int, trials: int,
                          alpha: float) -> np.ndarray:
  """One-sided (1 - alpha) upper limit of a binomial rate, elementwise.

  Args:
    failures: observed counts k (0 <= k <= n).
    trials: n > 0.
    alpha: the probability that the true rate exceeds the limit.

  Returns:
    The upper limit (1.0 where k = n), as a float array.
  """
  if trials <= 0:
    raise ValueError(f"trials must be > 0, got {trials}.")
  k = np.asarray(failures, np.float64)
  safe = np.minimum(k, trials - 1)  # Beta(., 0) is undefined: k = n is 1.
  limit = stats.beta.ppf(1.0 - alpha, safe + 1.0, trials - safe)
  return np.where(k >= trials, 1.0, limit)


def _epsilon_from_rates(fpr_upper, fnr_upper, delta: float, direction: str):
  """log((1 - delta - FNR) / FPR) (or with the rates swapped); -inf where the
  numerator is not positive."""
  if direction == "high_is_in":
    numerator, denominator = 1.0 - delta - fnr_upper, fpr_upper
  else:
    numerator, denominator = 1.0 - delta - fpr_upper, fnr_upper
  with np.errstate(divide="ignore", invalid="ignore"):
    value = np.log(np.maximum(numerator, 0.0) / denominator)
  return np.where(numerator > 0, value, -np.inf)


def _error_counts(scores: np.ndarray, included: np.ndarray,
                  thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                   int, int]:
  """(false positives: out with score > tau, false negatives: in with score
  <= tau, n_out, n_in) for every tau."""
  scores = np.asarray(scores, np.float64)
  included = np.asarray(included, bool)
  outs = np.sort(scores[~included])
  ins = np.sort(scores[included])
  false_positives = len(outs) - np.searchsorted(outs, thresholds, "right")
  false_negatives = np.searchsorted(ins, thresholds, "right")
  return false_positives, false_negatives, len(outs), len(ins)


@dataclasses.dataclass(frozen=True)
class Test:
  """A fixed membership test: its direction and threshold.

  ``calibration_bound``: the bound the test reached on the calibration
  trials that chose it, at ``SELECTION_LEVEL`` (for information only).
  """

  direction: str
  threshold: float
  calibration_bound: float

  def __post_init__(self):
    if self.direction not in DIRECTIONS:
      raise ValueError(f"direction must be one of {DIRECTIONS}, got "
                       f"{self.direction!r}.")


@dataclasses.dataclass(frozen=True)
class RateBound:
  """The evaluation of one fixed test on held-out trials."""

  lower_bound: float  # eps certified with confidence 1 - beta (>= 0)
  max_certifiable: float  # the bound had the test made no error at all
  false_positives: int
  false_negatives: int
  num_out: int
  num_in: int
  fpr_upper: float
  fnr_upper: float

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def _check(delta: float, beta: float) -> None:
  if not 0.0 <= delta < 1.0:
    raise ValueError(f"delta must be in [0, 1), got {delta}.")
  if not 0.0 < beta < 1.0:
    raise ValueError(f"beta must be in (0, 1), got {beta}.")


def _check_trials(scores, included) -> None:
  if np.shape(scores) != np.shape(included) or np.ndim(scores) != 1:
    raise ValueError(f"scores {np.shape(scores)} and included "
                     f"{np.shape(included)} must be matching vectors.")
  if not np.all(np.isfinite(scores)):
    raise ValueError("scores must be finite.")
  num_in = int(np.sum(included))
  if num_in == 0 or num_in == len(included):
    raise ValueError("need both in and out trials.")


def select_test(scores: np.ndarray, included: np.ndarray, delta: float,
                level: float = SELECTION_LEVEL) -> Test:
  """The test with the best Clopper-Pearson bound on these (calibration)
  trials, over both directions and every threshold between their scores.

  Args:
    scores: (n,) calibration scores.
    included: (n,) True for in-trials.
    delta: the delta of the audited guarantee.
    level: the Clopper-Pearson level thresholds are scored at (see
      ``SELECTION_LEVEL``).

  Returns:
    The chosen ``Test``.
  """
  _check(delta, level)
  _check_trials(scores, included)
  thresholds = np.unique(np.asarray(scores, np.float64))
  fp, fn, num_out, num_in = _error_counts(scores, included, thresholds)
  fpr = clopper_pearson_upper(fp, num_out, level / 2.0)
  fnr = clopper_pearson_upper(fn, num_in, level / 2.0)
  best = None
  for direction in DIRECTIONS:
    values = _epsilon_from_rates(fpr, fnr, delta, direction)
    i = int(np.argmax(values))
    if best is None or values[i] > best.calibration_bound:
      best = Test(direction, float(thresholds[i]), float(values[i]))
  return best


def evaluate(test: Test, scores: np.ndarray, included: np.ndarray,
             delta: float, beta: float = 0.05) -> RateBound:
  """The epsilon lower bound of a FIXED test on independent trials.

  Valid with probability >= 1 - beta provided ``test`` was chosen without
  these trials (``select_test`` on a disjoint calibration set).
  """
  _check(delta, beta)
  _check_trials(scores, included)
  fp, fn, num_out, num_in = _error_counts(scores, included,
                                          np.array([test.threshold]))
  fpr = float(clopper_pearson_upper(fp, num_out, beta / 2.0)[0])
  fnr = float(clopper_pearson_upper(fn, num_in, beta / 2.0)[0])
  value = float(_epsilon_from_rates(fpr, fnr, delta, test.direction))
  ceiling = float(_epsilon_from_rates(
      clopper_pearson_upper(0, num_out, beta / 2.0),
      clopper_pearson_upper(0, num_in, beta / 2.0), delta, test.direction))
  return RateBound(lower_bound=max(0.0, value),
                   max_certifiable=max(0.0, ceiling),
                   false_positives=int(fp[0]), false_negatives=int(fn[0]),
                   num_out=num_out, num_in=num_in, fpr_upper=fpr,
                   fnr_upper=fnr)


def split_calibration(num_trials: int,
                      seed: int | np.random.SeedSequence,
                      calibration_fraction: float = 0.5) -> np.ndarray:
  """(n,) bool, True for the calibration trials: a seeded random subset of
  round(fraction * n) trials, drawn from ``seed`` alone (never from scores
  or inclusion coins, so the two halves are independent)."""
  if not 0.0 < calibration_fraction < 1.0:
    raise ValueError(f"calibration_fraction must be in (0, 1), got "
                     f"{calibration_fraction}.")
  size = int(round(calibration_fraction * num_trials))
  if not 0 < size < num_trials:
    raise ValueError(f"{num_trials} trials cannot be split "
                     f"{calibration_fraction}:{1 - calibration_fraction}.")
  calibration = np.zeros(num_trials, bool)
  calibration[np.random.default_rng(seed).choice(num_trials, size,
                                                 replace=False)] = True
  return calibration


def audit_trials(scores: np.ndarray, included: np.ndarray,
                 calibration: np.ndarray, delta: float,
                 beta: float = 0.05) -> tuple[Test, RateBound]:
  """Chooses the test on the calibration trials, bounds eps on the rest."""
  scores = np.asarray(scores, np.float64)
  included = np.asarray(included, bool)
  calibration = np.asarray(calibration, bool)
  if calibration.shape != scores.shape:
    raise ValueError("calibration must be a mask over the trials.")
  test = select_test(scores[calibration], included[calibration], delta)
  held_out = ~calibration
  return test, evaluate(test, scores[held_out], included[held_out], delta,
                        beta)
