"""The white-box audit: sound on a correct mechanism, and it has power.

Statistics first (no training): on trials of an exact Gaussian mechanism the
Clopper-Pearson bound stays below the true epsilon, and the split of the
canaries (the test is chosen on one half, counted on the other) is what
keeps it sound. Then the canaries inside the mechanism, and the audited
digits AdaMix run: the same run as the recipe's, ``correct`` stays below
its epsilon, and ``no_noise``, ``no_clip`` (epsilon 1 and 2) and
``half_noise`` (epsilon 1) are caught. The digits runs cap T at 100 steps
(``rules.max_steps``; sigma calibrated for them) and use M = 2e5 canaries
to keep the suite fast; the audit of record (README) runs the planned T
(352 and 659 steps at epsilon 1 and 2) and M = 1e6.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from adamix_jax.audit import bounds
from adamix_jax.audit import rates
from adamix_jax.audit import run as blackbox
from adamix_jax.audit import whitebox
from adamix_jax.experiment import recipe as recipe_lib
from adamix_jax.experiment import stages
from adamix_jax.launch import audit as cli
from adamix_jax.models import linear
from adamix_jax.privacy import accounting
from adamix_jax.privacy import mechanism
from adamix_jax.privacy import per_example
from adamix_jax.privacy import randomness

DELTA = 1e-5
BETA = 0.05


def _gaussian_trials(mu: float, num_trials: int, rng):
  """Trials of ONE Gaussian mechanism: out ~ N(0, 1), in ~ N(mu, 1)."""
  included = rng.random(num_trials) < 0.5
  return rng.standard_normal(num_trials) + mu * included, included


# --- statistics --------------------------------------------------------------


def test_audit_power_clopper_pearson_limit_is_the_binomial_tail():
  for k, n in ((0, 100), (3, 100), (50, 100), (99, 100)):
    limit = float(rates.clopper_pearson_upper(k, n, 0.025))
    # P[Binomial(n, limit) <= k] = alpha: a larger rate is rejected.
    assert stats.binom.cdf(k, n, limit) == pytest.approx(0.025, rel=1e-6)
  assert float(rates.clopper_pearson_upper(100, 100, 0.025)) == 1.0
  assert float(rates.clopper_pearson_upper(0, 250_000, 0.025)) == (
      pytest.approx(-math.log(0.025) / 250_000, rel=1e-3))


def test_audit_power_bound_is_sound_on_exact_gaussian_mechanism_trials():
  # mu = 1 at delta = 0.05: eps = 1.57 exactly, and the bound gets close
  # enough for a broken estimator to cross it (point estimates of the
  # rates in place of Clopper-Pearson: 32% of audits exceed the truth).
  mu, delta = 1.0, 0.05
  truth = accounting.gaussian_epsilon(1.0 / mu, delta)  # sigma = 1 / mu
  assert truth == pytest.approx(1.569, abs=1e-3)
  rng = np.random.default_rng(0)
  lower = []
  for repetition in range(200):
    scores, included = _gaussian_trials(mu, 2000, rng)
    calibration = rates.split_calibration(2000, repetition)
    lower.append(rates.audit_trials(scores, included, calibration, delta,
                                    BETA)[1].lower_bound)
  lower = np.array(lower)
  assert np.sum(lower > truth) <= BETA * len(lower)
  assert np.median(lower) > 0.4 * truth  # and it has power


def test_audit_power_threshold_is_chosen_on_calibration_trials_only():
  rng = np.random.default_rng(1)
  scores, included = _gaussian_trials(1.0, 4000, rng)
  calibration = rates.split_calibration(4000, seed=7)
  assert calibration.sum() == 2000
  np.testing.assert_array_equal(calibration,
                                rates.split_calibration(4000, seed=7))
  test, _ = rates.audit_trials(scores, included, calibration, DELTA)
  # The counted trials cannot move the test: replace them all.
  moved = scores.copy()
  moved[~calibration] = rng.standard_normal(2000) * 10.0
  assert rates.audit_trials(moved, included, calibration, DELTA)[0] == test
  assert rates.select_test(scores[calibration], included[calibration],
                           DELTA) == test
  # The audit's split and its inclusion coins: seeded, independent streams.
  coins = whitebox.inclusion_coins(100_000, seed=0)
  split = whitebox.calibration_split(100_000, seed=0)
  np.testing.assert_array_equal(split, whitebox.calibration_split(100_000, 0))
  assert split.sum() == 50_000
  assert abs(np.corrcoef(coins, split)[0, 1]) < 0.02


def test_audit_power_split_is_what_keeps_null_trials_sound():
  # A mechanism that ignores the canary (eps = 0): any bound > 0 is a false
  # alarm. The split audit raises it at most beta of the time; choosing the
  # threshold (scored at beta, the naive choice) on the very trials that
  # are counted, multiple testing over ~2000 thresholds, raises it more
  # often than beta.
  rng = np.random.default_rng(1)
  split = same_trials = 0
  repetitions = 300
  for repetition in range(repetitions):
    scores, included = _gaussian_trials(0.0, 2000, rng)
    calibration = rates.split_calibration(2000, repetition)
    split += rates.audit_trials(scores, included, calibration,
                                DELTA)[1].lower_bound > 0
    test = rates.select_test(scores, included, DELTA, level=BETA)
    same_trials += rates.evaluate(test, scores, included,
                                  DELTA).lower_bound > 0
  assert split <= BETA * repetitions
  assert same_trials > BETA * repetitions


def test_audit_power_perfect_test_reaches_the_ceiling():
  scores = np.r_[np.zeros(500), np.ones(500)]
  included = np.r_[np.zeros(500, bool), np.ones(500, bool)]
  calibration = np.tile([True, False], 500)
  _, counted = rates.audit_trials(scores, included, calibration, DELTA)
  assert counted.false_positives == counted.false_negatives == 0
  ceiling = math.log((1 - DELTA - (1 - 0.025**(1 / 250))) /
                     (1 - 0.025**(1 / 250)))
  assert counted.lower_bound == pytest.approx(ceiling, rel=1e-6)
  assert counted.lower_bound == counted.max_certifiable


def test_audit_power_one_run_p_value_keeps_the_exact_correction():
  # The truncated delta correction of ``bounds.p_value`` (1e5+ guesses) is
  # never below the exact sum over all i = 1..v.
  rng = np.random.default_rng(0)
  for _ in range(100):
    r = int(rng.integers(1, 5000))
    v = int(rng.integers(0, r + 1))
    counts = bounds.AuditCounts(r + int(rng.integers(0, 100)), r, v)
    eps, delta = float(rng.uniform(0, 5)), float(10**rng.uniform(-7, -3))
    q = 1 / (1 + math.exp(-eps))
    exact = stats.binom.sf(v - 1, r, q)
    if v:
      windows = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))
      exact += 2 * counts.num_canaries * delta * np.max(
          windows / np.arange(1, v + 1))
    assert bounds.p_value(counts, eps, delta) >= min(1.0, exact) * (1 - 1e-9)


def test_audit_power_one_run_cross_check_is_sound_on_gaussian_trials():
  rng = np.random.default_rng(2)
  truth = accounting.gaussian_epsilon(1.0, DELTA)
  scores, included = _gaussian_trials(1.0, 20_000, rng)
  calibration = rates.split_calibration(20_000, 0)
  cross_check = whitebox.one_run_bound(scores, included, calibration, DELTA)
  assert 0.0 < cross_check["one_run_bound"] <= truth


# --- the canaries inside the mechanism ----------------------------------------


def _real_rows():
  grads = jnp.array([[3.0, 4.0], [0.3, 0.4], [6.0, 8.0]])
  return per_example.PerExampleGradients.create(grads)


def _tap(unclipped: bool):
  return whitebox.CanaryTap(mask=jnp.array([1.0, 0.0, 1.0, 0.0]),
                            canary_norm=jnp.float32(100.0),
                            unclipped=jnp.bool_(unclipped))


def test_audit_power_canaries_are_clipped_diracs_in_their_own_leaf():
  mask = jnp.array([1.0, 1.0, 0.0])
  key = jax.random.key(0)
  privatize = lambda contributions, m, sigma: mechanism.privatize(
      contributions, 1.0, m, key, noise_multiplier=sigma, normalizer=2.0)
  alone, _ = privatize(_real_rows(), mask, 0.0)
  joined, joined_mask = _tap(False).attach(_real_rows(), mask)
  real, canaries = _tap(False).detach(privatize(joined, joined_mask, 0.0)[0])
  np.testing.assert_allclose(real, alone)
  # Each sampled canary: clipped from G = 100 to C = 1, on its coordinate.
  np.testing.assert_allclose(canaries, [0.5, 0.0, 0.5, 0.0])
  # Noise: the real leaf's is the run's own (same key, same draw); the
  # auditor leaf gets its own independent N(0, (sigma C)^2).
  noisy_alone, _ = privatize(_real_rows(), mask, 3.0)
  noisy_real, _ = _tap(False).detach(privatize(joined, joined_mask, 3.0)[0])
  np.testing.assert_allclose(noisy_real, noisy_alone, rtol=1e-6)


def test_audit_power_no_clip_patch_removes_every_clip_and_keeps_the_noise():
  mask = jnp.array([1.0, 1.0, 0.0])
  joined, joined_mask = _tap(True).attach(_real_rows(), mask)
  total, stats_ = mechanism.clipped_sum(joined, 1.0, joined_mask)
  real, canaries = total
  np.testing.assert_allclose(real, [3.3, 4.4], rtol=1e-6)  # unclipped sum
  np.testing.assert_allclose(canaries, [100.0, 0.0, 100.0, 0.0])
  assert int(stats_.num_clipped) == 0
  # The correct tap, same rows: clipped to 1 each.
  joined, joined_mask = _tap(False).attach(_real_rows(), mask)
  total, _ = mechanism.clipped_sum(joined, 1.0, joined_mask)
  np.testing.assert_allclose(total[1], [1.0, 0.0, 1.0, 0.0])


def test_audit_power_canary_sampling_is_poisson_over_the_in_canaries_only():
  included = whitebox.inclusion_coins(20_000, seed=0)
  coins = randomness.MechanismCoins.insecure_from_seed(0)
  schedule = whitebox.CanarySchedule(
      included, 0.1, whitebox.canary_sampler_seed(coins), 100.0, False)
  masks = np.stack([np.asarray(schedule(t).mask) for t in range(20)])
  assert np.all(masks[:, ~included] == 0)  # out canaries: never inserted
  rate = masks[:, included].mean()
  assert rate == pytest.approx(0.1, abs=0.005)
  # Its own stream: not the real batches' (seed, t) stream.
  assert whitebox.canary_sampler_seed(coins) != coins.sampler_seed
  np.testing.assert_array_equal(masks[3], np.asarray(schedule(3).mask))


def test_audit_power_mechanism_patches_scale_the_calibrated_sigma():
  assert [whitebox.noise_factor(m) for m in whitebox.MECHANISMS] == [
      1.0, 0.0, 0.5, 1.0]
  assert whitebox.noise_factor("noise_x0.8") == 0.8
  for bad in ("noise_x1", "noise_x-0.1", "noise_xabc", "adamix"):
    with pytest.raises(ValueError):
      whitebox.noise_factor(bad)
  with pytest.raises(SystemExit):
    cli.parse_args(["--mechanisms", "correct,noise_x2"])


# --- the audited digits run ---------------------------------------------------

NUM_CANARIES = 200_000
AUDIT = whitebox.WhiteBoxConfig(num_canaries=NUM_CANARIES)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
  config = blackbox.digits_config(seed=0)
  workdir = str(tmp_path_factory.mktemp("audit_power_digits"))
  blackbox.prepare(config, workdir)
  data = stages.load_seed(config, stages.Workdir(workdir), 0)
  # The default (noise-aware, full-batch) AdaMix run with T capped at 100
  # (the features and public start do not depend on it).
  config.rules.max_steps = 100
  return config, data


@pytest.fixture(scope="module")
def audited(digits):
  """(epsilon, mechanism) -> (CanaryRun, WhiteBoxResult), each run once."""
  config, data = digits
  cache = {}

  def get(epsilon, mechanism_name):
    if (epsilon, mechanism_name) not in cache:
      run = whitebox.run_canaries(config, data, epsilon, mechanism_name,
                                  AUDIT)
      cache[epsilon, mechanism_name] = (run, whitebox.bound(
          run, config.delta, AUDIT, one_run=False))
    return cache[epsilon, mechanism_name]

  return get


def test_audit_power_run_is_the_recipe_run(digits, audited):
  # The canaries change nothing the model sees: the audited run's head is
  # the head ``recipe.train_dp`` releases with the same coins and config.
  config, data = digits
  run, _ = audited(1.0, "correct")
  reference = recipe_lib.make_recipe(config).train_dp(
      "adamix", 1.0, 0, data,
      coins=randomness.MechanismCoins.insecure_from_seed(AUDIT.train_seed))
  np.testing.assert_allclose(linear.stack(run.params),
                             linear.stack(reference.params), rtol=1e-5,
                             atol=1e-6)
  assert run.thresholds.max() < AUDIT.canary_norm  # every canary clipped


def test_audit_power_digits_correct_stays_below_epsilon(audited):
  run, result = audited(1.0, "correct")
  print(result)
  assert run.sampling_rate == 1.0 and len(run.thresholds) == 100
  assert run.step_config.noise_multiplier == pytest.approx(
      accounting.calibrate_noise_multiplier(1.0, DELTA, 1.0, 100))
  assert result.epsilon_as_run <= 1.0
  assert 0.2 < result.lower_bound <= 1.0  # sound, and not vacuous
  assert result.consistent


@pytest.mark.parametrize("epsilon", [1.0, 2.0])
@pytest.mark.parametrize("broken", ["no_noise", "no_clip"])
def test_audit_power_digits_catches_no_noise_and_no_clip(audited, epsilon,
                                                         broken):
  _, result = audited(epsilon, broken)
  print(result)
  assert math.isinf(result.epsilon_as_run)
  assert result.lower_bound > epsilon + 5.0  # far above: near the ceiling
  assert not result.consistent


def test_audit_power_digits_catches_half_noise_at_epsilon_1(audited):
  run, result = audited(1.0, "half_noise")
  print(result)
  assert run.step_config.noise_multiplier == pytest.approx(
      run.noise_multiplier / 2)
  assert result.epsilon_as_run > 2.0  # the accountant's eps of sigma / 2
  assert result.lower_bound > 1.0
  assert not result.consistent


# --- the command line ---------------------------------------------------------


def test_audit_power_cli_writes_one_record_per_pair_and_fails_on_violation(
    monkeypatch, tmp_path):
  certified = {"correct": 0.5, "no_noise": 11.0, "half_noise": 1.4,
               "no_clip": 11.0}

  def fake_audit(config, data, epsilon, mechanism_name, audit_config,
                 progress=None, one_run=True):
    del config, data, progress, one_run
    fields = {f: 0 for f in whitebox.WhiteBoxResult.__dataclass_fields__}
    fields.update(epsilon=epsilon, mechanism=mechanism_name,
                  lower_bound=certified[mechanism_name],
                  epsilon_as_run=math.inf, max_certifiable=11.1,
                  direction="high_is_in",
                  num_canaries=audit_config.num_canaries)
    return whitebox.WhiteBoxResult(**fields)

  monkeypatch.setattr(cli.blackbox, "prepare", lambda config, workdir: None)
  monkeypatch.setattr(cli.stages, "load_seed", lambda *args: None)
  monkeypatch.setattr(cli.whitebox, "audit", fake_audit)
  out = tmp_path / "out.json"
  argv = ["--epsilons", "1", "2", "--mechanisms",
          "correct,no_noise,half_noise,no_clip", "--json", str(out)]
  assert cli.main(argv) == 0
  written = json.loads(out.read_text())  # standard JSON: inf written as null
  pairs = [(r["epsilon"], r["mechanism"]) for r in written["records"]]
  assert pairs == [(e, m) for e in (1.0, 2.0) for m in whitebox.MECHANISMS]
  assert all(r["epsilon_as_run"] is None for r in written["records"])
  assert written["audit_config"]["num_canaries"] == 1_000_000
  assert "--mechanisms correct,no_noise,half_noise,no_clip" in (
      written["command"])
  certified["correct"] = 1.2  # above epsilon 1: a violation
  assert cli.main(argv) == 1
