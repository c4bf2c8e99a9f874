"""The one-run privacy audit: sound on AdaMix, and able to fail.

Statistics first (no training): on simulated randomised response, whose
epsilon is known exactly, the lower bound must stay below the truth and come
reasonably close to it. Then the audit of record (AuditConfig defaults) on
the digits AdaMix configuration: at epsilon 1 and 8 the bound is at most
epsilon, and with the noise switched off it exceeds the configured epsilon.
"""

import dataclasses
import itertools
import math

import numpy as np
import pytest

from adamix_jax.audit import bounds
from adamix_jax.audit import canaries as canaries_lib
from adamix_jax.audit import run as audit_run
from adamix_jax.experiment import recipe as recipe_lib
from adamix_jax.experiment import stages

DELTA = 1e-5


def _randomized_response_counts(epsilon: float, num_guesses: int,
                                seed: int) -> bounds.AuditCounts:
  """An exactly epsilon-DP mechanism: each guess right w.p. e^eps/(1+e^eps)."""
  accuracy = 1.0 / (1.0 + math.exp(-epsilon))
  rng = np.random.default_rng(seed)
  correct = int(np.sum(rng.random(num_guesses) < accuracy))
  return bounds.AuditCounts(num_guesses, num_guesses, correct)


# --- statistics --------------------------------------------------------------


def test_audit_bound_is_sound_and_close_on_randomized_response():
  counts = _randomized_response_counts(1.0, 10_000, seed=0)
  bound = bounds.epsilon_lower_bound(counts, DELTA)
  assert 0.5 < bound <= 1.0


def test_audit_bound_exceeds_epsilon_rarely_on_randomized_response():
  # Soundness: P[bound > eps] <= beta; 200 independent audits, 0.05 + slack.
  above = sum(
      bounds.epsilon_lower_bound(
          _randomized_response_counts(1.0, 1000, seed), DELTA) > 1.0
      for seed in range(200))
  assert above <= 20


def test_audit_bound_detects_mechanism_twice_as_leaky():
  counts = _randomized_response_counts(2.0, 10_000, seed=0)
  assert bounds.epsilon_lower_bound(counts, DELTA) > 1.0


def test_audit_p_value_increases_with_epsilon():
  counts = bounds.AuditCounts(1000, 200, 150)
  values = [bounds.p_value(counts, eps, DELTA)
            for eps in np.linspace(0.0, 5.0, 51)]
  assert all(a <= b for a, b in itertools.pairwise(values))
  assert values[0] < 1e-3 and values[-1] == pytest.approx(1.0)


def test_audit_bound_increases_with_correct_guesses():
  lower = [bounds.epsilon_lower_bound(bounds.AuditCounts(500, 100, v), DELTA)
           for v in range(50, 101, 5)]
  assert all(a <= b for a, b in itertools.pairwise(lower))
  assert lower[0] == 0.0 and lower[-1] > 2.5


def test_audit_bound_has_p_value_at_most_beta():
  counts = bounds.AuditCounts(200, 80, 70)
  bound = bounds.epsilon_lower_bound(counts, DELTA, beta=0.05)
  assert bounds.p_value(counts, bound, DELTA) <= 0.05
  assert bounds.p_value(counts, bound + 1e-3, DELTA) > 0.05


def test_audit_delta_term_only_weakens_the_bound():
  counts = bounds.AuditCounts(1000, 100, 85)
  for eps in (0.5, 1.0, 2.0):
    assert (bounds.p_value(counts, eps, 1e-3) >=
            bounds.p_value(counts, eps, 0.0))
  assert (bounds.epsilon_lower_bound(counts, 1e-3) <=
          bounds.epsilon_lower_bound(counts, 0.0))


def test_audit_max_certifiable_epsilon_grows_like_log_guesses():
  ceilings = [bounds.max_certifiable_epsilon(1000, r, DELTA)
              for r in (10, 100, 1000)]
  assert ceilings[0] < ceilings[1] < ceilings[2] < 8.0
  assert ceilings[2] - ceilings[1] == pytest.approx(math.log(10), abs=0.3)


@pytest.mark.parametrize("m, r, v", [(10, 11, 5), (10, 5, 6), (10, 5, -1)])
def test_audit_counts_reject_impossible_values(m, r, v):
  with pytest.raises(ValueError):
    bounds.AuditCounts(m, r, v)


# --- canaries and guesses ----------------------------------------------------


def test_audit_canaries_are_unit_distinct_orthogonal_and_seeded():
  c = canaries_lib.make_canaries(200, 64, 10, seed=3)
  np.testing.assert_allclose(np.linalg.norm(c.x, axis=1), 1.0, atol=1e-5)
  pairs = {(tuple(np.round(x, 5)), y) for x, y in zip(c.x, c.y)}
  assert len(pairs) == 200
  gram = c.x @ c.x.T
  same = np.isclose(gram, 1.0, atol=1e-4)
  assert np.all(same | (np.abs(gram) < 1e-4))  # equal or orthogonal
  again = canaries_lib.make_canaries(200, 64, 10, seed=3)
  np.testing.assert_array_equal(c.x, again.x)
  np.testing.assert_array_equal(c.included, again.included)
  assert 70 < c.included.sum() < 130
  with pytest.raises(ValueError):
    canaries_lib.make_canaries(641, 64, 10, seed=0)


def test_audit_guess_counts_top_in_and_bottom_out():
  scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
  included = np.array([True, False, True, False, False, True])
  counts = canaries_lib.guess(scores, included, num_positive=2,
                              num_negative=2)
  # Top two: right, wrong; bottom two: right (1.0 out), wrong (0.0 in).
  assert counts == bounds.AuditCounts(6, 4, 2)


def test_audit_score_sees_the_canary_move_not_the_bias():
  c = canaries_lib.Canaries(x=np.eye(3, dtype=np.float32)[:2],
                            y=np.array([0, 2]),
                            included=np.array([True, False]))
  start = np.zeros((4, 3))
  final = start.copy()
  final[0] += np.array([2.0, -1.0, -1.0])  # canary 0's row, towards label 0
  final[3] += 10.0 * np.array([1.0, 0.0, -1.0])  # bias row: ignored
  np.testing.assert_allclose(canaries_lib.scores(c, final, start), [2.0, 0.0])


def test_audit_config_rejects_invalid_settings():
  with pytest.raises(ValueError):
    audit_run.AuditConfig(num_canaries=10, num_positive=6, num_negative=6)
  with pytest.raises(ValueError):
    audit_run.AuditConfig(num_positive=0, num_negative=0)
  with pytest.raises(ValueError):
    audit_run.AuditConfig(beta=1.0)
  with pytest.raises(ValueError):
    audit_run.AuditConfig(reference="shadow")
  with pytest.raises(dataclasses.FrozenInstanceError):
    audit_run.AuditConfig().num_canaries = 5


# --- the audit of record on digits --------------------------------------------


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
  config = audit_run.digits_config(seed=0)
  workdir = str(tmp_path_factory.mktemp("audit_digits"))
  audit_run.prepare(config, workdir)
  return config, stages.load_seed(config, stages.Workdir(workdir), 0)


def test_audit_step_constants_do_not_depend_on_included_canaries(digits):
  config, data = digits
  plan = audit_run.audit_plan(config, data, 2.0, num_canaries=200)
  # The normaliser is the expected training set size, fixed in advance.
  assert plan.step_config.expected_batch_size == pytest.approx(
      plan.sampling_rate * (len(data.private_y) + 100))
  # Every other constant is the plan of the real private set: T, eta, the
  # geometry, alpha and sigma come from public data and N, not from the
  # canaries a run includes.
  real = recipe_lib.make_recipe(config).plan("adamix", 2.0, data)
  assert plan.steps == real.steps and plan.sampling_rate == real.sampling_rate
  assert dataclasses.replace(
      plan.step_config,
      expected_batch_size=real.step_config.expected_batch_size
  ) == real.step_config
  np.testing.assert_array_equal(plan.feature_map, real.feature_map)
  assert 0 < plan.step_config.public_weight < 1


@pytest.mark.parametrize("epsilon", [1.0, 8.0])
def test_audit_adamix_digits_bound_at_most_epsilon(digits, epsilon):
  config, data = digits
  result = audit_run.audit(config, data, epsilon)
  print(result)
  assert result.noise_multiplier > 0
  assert result.num_guesses == 80 and result.num_canaries == 200
  assert result.lower_bound <= epsilon
  assert result.consistent


def test_audit_fails_on_digits_mechanism_without_noise(digits):
  config, data = digits
  result = audit_run.audit(config, data, 1.0, mechanism="no_noise")
  print(result)
  assert result.noise_multiplier == 0.0
  assert result.lower_bound > 2.0  # well above the configured epsilon 1
  assert not result.consistent
