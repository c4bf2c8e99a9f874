"""Privacy accounting with ``dp_accounting``: PLD by default, RDP to cross-check.

The mechanism is the Poisson-subsampled Gaussian (rate q, noise multiplier
sigma) composed T times under add/remove-one neighbouring; q = 1 is full
batch noisy gradient descent (a plain Gaussian composed T times). Full
batch under PLD is computed exactly, without discretisation: T Gaussian
releases of sensitivity 1 at sigma_i compose to ONE Gaussian release at
(sum_i T_i / sigma_i^2)^(-1/2) (each privacy loss is Gaussian, means and
variances add), whose epsilon is the analytic Gaussian mechanism's (Balle
& Wang 2018; dp_accounting's ``GaussianPrivacyLoss``): the limit the
discretised PLD approaches from above, and ~1000x cheaper (a discretised
Gaussian PLD costs ~0.4 s, and every noise calibration needs ~10). The
``PrivacyLedger`` records the steps that actually ran and is the source of
truth for epsilon (docs/design.md, invariant 5).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from typing import Any

import dp_accounting
from dp_accounting import pld
from dp_accounting import rdp
from scipy import optimize

from adamix_jax import io

ACCOUNTANTS = ("pld", "rdp")
MAX_CALIBRATION_EPSILON = 100.0


class BudgetExceededError(RuntimeError):
  """A step (or a planned run) would spend more than the target epsilon."""


def _check_delta(delta: float) -> None:
  if not 0.0 < delta < 1.0:
    raise ValueError(f"delta must be in (0, 1), got {delta}.")


def _check_accountant(accountant: str) -> None:
  if accountant not in ACCOUNTANTS:
    raise ValueError(f"Unknown accountant {accountant!r}; use one of "
                     f"{ACCOUNTANTS}.")


def dp_sgd_event(noise_multiplier: float, sampling_rate: float,
                 steps: int) -> dp_accounting.DpEvent:
  """The DpEvent of T steps of Poisson-sampled (or full-batch) Gaussian noise."""
  # `not >= 0` also rejects NaN, which RDP would otherwise account as eps = 0.
  if not noise_multiplier >= 0:
    raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}.")
  if not 0.0 < sampling_rate <= 1.0:
    raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}.")
  if steps < 0:
    raise ValueError(f"steps must be >= 0, got {steps}.")
  gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
  if sampling_rate < 1.0:
    gaussian = dp_accounting.PoissonSampledDpEvent(sampling_rate, gaussian)
  return dp_accounting.SelfComposedDpEvent(gaussian, steps)


def make_accountant(accountant: str = "pld") -> dp_accounting.PrivacyAccountant:
  _check_accountant(accountant)
  if accountant == "pld":
    return pld.PLDAccountant()
  return rdp.RdpAccountant()


def epsilon_for_event(event: dp_accounting.DpEvent, delta: float,
                      accountant: str = "pld") -> float:
  _check_delta(delta)
  acc = make_accountant(accountant)
  acc.compose(event)
  return float(acc.get_epsilon(delta))


def _gaussian_delta(sigma: float, epsilon: float) -> float:
  """delta(epsilon) of one Gaussian release, sensitivity 1 (exact)."""
  loss = pld.privacy_loss_mechanism.GaussianPrivacyLoss(sigma)
  return float(loss.get_delta_for_epsilon(epsilon))


@functools.lru_cache(maxsize=4096)
def gaussian_epsilon(sigma: float, delta: float) -> float:
  """The tight epsilon at ``delta`` of ONE Gaussian release of std ``sigma``
  (sensitivity 1), rounded up: ``_gaussian_delta(sigma, eps) <= delta``."""
  _check_delta(delta)
  if not sigma > 0:
    raise ValueError(f"sigma must be > 0, got {sigma}.")
  if _gaussian_delta(sigma, 0.0) <= delta:
    return 0.0
  upper = 1.0
  while _gaussian_delta(sigma, upper) > delta:
    upper *= 2.0
  eps = optimize.brentq(lambda e: _gaussian_delta(sigma, e) - delta,
                        upper / 2.0 if upper > 1.0 else 0.0, upper,
                        xtol=1e-12, rtol=1e-12)
  # brentq's root may sit a rounding error below the true one: step up
  # until the guarantee provably holds (errs on the private side).
  while _gaussian_delta(sigma, eps) > delta:
    eps = eps * (1.0 + 1e-9) + 1e-12
  return float(eps)


def full_batch_sigma(entries) -> float:
  """The one Gaussian release that full-batch steps compose to exactly:
  (sum_i T_i / sigma_i^2)^(-1/2) over (sigma_i, q_i = 1, T_i) entries."""
  # Steps at the same sigma are summed first (integers, exact), so a run
  # split by a resume gets the very float an uninterrupted run gets.
  steps_at: dict[float, int] = {}
  for sigma, q, steps in entries:
    if q != 1.0:
      raise ValueError(f"full_batch_sigma needs q = 1 entries, got q={q}.")
    steps_at[float(sigma)] = steps_at.get(float(sigma), 0) + int(steps)
  precision = sum(steps / sigma**2 for sigma, steps in steps_at.items())
  return math.inf if precision == 0 else precision**-0.5


@functools.lru_cache(maxsize=4096)
def segments_epsilon(segments: tuple[tuple[float, float, int], ...],
                     delta: float, accountant: str = "pld") -> float:
  """Epsilon at ``delta`` of (sigma, q, T) segments of steps composed in
  order: the one place that accounts steps (``compute_epsilon`` and the
  ledger both call it). Empty segments cost nothing; sigma = 0 is inf.
  Under PLD, full-batch segments use the exact closed form; anything else
  goes to dp_accounting."""
  for segment in segments:
    _check_entry(*segment)
  segments = tuple((float(s), float(q), int(t)) for s, q, t in segments
                   if t > 0)
  if not segments:
    return 0.0
  if any(s == 0 for s, _, _ in segments):
    return math.inf
  if accountant == "pld" and all(q == 1.0 for _, q, _ in segments):
    _check_delta(delta)
    return gaussian_epsilon(full_batch_sigma(segments), delta)
  events = [dp_sgd_event(*segment) for segment in segments]
  event = events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(
      events)
  return epsilon_for_event(event, delta, accountant)


def compute_epsilon(noise_multiplier: float, sampling_rate: float, steps: int,
                    delta: float, accountant: str = "pld") -> float:
  """Epsilon at ``delta`` after ``steps`` steps (inf when sigma = 0)."""
  return segments_epsilon(((noise_multiplier, sampling_rate, steps),), delta,
                          accountant)


@functools.lru_cache(maxsize=1024)
def calibrate_noise_multiplier(target_epsilon: float, delta: float,
                               sampling_rate: float, steps: int,
                               accountant: str = "pld") -> float:
  """Smallest sigma (to ~0.1%) whose epsilon after ``steps`` is <= target.

  The result errs on the private side: its epsilon is at most the target.
  """
  if not target_epsilon > 0:  # also NaN
    raise ValueError(
        f"target epsilon must be > 0, got {target_epsilon}: epsilon 0 would "
        "need infinite noise. Use a positive budget such as 1.0.")
  if not target_epsilon <= MAX_CALIBRATION_EPSILON:
    raise ValueError(
        f"target epsilon must be at most {MAX_CALIBRATION_EPSILON:g}, got "
        f"{target_epsilon}. Larger targets need almost no noise and make the "
        "PLD accountant discretise an enormous loss range (memory blow-up); "
        "run a non-private method instead.")
  _check_delta(delta)
  if steps <= 0:
    raise ValueError(f"steps must be > 0 to calibrate noise, got {steps}.")
  def epsilon_at(sigma, name):
    return compute_epsilon(sigma, sampling_rate, steps, delta, name)

  if accountant == "pld" and sampling_rate == 1.0:
    # Full batch: T releases at sigma are one at sigma / sqrt(T) (exactly),
    # so sigma_T = sigma_1 sqrt(T), sigma_1 the single release's
    # (dp_accounting's search for the Gaussian mechanism), re-checked on
    # the ledger's own arithmetic.
    gaussian = pld.privacy_loss_mechanism.GaussianPrivacyLoss
    guarantee = pld.common.DifferentialPrivacyParameters(
        float(target_epsilon), float(delta))
    sigma = gaussian.from_privacy_guarantee(guarantee).standard_deviation * (
        math.sqrt(steps))
    while epsilon_at(sigma, accountant) > target_epsilon:
      sigma *= 1.0 + 1e-8
    return sigma

  # Bracket with RDP first: it is cheap at any sigma, while PLD at a tiny
  # sigma discretises a huge loss range. RDP's epsilon upper-bounds the
  # tight one, so the sigma meeting the target under RDP is feasible.
  # RDP warns about orders it drops at small sigma; those orders only make
  # the bracket looser, never unsafe (PLD decides the final value).
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    upper = 1.0
    while epsilon_at(upper, "rdp") > target_epsilon:
      upper *= 2.0
    while upper > 1e-2 and epsilon_at(upper / 2.0, "rdp") <= target_epsilon:
      upper /= 2.0
  finally:
    absl_logger.setLevel(level)
  lower = upper / 2.0
  while epsilon_at(lower, accountant) <= target_epsilon:
    upper, lower = lower, lower / 2.0
    if lower < 1e-3:
      raise ValueError(f"target epsilon {target_epsilon} needs almost no noise "
                       f"(sigma < 1e-3) for q={sampling_rate}, T={steps}.")
  sigma = dp_accounting.calibrate_dp_mechanism(
      lambda: make_accountant(accountant),
      lambda s: dp_sgd_event(s, sampling_rate, steps),
      target_epsilon, delta,
      bracket_interval=dp_accounting.ExplicitBracketInterval(lower, upper),
      tol=1e-3 * lower)
  sigma = float(sigma)
  # calibrate_dp_mechanism returns a feasible endpoint; re-check to be exact.
  while epsilon_at(sigma, accountant) > target_epsilon:
    sigma *= 1.001
  return sigma


def _check_entry(noise_multiplier: float, sampling_rate: float,
                 steps: int) -> None:
  """Rejects a ledger entry that no step could have produced.

  Negative steps would silently shrink the recorded spend when merged into
  the previous entry; a NaN sigma would be accounted as epsilon 0 by RDP.
  """
  if isinstance(steps, bool) or not steps >= 0 or int(steps) != steps:
    raise ValueError(f"steps must be a non-negative integer, got {steps!r}.")
  dp_sgd_event(noise_multiplier, sampling_rate, int(steps))  # checks sigma, q


@dataclasses.dataclass
class LedgerEntry:
  """``steps`` consecutive steps with the same (sigma, q)."""

  noise_multiplier: float
  sampling_rate: float
  steps: int


@dataclasses.dataclass
class ParallelRelease:
  """A pure epsilon-DP release on records DISJOINT from the ledger's steps
  (a private selection on its validation part, ``privacy.selection``): it
  composes in parallel with them (invariant 7)."""

  mechanism: str
  epsilon: float
  records: int


def _check_parallel(mechanism: str, epsilon: float, records: int) -> None:
  if not isinstance(mechanism, str) or not mechanism:
    raise ValueError("a parallel release needs a mechanism name.")
  if (isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or
      not math.isfinite(epsilon) or epsilon <= 0):
    raise ValueError(f"a parallel release's epsilon must be a finite number "
                     f"> 0, got {epsilon!r}.")
  if isinstance(records, bool) or int(records) != records or records < 1:
    raise ValueError(f"a parallel release needs >= 1 record, got {records!r}.")


@dataclasses.dataclass
class PrivacyLedger:
  """The steps actually taken, and the epsilon they cost.

  Example::

    ledger = PrivacyLedger(delta=1e-5, target_epsilon=3.0)
    ledger.approve(sigma, q, planned_steps)        # refuse before starting
    for _ in range(planned_steps):
      ledger.check_step(sigma, q)                  # the guard before each step
      ...; ledger.record(sigma, q)                 # after its noisy update
    ledger.epsilon()                               # PLD; ledger.epsilon(accountant="rdp")
    ledger.save(path); PrivacyLedger.load(path)    # survives resumes

  Sharp edge: record a step only once its noisy update has been released
  (applied to the parameters); recording is what the accounting trusts.

  ``parallel``: pure-DP releases on a part of the private set disjoint from
  the one the steps touched (``record_parallel``; ``privacy.selection``).
  They compose in parallel with the steps: ``epsilon()`` is the largest of
  the steps' epsilon and theirs, not the sum (invariant 7). Only a
  mechanism that reads a disjoint part may be recorded here.
  """

  delta: float
  target_epsilon: float | None = None
  entries: list[LedgerEntry] = dataclasses.field(default_factory=list)
  parallel: list[ParallelRelease] = dataclasses.field(default_factory=list)
  # (sigma, q, total steps) approved by ``approve``: ``check_step`` is O(1)
  # inside it. Dropped whenever anything else is recorded.
  _plan: tuple[float, float, int] | None = dataclasses.field(
      default=None, init=False, repr=False, compare=False)
  _plan_epsilon: float | None = dataclasses.field(
      default=None, init=False, repr=False, compare=False)

  def __post_init__(self):
    _check_delta(self.delta)
    if self.target_epsilon is not None and not self.target_epsilon > 0:
      raise ValueError(f"target_epsilon must be > 0, got {self.target_epsilon}.")
    self.entries = [e if isinstance(e, LedgerEntry) else LedgerEntry(**e)
                    for e in self.entries]
    for e in self.entries:
      _check_entry(e.noise_multiplier, e.sampling_rate, e.steps)
    self.parallel = [p if isinstance(p, ParallelRelease) else
                     ParallelRelease(**p) for p in self.parallel]
    for p in self.parallel:
      _check_parallel(p.mechanism, p.epsilon, p.records)

  @property
  def total_steps(self) -> int:
    return sum(e.steps for e in self.entries)

  def record(self, noise_multiplier: float, sampling_rate: float,
             steps: int = 1) -> None:
    noise_multiplier, sampling_rate = float(noise_multiplier), float(sampling_rate)
    _check_entry(noise_multiplier, sampling_rate, steps)
    steps = int(steps)
    if self._plan is not None and self._plan[:2] != (noise_multiplier,
                                                     sampling_rate):
      self._plan = None
    last = self.entries[-1] if self.entries else None
    if (last is not None and last.noise_multiplier == noise_multiplier and
        last.sampling_rate == sampling_rate):
      last.steps += steps
    else:
      self.entries.append(LedgerEntry(noise_multiplier, sampling_rate, steps))

  def epsilon(self, accountant: str = "pld",
              extra: tuple[float, float, int] | None = None) -> float:
    """Epsilon spent at this ledger's delta (plus ``extra`` steps if given):
    the steps' epsilon, or a parallel release's if that is larger."""
    sequential = self._steps_epsilon(accountant, extra)
    return max([sequential] + [p.epsilon for p in self.parallel])

  def _steps_epsilon(self, accountant: str,
                     extra: tuple[float, float, int] | None) -> float:
    segments = [(e.noise_multiplier, e.sampling_rate, e.steps)
                for e in self.entries]
    if extra is not None:
      segments.append(tuple(extra))
    return segments_epsilon(tuple(segments), self.delta, accountant)

  def check_budget(self, noise_multiplier: float, sampling_rate: float,
                   steps: int = 1) -> float:
    """Raises BudgetExceededError unless ``steps`` more keep epsilon <= target.

    Returns the epsilon the ledger would show after those steps.
    """
    after = self.epsilon(extra=(float(noise_multiplier), float(sampling_rate),
                                int(steps)))
    if self.target_epsilon is not None and after > self.target_epsilon:
      raise BudgetExceededError(
          f"{steps} more step(s) at noise_multiplier={noise_multiplier:.4g}, "
          f"q={sampling_rate:.4g} would bring epsilon to {after:.4f}, over the "
          f"target {self.target_epsilon:.4f} by {after - self.target_epsilon:.4f}"
          f" (already spent {self.epsilon():.4f} in {self.total_steps} steps). "
          "Lower the number of steps or raise the noise multiplier.")
    return after

  def approve(self, noise_multiplier: float, sampling_rate: float,
              steps: int) -> float:
    """``check_budget`` for a whole planned run, remembered by ``check_step``.

    Epsilon grows with every step, so once ``steps`` more steps fit, every
    prefix of them fits too: ``check_step`` then needs no accountant call.
    """
    after = self.check_budget(noise_multiplier, sampling_rate, steps)
    self._plan = (float(noise_multiplier), float(sampling_rate),
                  self.total_steps + int(steps))
    self._plan_epsilon = after
    return after

  @property
  def planned_epsilon(self) -> float | None:
    """The epsilon the approved plan ends at (None without a plan): an
    upper bound of ``epsilon()`` at every step inside the plan."""
    return self._plan_epsilon if self._plan is not None else None

  def check_step(self, noise_multiplier: float, sampling_rate: float) -> None:
    """The guard before each private step: one more step must fit the target.

    Raises BudgetExceededError otherwise. Free inside an ``approve``d plan;
    a full accountant call outside one.
    """
    plan = self._plan
    if (plan is not None and
        plan[:2] == (float(noise_multiplier), float(sampling_rate)) and
        self.total_steps + 1 <= plan[2]):
      return
    self.check_budget(noise_multiplier, sampling_rate, 1)

  def check_parallel(self, mechanism: str, epsilon: float) -> None:
    """Raises BudgetExceededError if a parallel release at ``epsilon``
    would exceed the target (it is not added to the steps' epsilon)."""
    _check_parallel(mechanism, epsilon, 1)
    if self.target_epsilon is not None and epsilon > self.target_epsilon:
      raise BudgetExceededError(
          f"{mechanism} at epsilon {epsilon:.4f} exceeds the target "
          f"{self.target_epsilon:.4f}; give it at most the target.")

  def record_parallel(self, mechanism: str, epsilon: float,
                      records: int) -> None:
    """Records a pure epsilon-DP release on ``records`` private records
    disjoint from those the steps touched (after it is released)."""
    _check_parallel(mechanism, float(epsilon), records)
    self.check_parallel(mechanism, float(epsilon))
    self.parallel.append(ParallelRelease(mechanism, float(epsilon),
                                         int(records)))
    self._plan = None

  def replace_entries(self, entries: list[LedgerEntry]) -> None:
    """Sets the entries (e.g. from a checkpoint); drops any approved plan."""
    entries = [e if isinstance(e, LedgerEntry) else LedgerEntry(**e)
               for e in entries]
    for e in entries:
      _check_entry(e.noise_multiplier, e.sampling_rate, e.steps)
    self.entries = [dataclasses.replace(e) for e in entries]
    self._plan = None

  def to_dict(self) -> dict[str, Any]:
    return {"delta": self.delta, "target_epsilon": self.target_epsilon,
            "entries": [dataclasses.asdict(e) for e in self.entries],
            "parallel": [dataclasses.asdict(p) for p in self.parallel],
            "total_steps": self.total_steps,
            "epsilon_pld": self.epsilon("pld")}

  @classmethod
  def from_dict(cls, data: dict[str, Any]) -> "PrivacyLedger":
    return cls(delta=data["delta"], target_epsilon=data.get("target_epsilon"),
               entries=[LedgerEntry(**e) for e in data["entries"]],
               parallel=[ParallelRelease(**p)
                         for p in data.get("parallel", [])])

  def save(self, path: str) -> None:
    """Writes JSON atomically: a crash leaves the old file or the new one."""
    io.save_json(path, self.to_dict())

  @classmethod
  def load(cls, path: str) -> "PrivacyLedger":
    with open(path) as f:
      try:
        data = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"Privacy ledger {path} is not valid JSON ({e}); it "
                         "is the record of spent budget, so it was left in "
                         "place: restore it from a checkpoint.") from e
    return cls.from_dict(data)
