r"""White-box audit with Dirac gradient canaries: power from ONE private run.

Threat model: the auditor sees every noisy update the mechanism releases
(the threat model DP-SGD's accounting covers) and inserts gradient canaries.
The audited run is the real digits AdaMix private run (the recipe's plan,
``LinearHeadRecipe.plan``: sigma calibrated for (eps, delta, q, T), q, T,
the clipping threshold C_t of every step (the fixed C of the noise-aware
rules, or the public adaptive one of the fixed schedule), mixing, step
size, tail averaging), with an auditor leaf of M coordinates appended to
what each step releases:

* canary i is a private "example" whose contribution is G e_i (a Dirac on
  its own auditor coordinate; G = ``canary_norm``, far above every C_t, so
  the clipping is exercised), zero in the real coordinates; real examples
  are zero in the auditor coordinates;
* each canary is "in" with probability 1/2 (``canary_seed``); the in
  canaries are Poisson-sampled at rate q every step by a ``PoissonSampler``
  of their own, seeded from the run's mechanism coins (a stream distinct
  from the noise and the real batches);
* the canaries go through THE SAME ``mechanism.privatize`` call as the real
  batch (``CanaryTap`` joins them to the step's backend), so their clipping
  and their noise, N(0, (sigma C_t)^2) on each auditor coordinate, are the
  mechanism's own; the real coordinates' noise and update are unchanged
  (``test_audit_power_run_is_the_recipe_run``).

Why the canaries are independent trials. The real coordinates, hence the
iterates and every C_t, do not depend on the canaries; given the C_t
sequence (public), canary i's released coordinates depend only on its own
inclusion, sampling and noise. So the M canaries are M i.i.d. repetitions of
the single-canary experiment: z_t = released_t q N / C_t is
N(b_t, sigma^2) with b_t ~ Bernoulli(q) if in, 0 if out, for every t. A
correct mechanism is, for every C_t sequence, the Poisson-subsampled
Gaussian the accountant composes, so it is (eps, delta)-DP for each canary,
and the Clopper-Pearson bound on a fixed test's error rates (``rates``) is
a valid lower bound: one run does the work of M runs. The one-run bound of
Steinke et al. (``bounds``) on the same canaries is computed as a
cross-check (``one_run_bound``: it needs no independence); its delta term
2 m delta grows with the number of canaries and caps it near 7.2 at
M = 1e6, where the Clopper-Pearson ceiling is log(M / 4 / ln(2 / beta)) =
11.1.

Score: the log-likelihood ratio of the T observations under the CONFIGURED
sigma and q, sum_t log(1 - q + q exp((z_t - 1/2) / sigma^2)) (Neyman-Pearson
optimal for the correct mechanism). The direction and the threshold are
chosen on a calibration half of the canaries and the bound is counted on
the other half.

Broken mechanisms (``MECHANISMS``), each a patch of the mechanism as run:
``no_noise`` (sigma = 0), ``half_noise`` (sigma / 2), ``no_clip`` (every
row's clip scale 1, noise still sigma C_t: ``Unclipped``). The score keeps
using the configured sigma: the auditor tests the claim, not the bug.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from adamix_jax.audit import bounds
from adamix_jax.audit import canaries as canaries_lib
from adamix_jax.audit import rates
from adamix_jax.experiment import recipe as recipe_lib
from adamix_jax.privacy import accounting
from adamix_jax.privacy import mechanism as mechanism_lib
from adamix_jax.privacy import randomness
from adamix_jax.privacy import sampler as sampler_lib
from adamix_jax.train import fit as fit_lib
from adamix_jax.train import linear_head

PyTree = Any
MECHANISMS = ("correct", "no_noise", "half_noise", "no_clip")
# SeedSequence spawn keys. The canaries' sampler derives from the run's
# coins, where randomness uses 0 (noise) and 1 (real batches); the
# auditor's own coins (inclusion, calibration split) derive from
# canary_seed under keys of their own. (A plain default_rng((seed, 0)) would
# NOT do: SeedSequence drops trailing zero words, so it equals
# default_rng(seed).)
_CANARY_SAMPLER_STREAM = 2
_INCLUSION_STREAM = 101
_SPLIT_STREAM = 102


# --- the canaries inside the mechanism ----------------------------------------


@dataclasses.dataclass(frozen=True)
class WithCanaries:
  """A backend: the step's real rows, then M Dirac canary rows.

  Canary row i is G e_i in an auditor leaf of M coordinates (zero in the
  real coordinates); real rows are zero in the auditor leaf. So the norms
  are (real norms, G, ..., G) and the weighted sum is the pair
  (real weighted sum, G w_canary): the scatter-add of w_i G e_i.
  """

  real: mechanism_lib.Contributions
  canary_norm: jax.Array
  num_canaries: int

  def norms(self) -> jax.Array:
    canaries = jnp.full((self.num_canaries,), self.canary_norm, jnp.float32)
    return jnp.concatenate([self.real.norms().astype(jnp.float32),
                            canaries])

  def weighted_sum(self, weights: jax.Array) -> PyTree:
    split = weights.shape[0] - self.num_canaries
    return (self.real.weighted_sum(weights[:split]),
            weights[split:] * self.canary_norm)


@dataclasses.dataclass(frozen=True)
class Unclipped:
  """BROKEN ON PURPOSE, audit only (mechanism ``no_clip``).

  Where ``broken`` is true, reports every finite norm as 0, so ``privatize``
  gives every row clip scale 1 (no clipping) while its noise std stays
  sigma * C_t: the bug of a mechanism that forgets to clip. Non-finite rows
  are still zeroed; where ``broken`` is false the norms pass unchanged.
  (A traced flag, not a static one: the four mechanisms share one
  compiled step.)
  """

  inner: mechanism_lib.Contributions
  broken: jax.Array

  def norms(self) -> jax.Array:
    norms = self.inner.norms()
    hide = self.broken & jnp.isfinite(norms)
    return jnp.where(hide, jnp.zeros_like(norms), norms)

  def weighted_sum(self, weights: jax.Array) -> PyTree:
    return self.inner.weighted_sum(weights)


@flax.struct.dataclass
class CanaryTap:
  """One step's canaries, as ``linear_step.private_step`` takes them.

  Attributes:
    mask: (M,) 1 where canary i is in this step's Poisson batch (an "in"
      canary that was sampled), else 0; an out canary is always 0, exactly
      like a padding row.
    canary_norm: G.
    unclipped: () bool, True for the ``no_clip`` patch (broken on purpose).
  """

  mask: jax.Array
  canary_norm: jax.Array
  unclipped: jax.Array

  def attach(self, contributions, mask: jax.Array):
    """(the joined backend, the joined mask) for ``privatize``."""
    if isinstance(contributions, (mechanism_lib.Microbatched,
                                  mechanism_lib.ShardMapped)):
      raise NotImplementedError(
          "the white-box audit joins canaries to a plain backend; run it "
          "without microbatches or shard_map.")
    joined = Unclipped(WithCanaries(contributions, self.canary_norm,
                                    self.mask.shape[0]), self.unclipped)
    return joined, jnp.concatenate([mask.astype(jnp.float32),
                                    self.mask.astype(jnp.float32)])

  def detach(self, released: PyTree) -> tuple[PyTree, jax.Array]:
    """(the real noisy mean the step goes on with, the auditor leaf)."""
    real, canaries = released
    return real, canaries


# --- the score ----------------------------------------------------------------


def step_log_likelihood_ratio(z: jax.Array, sigma: float | jax.Array,
                              q: float | jax.Array) -> jax.Array:
  """log p_in(z) / p_out(z) of one step, p_out = N(0, s^2) and p_in =
  (1 - q) N(0, s^2) + q N(1, s^2): log(1 - q + q exp((z - 1/2) / s^2)),
  without overflow (log1p(-1) = -inf is the full-batch case)."""
  return jnp.logaddexp(jnp.log1p(-q), jnp.log(q) + (z - 0.5) / sigma**2)


@jax.jit
def _accumulate(score, released, threshold, normalizer, sigma, q):
  # z_t: the released coordinate back in units of the step's (public) C_t.
  z = released * normalizer / threshold
  return score + step_log_likelihood_ratio(z, sigma, q)


# --- the one-run bound on the same observations -------------------------------

GUESS_KINDS = ("in", "out", "both")


def _guess_counts(scores, included, kind: str, num_guesses: int):
  positive = {"in": num_guesses, "out": 0,
              "both": num_guesses // 2}[kind]
  negative = num_guesses - positive if kind != "in" else 0
  return canaries_lib.guess(scores, included, positive, negative)


def one_run_bound(scores: np.ndarray, included: np.ndarray,
                  calibration: np.ndarray, delta: float,
                  beta: float = 0.05) -> dict:
  """Steinke et al.'s one-run bound (``bounds``) on the same canaries.

  It needs no independence between canaries (only their fair inclusion
  coins), so it cross-checks ``rates``. The guesses are "in" for the
  highest scores and/or "out" for the lowest; their kind and their share
  of the canaries are chosen on the calibration canaries (whose inclusion
  is then treated as known, fixed data), and the bound counts the others.
  """
  scores = np.asarray(scores, np.float64)
  included = np.asarray(included, bool)
  calibration = np.asarray(calibration, bool)
  held_out = ~calibration
  num_cal, num_eval = int(calibration.sum()), int(held_out.sum())
  shares = np.unique(np.geomspace(2.0 / num_cal, 1.0, 16))
  best = (-1.0, "in", 1.0)
  for kind in GUESS_KINDS:
    for share in shares:
      r = max(2, int(round(share * num_cal)))
      counts = _guess_counts(scores[calibration], included[calibration],
                             kind, min(r, num_cal))
      value = bounds.epsilon_lower_bound(counts, delta, beta)
      if value > best[0]:
        best = (value, kind, share)
  _, kind, share = best
  r = min(num_eval, max(2, int(round(share * num_eval))))
  counts = _guess_counts(scores[held_out], included[held_out], kind, r)
  return {"one_run_bound": bounds.epsilon_lower_bound(counts, delta, beta),
          "one_run_guesses": counts.num_guesses,
          "one_run_correct": counts.num_correct,
          "one_run_kind": kind,
          "one_run_max_certifiable": bounds.max_certifiable_epsilon(
              num_eval, counts.num_guesses, delta, beta)}


# --- one audit ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WhiteBoxConfig:
  """The white-box audit's parameters, fixed before the run.

  Attributes:
    num_canaries: M (half in, half out in expectation; half of them choose
      the test, the other half are counted).
    canary_norm: G, each canary's gradient norm (above every C_t).
    beta: 1 - confidence of the lower bound.
    canary_seed: draws the inclusion coins and the calibration split.
    train_seed: the run's mechanism coins
      (``MechanismCoins.insecure_from_seed``: a reproducible experiment on
      the mechanism; the auditor never reads the coins).
    calibration_fraction: the share of canaries that choose the test.
  """

  num_canaries: int = 1_000_000
  canary_norm: float = 100.0
  beta: float = 0.05
  canary_seed: int = 0
  train_seed: int = 0
  calibration_fraction: float = 0.5

  def __post_init__(self):
    if self.num_canaries < 8:
      raise ValueError(f"num_canaries must be >= 8, got {self.num_canaries}.")
    if not self.canary_norm > 0:
      raise ValueError(f"canary_norm must be > 0, got {self.canary_norm}.")
    if not 0.0 < self.beta < 1.0:
      raise ValueError(f"beta must be in (0, 1), got {self.beta}.")
    if not 0.0 < self.calibration_fraction < 1.0:
      raise ValueError("calibration_fraction must be in (0, 1).")


@dataclasses.dataclass(frozen=True)
class WhiteBoxResult:
  """One white-box audit: the configured epsilon and what it certifies."""

  epsilon: float  # the configured epsilon (sigma calibrated to it)
  mechanism: str
  lower_bound: float  # eps certified with confidence 1 - beta
  epsilon_as_run: float  # the accountant's eps of the patched mechanism
  max_certifiable: float  # the bound had the test made no error
  calibration_bound: float  # the chosen test on its own trials (optimistic)
  direction: str
  threshold: float
  false_positives: int
  false_negatives: int
  num_out: int  # out canaries counted
  num_in: int  # in canaries counted
  fpr_upper: float
  fnr_upper: float
  num_canaries: int
  canary_norm: float
  beta: float
  delta: float
  noise_multiplier: float  # configured sigma (the score uses it)
  noise_multiplier_as_run: float
  steps: int
  sampling_rate: float
  expected_batch_size: float
  threshold_min: float  # min_t C_t
  threshold_max: float  # max_t C_t (below canary_norm: clipping exercised)
  canary_seed: int
  train_seed: int
  seconds: float
  # Steinke et al.'s one-run bound on the same canaries (``one_run_bound``),
  # the cross-check that needs no independence; None when not computed.
  one_run_bound: Optional[float] = None
  one_run_guesses: Optional[int] = None
  one_run_correct: Optional[int] = None
  one_run_kind: Optional[str] = None
  one_run_max_certifiable: Optional[float] = None

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)

  @property
  def consistent(self) -> bool:
    """No violation found: neither bound exceeds the configured epsilon."""
    return (self.lower_bound <= self.epsilon and
            (self.one_run_bound is None or self.one_run_bound <= self.epsilon))


def canary_sampler_seed(coins: randomness.MechanismCoins) -> int:
  """The canaries' Poisson sampler seed: the run's coins, its own stream."""
  words = np.random.SeedSequence(
      int(coins.entropy), spawn_key=(_CANARY_SAMPLER_STREAM,)
  ).generate_state(4)
  return int.from_bytes(words.astype("<u4").tobytes(), "little")


def inclusion_coins(num_canaries: int, seed: int) -> np.ndarray:
  """(M,) bool, each True with probability 1/2, from ``seed`` alone."""
  stream = np.random.SeedSequence(seed, spawn_key=(_INCLUSION_STREAM,))
  return np.random.default_rng(stream).random(num_canaries) < 0.5


def calibration_split(num_canaries: int, seed: int,
                      fraction: float = 0.5) -> np.ndarray:
  """(M,) bool, True for the canaries that choose the test: ``seed`` alone,
  a stream independent of the inclusion coins."""
  return rates.split_calibration(
      num_canaries, np.random.SeedSequence(seed, spawn_key=(_SPLIT_STREAM,)),
      fraction)


class CanarySchedule:
  """The in canaries' Poisson batches, step by step, as ``CanaryTap``s."""

  def __init__(self, included: np.ndarray, sampling_rate: float, seed: int,
               canary_norm: float, unclipped: bool):
    self.included_ids = np.flatnonzero(included)
    self.num_canaries = len(included)
    self.sampler = sampler_lib.PoissonSampler(
        max(1, len(self.included_ids)), sampling_rate, seed)
    self.canary_norm = np.float32(canary_norm)
    self.unclipped = np.bool_(unclipped)

  def __call__(self, t: int) -> CanaryTap:
    mask = np.zeros(self.num_canaries, np.float32)
    if len(self.included_ids):
      batch = self.sampler.batch(t)
      mask[self.included_ids[batch.indices[:batch.size]]] = 1.0
    return CanaryTap(mask=mask, canary_norm=self.canary_norm,
                     unclipped=self.unclipped)


def noise_factor(mechanism: str) -> float:
  """The factor a mechanism applies to the calibrated sigma.

  ``MECHANISMS``, or ``noise_x<f>`` (sigma times f, 0 <= f < 1: the power
  curve between ``correct`` and ``no_noise``).
  """
  factors = {"correct": 1.0, "no_noise": 0.0, "half_noise": 0.5,
             "no_clip": 1.0}
  if mechanism in factors:
    return factors[mechanism]
  if mechanism.startswith("noise_x"):
    try:
      factor = float(mechanism[len("noise_x"):])
    except ValueError:
      factor = math.nan
    if 0.0 <= factor < 1.0:
      return factor
  raise ValueError(f"mechanism must be one of {MECHANISMS} or noise_x<f> "
                   f"with 0 <= f < 1, got {mechanism!r}.")


def mechanism_step_config(step_config, mechanism: str):
  """The step config of a (possibly broken) mechanism."""
  factor = noise_factor(mechanism)
  if factor == 1.0:
    return step_config
  return dataclasses.replace(
      step_config, noise_multiplier=step_config.noise_multiplier * factor)


def audited_plan(config, seed_data: recipe_lib.SeedData,
                 epsilon: float) -> recipe_lib.RunPlan:
  """AdaMix's run plan at ``epsilon``, as ``train_dp`` runs it
  (``LinearHeadRecipe.plan``: public data and (sigma, N, D, c) only)."""
  recipe = recipe_lib.make_recipe(config)
  if recipe.kind != "linear":
    raise ValueError("the white-box audit runs the linear-head recipe.")
  return recipe.plan("adamix", epsilon, seed_data)


def audited_program(config, seed_data: recipe_lib.SeedData,
                    plan: recipe_lib.RunPlan,
                    tap: Optional[Callable[[int], CanaryTap]]):
  """The AdaMix linear-head program ``recipe.train_dp`` runs, with a tap
  (the same ``LinearHeadRecipe.program``; ``test_audit_power_run_is_the_
  recipe_run`` holds the two equal)."""
  return recipe_lib.make_recipe(config).program(plan, seed_data, tap=tap)


@dataclasses.dataclass(frozen=True)
class CanaryRun:
  """What one audited run leaves to the auditor (and to the tests)."""

  epsilon: float
  mechanism: str
  scores: np.ndarray  # (M,) float64, the log-likelihood ratio scores
  included: np.ndarray  # (M,) bool, the inclusion coins
  calibration: np.ndarray  # (M,) bool, the canaries that choose the test
  thresholds: np.ndarray  # (T,) C_t of every step (public)
  params: dict  # the released head
  step_config: Any  # the (patched) step config that ran
  noise_multiplier: float  # configured sigma (the score's)
  sampling_rate: float  # q
  epsilon_as_run: float  # the accountant's eps of the patched mechanism
  seconds: float


def run_canaries(config, seed_data: recipe_lib.SeedData, epsilon: float,
                 mechanism: str = "correct",
                 audit_config: WhiteBoxConfig = WhiteBoxConfig(),
                 progress: Optional[Callable[[str], None]] = None
                 ) -> CanaryRun:
  """The audited private run, once, with the canaries; scores each canary.

  Args:
    config: a linear-head experiment config (``run.digits_config()``).
    seed_data: its prepared data (``stages.load_seed``).
    epsilon: the configured epsilon (sigma is calibrated to it).
    mechanism: one of ``MECHANISMS``, or ``noise_x<f>`` (``noise_factor``).
    audit_config: the audit's parameters.
    progress: optional callback receiving a line per phase.
  """
  start = time.time()
  say = progress or (lambda line: None)
  delta = float(config.delta)
  recipe_lib.check_delta(config, len(seed_data.private_y))
  plan = audited_plan(config, seed_data, epsilon)
  sigma = float(plan.step_config.noise_multiplier)  # calibrated to epsilon
  plan = dataclasses.replace(plan, step_config=mechanism_step_config(
      plan.step_config, mechanism))
  steps, q, step_config = plan.steps, plan.sampling_rate, plan.step_config
  sigma_run = float(step_config.noise_multiplier)
  if mechanism == "no_clip" or sigma_run == 0.0:
    epsilon_as_run = math.inf  # unbounded sensitivity, or no noise
  else:
    epsilon_as_run = accounting.compute_epsilon(sigma_run, q, steps, delta)

  m = audit_config.num_canaries
  included = inclusion_coins(m, audit_config.canary_seed)
  calibration = calibration_split(m, audit_config.canary_seed,
                                  audit_config.calibration_fraction)
  coins = randomness.MechanismCoins.insecure_from_seed(
      audit_config.train_seed)
  schedule = CanarySchedule(included, q, canary_sampler_seed(coins),
                            audit_config.canary_norm,
                            unclipped=mechanism == "no_clip")
  program = audited_program(config, seed_data, plan, schedule)
  normalizer = jnp.float32(step_config.expected_batch_size)
  box = {"score": jnp.zeros((m,), jnp.float32), "thresholds": []}

  def observe(t, metrics):
    del t
    box["score"] = _accumulate(box["score"], metrics.canary_release,
                               metrics.threshold, normalizer,
                               jnp.float32(sigma), jnp.float32(q))
    box["thresholds"].append(metrics.threshold)

  say(f"[white-box {mechanism} eps={epsilon:g}] "
      f"{len(seed_data.private_y)} private examples + {m} canaries "
      f"({int(included.sum())} in), sigma={sigma_run:.4g} (configured "
      f"{sigma:.4g}), T={steps}, q={q:g}")
  # The ledger guards the correct run's budget; a broken one is unbounded.
  target = float(epsilon) if mechanism == "correct" else None
  params = fit_lib.fit(program, steps=steps,
                       ledger=accounting.PrivacyLedger(delta, target),
                       coins=coins, on_step=observe)
  scores = np.asarray(box["score"], np.float64)
  if not np.all(np.isfinite(scores)):
    raise FloatingPointError(f"{mechanism} at eps={epsilon:g}: non-finite "
                             "canary scores.")
  return CanaryRun(
      epsilon=float(epsilon), mechanism=mechanism, scores=scores,
      included=included, calibration=calibration,
      thresholds=np.asarray(jax.device_get(box["thresholds"]), np.float64),
      params=params, step_config=step_config, noise_multiplier=float(sigma),
      sampling_rate=q, epsilon_as_run=float(epsilon_as_run),
      seconds=round(time.time() - start, 3))


def bound(run: CanaryRun, delta: float,
          audit_config: WhiteBoxConfig = WhiteBoxConfig(),
          one_run: bool = True) -> WhiteBoxResult:
  """The lower bounds certified by an audited run's canaries.

  ``one_run``: also Steinke et al.'s bound on the same canaries.
  """
  start = time.time()
  test, counted = rates.audit_trials(run.scores, run.included,
                                     run.calibration, delta,
                                     audit_config.beta)
  extra = {}
  if one_run:
    extra = one_run_bound(run.scores, run.included, run.calibration, delta,
                          audit_config.beta)
  config = run.step_config
  return WhiteBoxResult(
      epsilon=run.epsilon, mechanism=run.mechanism,
      lower_bound=counted.lower_bound, epsilon_as_run=run.epsilon_as_run,
      max_certifiable=counted.max_certifiable,
      calibration_bound=test.calibration_bound, direction=test.direction,
      threshold=test.threshold, false_positives=counted.false_positives,
      false_negatives=counted.false_negatives, num_out=counted.num_out,
      num_in=counted.num_in, fpr_upper=counted.fpr_upper,
      fnr_upper=counted.fnr_upper, num_canaries=len(run.scores),
      canary_norm=float(audit_config.canary_norm), beta=audit_config.beta,
      delta=float(delta), noise_multiplier=run.noise_multiplier,
      noise_multiplier_as_run=float(config.noise_multiplier),
      steps=len(run.thresholds),
      sampling_rate=run.sampling_rate,
      expected_batch_size=float(config.expected_batch_size),
      threshold_min=float(run.thresholds.min()),
      threshold_max=float(run.thresholds.max()),
      canary_seed=audit_config.canary_seed,
      train_seed=audit_config.train_seed,
      seconds=round(run.seconds + time.time() - start, 3), **extra)


def audit(config, seed_data: recipe_lib.SeedData, epsilon: float,
          mechanism: str = "correct",
          audit_config: WhiteBoxConfig = WhiteBoxConfig(),
          progress: Optional[Callable[[str], None]] = None,
          one_run: bool = True) -> WhiteBoxResult:
  """Runs the audited private run once and bounds epsilon from its canaries
  (``run_canaries``, then ``bound``)."""
  say = progress or (lambda line: None)
  run = run_canaries(config, seed_data, epsilon, mechanism, audit_config,
                     progress)
  result = bound(run, float(config.delta), audit_config, one_run)
  tag = f"[white-box {mechanism} eps={epsilon:g}]"
  say(f"{tag} {result.false_positives}/{result.num_out} false positives, "
      f"{result.false_negatives}/{result.num_in} false negatives "
      f"({result.direction}): epsilon >= {result.lower_bound:.3f} (ceiling "
      f"{result.max_certifiable:.2f}, {result.seconds:.1f}s)" +
      (f"; one-run bound {result.one_run_bound:.3f}" if one_run else ""))
  if result.threshold_max >= audit_config.canary_norm:
    say(f"{tag} WARNING: C_t reached {result.threshold_max:.3g} >= "
        "canary_norm: some canaries were not clipped.")
  return result
