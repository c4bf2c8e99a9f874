"""Black-box one-run privacy audit of the private linear-head stage (AdaMix).

The weaker of the two audits (``whitebox`` is the one with power): the
auditor sees only the released head, and 80 guesses on 200 feature-space
canaries can certify at most ~3.3 (``bounds``).

  config = digits_config(seed=0)
  prepare(config, "/tmp/audit")
  data = stages.load_seed(config, stages.Workdir("/tmp/audit"), 0)
  result = audit(config, data, epsilon=1.0)   # AuditConfig() defaults

The audited run trains ONCE on the private set plus the included canaries,
with the plan ``recipe.LinearHeadRecipe.plan`` makes for AdaMix (same calibrated
sigma, q, T, step size, geometry, public mixing, tail averaging). Each
canary is scored from the released head against a reference (see
``AuditConfig.reference``) and the fixed number of guesses is turned into an
epsilon lower bound (``bounds``). A correct mechanism gives a bound at or
below its epsilon with probability >= 1 - beta; the ``no_noise`` mechanism
(sigma forced to 0) is there to show that the audit can fail (``half_noise``,
sigma / 2, is not caught: see README "Privacy audit").
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Optional

import numpy as np

from adamix_jax.audit import bounds
from adamix_jax.audit import canaries as canaries_lib
from adamix_jax.models import linear
from adamix_jax.privacy import accounting
from adamix_jax.privacy import randomness
from adamix_jax.experiment import recipe as recipe_lib
from adamix_jax.experiment import stages

# "correct": as configured; the others are broken on purpose (sigma patched).
MECHANISMS = ("correct", "no_noise", "half_noise")
REFERENCES = ("retrained", "public_start")
# Seeds of the two reference runs are train_seed + these offsets: their
# sampling and noise are independent of the audited run's.
_REFERENCE_SEED_OFFSETS = {"none": 1, "all": 2}


@dataclasses.dataclass(frozen=True)
class AuditConfig:
  """The audit's own parameters, fixed before any training run.

  The defaults are the audit of record (README "Privacy audit"): chosen by
  trying a few values on the audit itself, then frozen.

  Attributes:
    num_canaries: m; each is included with probability 1/2 (<= d * c).
    num_positive: k+, guesses "in" for the highest scores.
    num_negative: k-, guesses "out" for the lowest scores.
    beta: 1 - confidence of the lower bound.
    canary_seed: draws the canaries and their inclusion coins.
    train_seed: seeds the Poisson sampler and the noise of the audited run
      (``MechanismCoins.insecure_from_seed``: the audit is a reproducible
      experiment on the mechanism, and the auditor never uses the coins).
    reference: what the released head is compared with. "retrained": the
      mean of two runs of the same mechanism with fresh seeds, one without
      any canary and one with all of them (neither depends on the coins, so
      the bound stays sound; it removes the large, canary-independent move
      of the head, 3 runs per audit). "public_start": the public model W_0
      (1 run, but the private data's move hides the canaries).
  """

  num_canaries: int = 200
  num_positive: int = 40
  num_negative: int = 40
  beta: float = 0.05
  canary_seed: int = 0
  train_seed: int = 0
  reference: str = "retrained"

  def __post_init__(self):
    if self.num_canaries <= 0:
      raise ValueError(f"num_canaries must be > 0, got {self.num_canaries}.")
    if self.num_positive < 0 or self.num_negative < 0:
      raise ValueError("num_positive and num_negative must be >= 0.")
    if self.num_positive + self.num_negative == 0:
      raise ValueError("the audit needs at least one guess.")
    if self.num_positive + self.num_negative > self.num_canaries:
      raise ValueError(f"k+ + k- = {self.num_positive + self.num_negative} "
                       f"guesses exceed the {self.num_canaries} canaries.")
    if not 0.0 < self.beta < 1.0:
      raise ValueError(f"beta must be in (0, 1), got {self.beta}.")
    if self.reference not in REFERENCES:
      raise ValueError(f"reference must be one of {REFERENCES}, got "
                       f"{self.reference!r}.")


@dataclasses.dataclass(frozen=True)
class AuditResult:
  """One audit: the configured epsilon and what the canaries certify."""

  mechanism: str
  epsilon: float  # the configured (theoretical) epsilon
  delta: float
  num_canaries: int  # m
  num_guesses: int  # r
  num_correct: int  # v
  lower_bound: float  # epsilon certified with confidence 1 - beta
  max_certifiable: float  # the bound had all r guesses been right
  beta: float
  noise_multiplier: float
  steps: int
  sampling_rate: float
  expected_batch_size: float
  public_weight: float
  num_included: int
  canary_seed: int
  train_seed: int
  reference: str
  seconds: float

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)

  @property
  def consistent(self) -> bool:
    """No violation found: the bound is at most the configured epsilon."""
    return self.lower_bound <= self.epsilon


def digits_config(seed: int = 0, progress: bool = False):
  """The digits AdaMix configuration the audit runs on (one data seed)."""
  from adamix_jax.configs import digits  # pylint: disable=g-import-not-at-top
  config = digits.get_config()
  config.progress = progress
  config.methods = ("adamix",)
  config.seeds = (seed,)
  return config


def prepare(config, workdir: str) -> str:
  """Builds the ``features`` and ``public_init`` stages of ``config``."""
  stages.run(config, workdir, stages=["features", "public_init"])
  return workdir


def audit_plan(config, seed_data: recipe_lib.SeedData, epsilon: float,
               num_canaries: int) -> recipe_lib.RunPlan:
  """AdaMix's run plan with constants that do not depend on the canaries.

  ``LinearHeadRecipe.plan`` is computed here once, on the real private set
  (N = len(private_y)), so that its rules (T, eta, geometry, public weight)
  cannot depend on how many canaries are included; the normaliser of the
  noisy sum, q * N in a plain run, is fixed at q * (N + m / 2), the
  expected training set size. Computed on the training set, these constants
  would change with the number of included canaries, so a canary would
  also leak through them.
  """
  plan = recipe_lib.make_recipe(config).plan("adamix", epsilon, seed_data)
  expected = plan.sampling_rate * (len(seed_data.private_y) +
                                   num_canaries / 2.0)
  return dataclasses.replace(plan, step_config=dataclasses.replace(
      plan.step_config, expected_batch_size=expected))


def _train(config, seed_data: recipe_lib.SeedData, plan: recipe_lib.RunPlan,
           epsilon: float, mechanism: str, extra_x: np.ndarray,
           extra_y: np.ndarray, seed: int) -> np.ndarray:
  """One run of the audited mechanism on private + extra; returns W~_T."""
  delta = float(config.delta)
  target = float(epsilon) if mechanism == "correct" else None
  data = dataclasses.replace(
      seed_data, private_x=np.concatenate([seed_data.private_x, extra_x]),
      private_y=np.concatenate([seed_data.private_y, extra_y]))
  run = recipe_lib.make_recipe(config).train_dp(
      "adamix", epsilon, seed, data,
      ledger=accounting.PrivacyLedger(delta, target),
      coins=randomness.MechanismCoins.insecure_from_seed(seed), plan=plan)
  return np.asarray(linear.stack(run.params))


def audit(config, seed_data: recipe_lib.SeedData, epsilon: float,
          audit_config: AuditConfig = AuditConfig(),
          mechanism: str = "correct",
          progress: Optional[Callable[[str], None]] = None) -> AuditResult:
  """Trains with the canaries (and the references); returns the bound.

  ``mechanism``: "correct" (as configured, sigma calibrated to
  ``epsilon``), "no_noise" or "half_noise" (the same step with sigma = 0 or
  sigma / 2: broken on purpose).
  ``progress``: optional callback receiving one line per training run.
  """
  if mechanism not in MECHANISMS:
    raise ValueError(f"mechanism must be one of {MECHANISMS}, got "
                     f"{mechanism!r}.")
  start = time.time()
  say = progress or (lambda line: None)
  delta = float(config.delta)
  m = audit_config.num_canaries
  recipe_lib.check_delta(config, len(seed_data.private_y) + m)
  plan = audit_plan(config, seed_data, epsilon, m)
  steps = plan.steps
  sigma = plan.step_config.noise_multiplier
  if mechanism != "correct":
    plan = dataclasses.replace(plan, step_config=dataclasses.replace(
        plan.step_config,
        noise_multiplier=0.0 if mechanism == "no_noise" else sigma / 2))
  step_config = plan.step_config

  canaries = canaries_lib.make_canaries(
      m, seed_data.private_x.shape[1], seed_data.num_classes,
      audit_config.canary_seed)
  included = canaries.included
  run = lambda mask, seed: _train(config, seed_data, plan, epsilon,
                                  mechanism, canaries.x[mask],
                                  canaries.y[mask], seed)
  tag = f"[{mechanism} eps={epsilon:g}]"
  say(f"{tag} audited run: {len(seed_data.private_y)} private + "
      f"{int(included.sum())} of {m} canaries, "
      f"sigma={step_config.noise_multiplier:.3f}")
  final = run(included, audit_config.train_seed)
  if audit_config.reference == "retrained":
    references = []
    for name, mask in (("none", np.zeros(m, bool)), ("all", np.ones(m, bool))):
      say(f"{tag} reference run with {name} of the canaries")
      references.append(run(mask, audit_config.train_seed +
                            _REFERENCE_SEED_OFFSETS[name]))
    reference = np.mean(references, axis=0)
  else:
    reference = np.asarray(linear.stack(seed_data.public_params))
    if not config.adamix.public_init:
      reference = np.zeros_like(reference)

  canary_scores = canaries_lib.scores(canaries, final, reference)
  counts = canaries_lib.guess(canary_scores, included,
                              audit_config.num_positive,
                              audit_config.num_negative)
  result = AuditResult(
      mechanism=mechanism, epsilon=float(epsilon), delta=delta,
      num_canaries=m, num_guesses=counts.num_guesses,
      num_correct=counts.num_correct,
      lower_bound=bounds.epsilon_lower_bound(counts, delta, audit_config.beta),
      max_certifiable=bounds.max_certifiable_epsilon(
          m, counts.num_guesses, delta, audit_config.beta),
      beta=audit_config.beta, noise_multiplier=step_config.noise_multiplier,
      steps=steps, sampling_rate=float(plan.sampling_rate),
      expected_batch_size=step_config.expected_batch_size,
      public_weight=step_config.public_weight,
      num_included=int(included.sum()),
      canary_seed=audit_config.canary_seed,
      train_seed=audit_config.train_seed, reference=audit_config.reference,
      seconds=round(time.time() - start, 3))
  say(f"{tag} {counts.num_correct}/{counts.num_guesses} guesses right: "
      f"epsilon >= {result.lower_bound:.3f} ({result.seconds:.1f}s)")
  return result


def format_table(results: list[AuditResult]) -> str:
  """A plain-text table of audit results."""
  header = ("epsilon", "mechanism", "sigma", "m", "r", "v", "lower bound",
            "max certifiable", "theoretical eps")
  rows = [header]
  for r in results:
    if r.noise_multiplier == 0:
      theoretical = "inf"
    elif r.mechanism == "correct":
      theoretical = f"{r.epsilon:g}"
    else:  # the accountant's epsilon of the patched sigma
      theoretical = "%.3g" % accounting.compute_epsilon(
          r.noise_multiplier, r.sampling_rate, r.steps, r.delta)
    rows.append((f"{r.epsilon:g}", r.mechanism, f"{r.noise_multiplier:.3f}",
                 str(r.num_canaries), str(r.num_guesses), str(r.num_correct),
                 f"{r.lower_bound:.3f}", f"{r.max_certifiable:.3f}",
                 theoretical))
  widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
  lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths))
           for row in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)
