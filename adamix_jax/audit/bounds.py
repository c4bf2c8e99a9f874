"""Epsilon lower bounds from one training run (Steinke, Nasr, Jagielski 2023).

"Privacy Auditing with One (1) Training Run", NeurIPS 2023, arXiv 2305.08846.
m canaries are each included with probability 1/2; after ONE training run the
auditor makes r guesses "in"/"out" (abstaining on the other m - r) and v of
them are right. If the mechanism is (eps, delta)-DP, then (the paper's
bound for approximate DP, as in its appendix function ``p_value_DP_audit``)

  P[V >= v] <= P[Binomial(r, q) >= v]
               + 2 m delta max_{1 <= i <= v} P[v - i <= Binomial(r, q) < v] / i,

with q = e^eps / (1 + e^eps), the accuracy of eps-DP randomised response.
Rejecting "(eps, delta)-DP" when this p-value is <= beta gives the lower
bound: the largest eps whose p-value is still <= beta. It holds with
probability >= 1 - beta over the run, for ANY guessing rule that is a
function of the released output and the canaries, provided the number of
guesses is not chosen after looking at their correctness.

Limit: with all r guesses right the p-value is about q^r, so the largest
certifiable epsilon is about log(r / log(1 / beta)): a few hundred canaries
can never certify epsilon 8. The bound is a test of the implementation, not
an estimate of the true epsilon.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import optimize
from scipy import stats

MAX_EPSILON = 50.0


@dataclasses.dataclass(frozen=True)
class AuditCounts:
  """What one audit observed: m canaries, r guesses, v of them correct."""

  num_canaries: int  # m
  num_guesses: int  # r
  num_correct: int  # v

  def __post_init__(self):
    m, r, v = self.num_canaries, self.num_guesses, self.num_correct
    if not 0 <= v <= r <= m:
      raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}.")


def _check(eps: float, delta: float) -> None:
  if not eps >= 0:
    raise ValueError(f"eps must be >= 0, got {eps}.")
  if not 0.0 <= delta <= 1.0:
    raise ValueError(f"delta must be in [0, 1], got {delta}.")


def p_value(counts: AuditCounts, eps: float, delta: float) -> float:
  """P[>= v correct guesses] under the null "the mechanism is (eps, delta)-DP".

  Small values reject the null. With delta = 0 it is the binomial tail.
  """
  _check(eps, delta)
  m, r, v = counts.num_canaries, counts.num_guesses, counts.num_correct
  # expit, not e^eps / (1 + e^eps): no overflow at large eps.
  q = float(1.0 / (1.0 + math.exp(-eps))) if eps < 700 else 1.0
  tail = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
  correction = 0.0
  if delta > 0 and v > 0:
    # max_i P[v - i <= B < v] / i for i = 1..v: cumulative pmf from v - 1
    # downwards, only over the binomial's bulk [low, v - 1] (thousands of
    # terms instead of v, for the white-box audit's 1e5+ guesses). Every
    # longer window holds at most P[B < v] and has i > v - low, so
    # P[B < v] / (v - low + 1) bounds the ones left out: the correction
    # can only be over-, never under-estimated.
    spread = math.sqrt(r * q * (1.0 - q))
    low = max(0, int(math.floor(r * q - 40.0 * spread - 10.0)))
    low = min(low, v - 1)
    pmf = stats.binom.pmf(np.arange(v - 1, low - 1, -1), r, q)
    windows = np.cumsum(pmf)
    correction = float(np.max(windows / np.arange(1, len(pmf) + 1)))
    if low > 0:
      correction = max(correction,
                       float(stats.binom.cdf(v - 1, r, q)) / (len(pmf) + 1))
  return min(1.0, tail + 2.0 * m * delta * correction)


def epsilon_lower_bound(counts: AuditCounts, delta: float,
                        beta: float = 0.05, tol: float = 1e-6) -> float:
  """Largest eps with p_value(eps) <= beta (0 when even eps = 0 fits).

  The mechanism is NOT (eps', delta)-DP for any eps' below the result, with
  confidence 1 - beta. Found by bracketing, then Brent's method on the
  monotone p-value.
  """
  if not 0.0 < beta < 1.0:
    raise ValueError(f"beta must be in (0, 1), got {beta}.")
  _check(0.0, delta)
  gap = lambda eps: p_value(counts, eps, delta) - beta
  if gap(0.0) > 0:
    return 0.0
  upper = 1.0
  while gap(upper) <= 0:
    upper *= 2.0
    if upper > MAX_EPSILON:
      return MAX_EPSILON
  # A root of gap is the boundary; the p-value at the returned point must
  # be <= beta (the side that is sound), so step back onto it if needed.
  eps = optimize.brentq(gap, upper / 2.0 if upper > 1.0 else 0.0, upper,
                        xtol=tol)
  while eps > 0 and gap(eps) > 0:
    eps = max(0.0, eps - tol)
  return float(eps)


def max_certifiable_epsilon(num_canaries: int, num_guesses: int, delta: float,
                            beta: float = 0.05) -> float:
  """The bound if all r guesses were right: the audit's ceiling."""
  return epsilon_lower_bound(
      AuditCounts(num_canaries, num_guesses, num_guesses), delta, beta)
