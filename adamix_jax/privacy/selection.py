"""Private model selection on a disjoint validation part (invariant 7).

The invariant (docs/design.md, invariant 7, "disjoint parts compose in
parallel"):

* **The split.** Each private record goes to the validation part with
  probability ``fraction`` by its OWN coin, drawn from the run's secret
  coins (``MechanismCoins.selection_seed``) before any private value is
  read. The training run sees only the training part; the selection sees
  only the validation part. A resumed run reuses the checkpoint's coins, so
  a record never changes part between attempts.
* **The selection.** Report-noisy-max: Gumbel noise of scale 1 / epsilon
  added to the NEGATED validation error counts of the candidates, argmax
  released (the counts are never written anywhere). Argmax(u + Gumbel(1/eps))
  is a draw from the exponential mechanism P(j) ~ exp(eps u_j). Adding or
  removing one validation record moves every count by 0 or +1 (or every one
  by 0 or -1): the utility is monotone with sensitivity 1, so exp(eps u) is
  epsilon-DP (McSherry & Talwar 2007; Dwork & Roth 2014, Theorem 3.10 and
  the remark after it). The candidates depend on the training part only.
* **The composition.** A record is in exactly one part, so the pair
  (training release, selected index) is (max(eps_train, eps_select),
  delta_train)-DP (parallel composition; adaptive, since the candidates
  come from the training part, which a validation record does not touch).
  ``PrivacyLedger.record_parallel`` records the selection and
  ``PrivacyLedger.epsilon()`` returns that maximum.

Candidates are post-processing of ONE private run: the path
w_0 + t (w - w_0) for t in ``path`` (t = 0 is the public start, free).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

from adamix_jax.privacy import accounting
from adamix_jax.privacy import randomness

MECHANISM = "report_noisy_max"


def validation_mask(num_private: int, fraction: float,
                    coins: randomness.MechanismCoins) -> np.ndarray:
  """Per-record coins: True where a record belongs to the validation part.

  Record i's coin is the i-th draw of the selection stream, so it does not
  depend on any other record (or on how many there are).
  """
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"the validation fraction must be in (0, 1), got "
                     f"{fraction}; 0 switches private selection off.")
  rng = np.random.default_rng(coins.selection_seed)
  mask = rng.random(int(num_private)) < fraction
  if mask.all() or not mask.any():
    raise ValueError(
        f"the per-record coins put {int(mask.sum())} of {num_private} private "
        "records in the validation part: one part is empty. Use more private "
        "records or a validation fraction nearer 0.5.")
  return mask


def path_candidates(start: dict, trained: dict,
                    path: Sequence[float]) -> list[dict]:
  """w_0 + t (w - w_0) for each t: post-processing of one release."""
  return [{k: np.asarray(start[k]) + float(t) * (np.asarray(trained[k]) -
                                                 np.asarray(start[k]))
           for k in trained} for t in path]


def report_noisy_max(error_counts: Sequence[int], epsilon: float,
                     rng: np.random.Generator) -> int:
  """The index of argmax_j(-count_j + Gumbel(1 / epsilon)): epsilon-DP for
  monotone counts of sensitivity 1 (see the module docstring)."""
  counts = np.asarray(error_counts, np.float64)
  if counts.ndim != 1 or len(counts) < 1:
    raise ValueError("need a 1-D list of at least one error count.")
  if not math.isfinite(epsilon) or epsilon <= 0:
    raise ValueError(f"the selection's epsilon must be > 0, got {epsilon}.")
  noise = rng.gumbel(loc=0.0, scale=1.0 / epsilon, size=len(counts))
  return int(np.argmax(-counts + noise))


def select_on_validation(candidates: Sequence[Any],
                         error_count: Callable[[Any], int], epsilon: float,
                         coins: randomness.MechanismCoins,
                         ledger: accounting.PrivacyLedger,
                         num_validation: int) -> int:
  """Chooses one candidate by report-noisy-max at ``epsilon`` on the
  validation part and records the release in ``ledger`` (as a parallel
  release: the validation records are disjoint from the training ones).

  ``error_count(candidate)`` must read the validation part only. Refuses
  (BudgetExceededError) when ``epsilon`` exceeds the ledger's target.
  """
  ledger.check_parallel(MECHANISM, epsilon)
  counts = [int(error_count(c)) for c in candidates]
  # A stream of its own, apart from the split's (the first draws of
  # selection_seed): a fresh Generator on a spawned child sequence.
  rng = np.random.default_rng(
      np.random.SeedSequence(coins.selection_seed).spawn(1)[0])
  index = report_noisy_max(counts, epsilon, rng)
  ledger.record_parallel(MECHANISM, epsilon, num_validation)
  return index
