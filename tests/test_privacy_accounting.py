"""invariant 5 (docs/design.md): the ledger is the source of truth for epsilon.

Reference values, calibration round trips (never above the target), PLD vs
RDP, full batch as plain Gaussian composition (checked against the exact
analytic Gaussian), and the ``PrivacyLedger`` that records, composes,
persists and refuses steps over budget. PLD calls take up to ~1 s each, so
they are kept few.
"""

from __future__ import annotations

import json
import math
import os
import re

import dp_accounting
import pytest
from scipy import optimize
from scipy import stats

from adamix_jax.privacy import accounting
from adamix_jax.privacy import BudgetExceededError
from adamix_jax.privacy import calibrate_noise_multiplier
from adamix_jax.privacy import compute_epsilon
from adamix_jax.privacy import dp_sgd_event
from adamix_jax.privacy import PrivacyLedger
from adamix_jax.privacy.accounting import LedgerEntry

DELTA = 1e-5


def _exact_gaussian_epsilon(sigma: float, delta: float) -> float:
  """Tight epsilon of one Gaussian mechanism, sensitivity 1 (Balle & Wang)."""
  def delta_at(eps):
    return (stats.norm.cdf(0.5 / sigma - eps * sigma) -
            math.exp(eps) * stats.norm.cdf(-0.5 / sigma - eps * sigma) - delta)
  return optimize.brentq(delta_at, 0.0, 500.0)


def test_accounting_reference_values_dp_sgd():
  """q=0.01, sigma=1.1, T=10k, delta=1e-5 (Abadi et al.'s MNIST setting)."""
  eps_pld = compute_epsilon(1.1, 0.01, 10_000, DELTA)
  eps_rdp = compute_epsilon(1.1, 0.01, 10_000, DELTA, "rdp")
  assert eps_pld == pytest.approx(5.19, abs=0.02)
  assert eps_rdp == pytest.approx(5.63, abs=0.02)
  assert eps_pld <= eps_rdp
  # More steps, less noise, more sampling: each costs more.
  assert compute_epsilon(1.1, 0.01, 20_000, DELTA, "rdp") > eps_rdp
  assert compute_epsilon(0.9, 0.01, 10_000, DELTA, "rdp") > eps_rdp
  assert compute_epsilon(1.1, 0.02, 10_000, DELTA, "rdp") > eps_rdp
  assert compute_epsilon(1.1, 0.01, 0, DELTA) == 0.0


@pytest.mark.parametrize("sigma,q,steps", [(0.8, 0.05, 300), (3.0, 1.0, 20)])
def test_accounting_pld_not_above_rdp(sigma, q, steps):
  eps_pld = compute_epsilon(sigma, q, steps, DELTA, "pld")
  eps_rdp = compute_epsilon(sigma, q, steps, DELTA, "rdp")
  assert 0 < eps_pld <= eps_rdp
  assert eps_pld > 0.7 * eps_rdp  # both account the same mechanism


def test_accounting_full_batch_is_plain_gaussian_composition():
  sigma, steps = 5.0, 100
  event = dp_sgd_event(sigma, 1.0, steps)
  assert event == dp_accounting.SelfComposedDpEvent(
      dp_accounting.GaussianDpEvent(sigma), steps)
  # T Gaussians of std sigma compose to one Gaussian of std sigma / sqrt(T).
  exact = _exact_gaussian_epsilon(sigma / math.sqrt(steps), DELTA)
  assert compute_epsilon(sigma, 1.0, steps, DELTA) == pytest.approx(exact,
                                                                    rel=1e-3)
  assert compute_epsilon(sigma, 1.0, steps, DELTA, "rdp") >= exact
  # Poisson subsampling is only used below q = 1, and it amplifies privacy.
  sub = dp_sgd_event(sigma, 0.5, steps)
  assert isinstance(sub.event, dp_accounting.PoissonSampledDpEvent)
  assert compute_epsilon(sigma, 0.5, steps, DELTA, "rdp") < compute_epsilon(
      sigma, 1.0, steps, DELTA, "rdp")


@pytest.mark.parametrize("target,q,steps,accountant", [
    (1.0, 0.01, 10_000, "rdp"),
    (3.0, 0.01, 10_000, "rdp"),
    (8.0, 0.01, 10_000, "rdp"),
    (3.0, 1.0, 100, "rdp"),
    (3.0, 1.0, 100, "pld"),  # full batch noisy GD
    (2.0, 0.02, 500, "pld"),
])
def test_accounting_calibration_round_trip(target, q, steps, accountant):
  sigma = calibrate_noise_multiplier(target, DELTA, q, steps, accountant)
  eps = compute_epsilon(sigma, q, steps, DELTA, accountant)
  assert eps <= target  # never above: errs on the private side
  assert eps >= 0.99 * target  # and not needlessly noisy
  # Minimal: 1% less noise would overshoot the target.
  assert compute_epsilon(sigma / 1.01, q, steps, DELTA, accountant) > target


def test_accounting_calibration_full_batch_matches_analytic_gaussian():
  sigma = calibrate_noise_multiplier(3.0, DELTA, 1.0, 100, "pld")
  exact = _exact_gaussian_epsilon(sigma / 10.0, DELTA)
  assert exact <= 3.0 * (1 + 1e-3)
  assert exact >= 0.99 * 3.0


def test_accounting_ledger_records_and_merges_consecutive_steps():
  ledger = PrivacyLedger(delta=DELTA)
  assert ledger.total_steps == 0 and ledger.epsilon() == 0.0
  for _ in range(3):
    ledger.record(1.1, 0.01)
  ledger.record(0.9, 0.01)
  ledger.record(0.9, 0.01, steps=5)
  ledger.record(1.1, 0.01)
  ledger.record(1.1, 0.02)
  got = [(e.noise_multiplier, e.sampling_rate, e.steps) for e in ledger.entries]
  assert got == [(1.1, 0.01, 3), (0.9, 0.01, 6), (1.1, 0.01, 1),
                 (1.1, 0.02, 1)]
  assert ledger.total_steps == 11


def test_accounting_ledger_single_segment_equals_compute_epsilon():
  ledger = PrivacyLedger(delta=DELTA)
  for _ in range(400):
    ledger.record(1.1, 0.01, steps=25)
  assert len(ledger.entries) == 1 and ledger.total_steps == 10_000
  assert ledger.epsilon() == compute_epsilon(1.1, 0.01, 10_000, DELTA)
  assert ledger.epsilon("rdp") == compute_epsilon(1.1, 0.01, 10_000, DELTA,
                                                  "rdp")
  assert ledger.epsilon() == pytest.approx(5.19, abs=0.02)


def test_accounting_ledger_mixed_sigmas_compose():
  ledger = PrivacyLedger(delta=DELTA)
  ledger.record(1.1, 0.01, steps=1000)
  ledger.record(0.9, 0.01, steps=500)
  assert len(ledger.entries) == 2
  part_a = compute_epsilon(1.1, 0.01, 1000, DELTA)
  part_b = compute_epsilon(0.9, 0.01, 500, DELTA)
  for accountant in ("pld", "rdp"):
    acc = accounting.make_accountant(accountant)
    acc.compose(dp_sgd_event(1.1, 0.01, 1000))
    acc.compose(dp_sgd_event(0.9, 0.01, 500))
    assert ledger.epsilon(accountant) == pytest.approx(
        acc.get_epsilon(DELTA), rel=1e-6)
  eps = ledger.epsilon()
  # Composition costs more than either part, less than their sum.
  assert max(part_a, part_b) < eps < part_a + part_b


def test_accounting_ledger_json_round_trip(tmp_path):
  ledger = PrivacyLedger(delta=DELTA, target_epsilon=4.0)
  ledger.record(1.1, 0.01, steps=700)
  ledger.record(1.5, 1.0, steps=3)
  path = os.path.join(tmp_path, "sub", "ledger.json")
  ledger.save(path)
  assert os.listdir(os.path.dirname(path)) == ["ledger.json"]  # no temp left
  with open(path) as f:
    data = json.load(f)
  assert data["total_steps"] == 703
  assert data["epsilon_pld"] == pytest.approx(ledger.epsilon())
  loaded = PrivacyLedger.load(path)
  assert loaded.entries == ledger.entries
  assert loaded.total_steps == ledger.total_steps
  assert loaded.target_epsilon == 4.0 and loaded.delta == DELTA
  assert loaded.epsilon() == ledger.epsilon()
  # A resumed ledger keeps merging where the old one stopped.
  loaded.record(1.5, 1.0)
  assert loaded.entries[-1].steps == 4
  # A corrupt ledger is an error, not a fresh (empty) budget.
  with open(path, "w") as f:
    f.write("{not json")
  with pytest.raises(ValueError, match="ledger"):
    PrivacyLedger.load(path)


def test_accounting_check_budget_raises_and_says_by_how_much():
  ledger = PrivacyLedger(delta=DELTA, target_epsilon=3.0)
  ledger.record(1.1, 0.01, steps=1000)
  spent = ledger.epsilon()
  # Within budget: returns the epsilon after, records nothing.
  after = ledger.check_budget(1.1, 0.01, 1000)
  assert spent < after <= 3.0
  assert ledger.total_steps == 1000
  with pytest.raises(BudgetExceededError) as info:
    ledger.check_budget(1.1, 0.01, 100_000)
  message = str(info.value)
  would_be = ledger.epsilon(extra=(1.1, 0.01, 100_000))
  over = float(re.search(r"by (\d+\.\d+)", message).group(1))
  assert over == pytest.approx(would_be - 3.0, abs=1e-3)
  assert f"{would_be:.4f}" in message and "3.0000" in message
  assert ledger.total_steps == 1000
  # No target: never refuses.
  free = PrivacyLedger(delta=DELTA)
  assert free.check_budget(1.1, 0.01, 100) > 0


def test_budget_guard_check_step_refuses_the_first_step_past_the_target():
  # The target fits exactly 50 steps: the 51st is refused before it is taken.
  target = compute_epsilon(1.1, 0.05, 50, DELTA)
  ledger = PrivacyLedger(delta=DELTA, target_epsilon=target)
  ledger.approve(1.1, 0.05, 50)
  for _ in range(50):
    ledger.check_step(1.1, 0.05)
    ledger.record(1.1, 0.05)
  with pytest.raises(BudgetExceededError, match="over the target"):
    ledger.check_step(1.1, 0.05)
  assert ledger.total_steps == 50
  with pytest.raises(BudgetExceededError, match=r"by \d"):
    PrivacyLedger(delta=DELTA, target_epsilon=target).approve(1.1, 0.05, 51)


def test_budget_guard_plan_does_not_cover_steps_recorded_outside_it():
  # 50 steps at sigma=1.1 were approved, then a noisier-than-planned
  # (sigma=0.5) step was recorded: the plan no longer bounds epsilon, so the
  # next planned step is checked in full and refused.
  target = compute_epsilon(1.1, 0.05, 50, DELTA)
  ledger = PrivacyLedger(delta=DELTA, target_epsilon=target)
  ledger.approve(1.1, 0.05, 50)
  ledger.record(0.5, 0.05)
  with pytest.raises(BudgetExceededError):
    ledger.check_step(1.1, 0.05)
  # Restored entries (a resume) also drop the plan.
  ledger = PrivacyLedger(delta=DELTA, target_epsilon=target)
  ledger.approve(1.1, 0.05, 50)
  ledger.replace_entries([LedgerEntry(1.1, 0.05, 50)])
  with pytest.raises(BudgetExceededError):
    ledger.check_step(1.1, 0.05)


def test_accounting_zero_noise_is_infinite_epsilon():
  assert compute_epsilon(0.0, 0.01, 10, DELTA) == math.inf
  ledger = PrivacyLedger(delta=DELTA, target_epsilon=100.0)
  ledger.record(1.1, 0.01, steps=10)
  with pytest.raises(BudgetExceededError):
    ledger.check_budget(0.0, 0.01, 1)
  ledger.record(0.0, 1.0, steps=1)
  assert ledger.epsilon() == math.inf
  assert ledger.epsilon("rdp") == math.inf


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 2.0])
def test_accounting_invalid_delta_raises(delta):
  with pytest.raises(ValueError):
    compute_epsilon(1.1, 0.01, 10, delta)
  with pytest.raises(ValueError):
    PrivacyLedger(delta=delta)
  with pytest.raises(ValueError):
    calibrate_noise_multiplier(1.0, delta, 0.01, 10)


def test_accounting_invalid_arguments_raise():
  for target in (0.0, -1.0):
    with pytest.raises(ValueError):
      calibrate_noise_multiplier(target, DELTA, 0.01, 10)
    with pytest.raises(ValueError):
      PrivacyLedger(delta=DELTA, target_epsilon=target)
  with pytest.raises(ValueError):
    calibrate_noise_multiplier(1.0, DELTA, 0.01, 0)
  for sigma, q, steps in [(-1.0, 0.01, 10), (1.0, 0.0, 10), (1.0, 1.5, 10),
                          (1.0, 0.01, -1)]:
    with pytest.raises(ValueError):
      dp_sgd_event(sigma, q, steps)
  with pytest.raises(ValueError):
    compute_epsilon(1.1, 0.01, 10, DELTA, "moments")
  # A NaN noise multiplier is an error, not epsilon 0 (as RDP would say).
  with pytest.raises(ValueError):
    compute_epsilon(float("nan"), 0.01, 10, DELTA, "rdp")


@pytest.mark.parametrize("sigma,q,steps", [
    (1.1, 0.01, -1),  # would silently shrink the recorded spend
    (1.1, 0.01, 1.5),
    (-1.0, 0.01, 1),
    (1.1, 0.0, 1),
    (1.1, 1.5, 1),
    (float("nan"), 0.01, 1),
])
def test_accounting_ledger_rejects_invalid_records(sigma, q, steps):
  ledger = PrivacyLedger(delta=DELTA)
  ledger.record(1.1, 0.01, steps=100)
  before = ledger.epsilon("rdp")
  with pytest.raises(ValueError):
    ledger.record(sigma, q, steps)
  assert ledger.total_steps == 100
  assert ledger.epsilon("rdp") == before
  # The same entry in a saved ledger is refused at load time.
  data = ledger.to_dict()
  data["entries"].append({"noise_multiplier": sigma, "sampling_rate": q,
                          "steps": steps})
  with pytest.raises(ValueError):
    PrivacyLedger.from_dict(data)


@pytest.mark.parametrize("sigma,steps", [(3.0, 1), (40.0, 500), (257.0, 4753)])
def test_accounting_full_batch_pld_is_exact_composed_gaussian(sigma, steps):
  # The closed form (one Gaussian at sigma / sqrt(T), analytic epsilon)
  # against dp_accounting's discretised PLD of the T-fold composition: the
  # discretisation is pessimistic, so the exact value is at most it, and
  # close to it. A wrong scaling (sigma / T, or no composition) is far off.
  ours = compute_epsilon(sigma, 1.0, steps, DELTA)
  acc = accounting.make_accountant("pld")
  acc.compose(dp_sgd_event(sigma, 1.0, steps))
  discretised = acc.get_epsilon(DELTA)
  assert ours <= discretised * (1 + 1e-6)
  assert ours == pytest.approx(discretised, rel=2e-3)
  assert ours == pytest.approx(
      _exact_gaussian_epsilon(sigma / math.sqrt(steps), DELTA), rel=1e-6)
  # Rounded up: the guarantee holds at the reported epsilon.
  loss = dp_accounting.pld.privacy_loss_mechanism.GaussianPrivacyLoss(
      sigma / math.sqrt(steps))
  assert loss.get_delta_for_epsilon(ours) <= DELTA


def test_accounting_full_batch_calibration_is_sigma_1_times_sqrt_steps():
  sigma_1 = calibrate_noise_multiplier(2.0, DELTA, 1.0, 1)
  for steps in (4, 900):
    sigma = calibrate_noise_multiplier(2.0, DELTA, 1.0, steps)
    assert sigma == pytest.approx(sigma_1 * math.sqrt(steps), rel=1e-8)
    # Independently (discretised PLD of the T-fold composition): on target.
    acc = accounting.make_accountant("pld")
    acc.compose(dp_sgd_event(sigma, 1.0, steps))
    assert acc.get_epsilon(DELTA) == pytest.approx(2.0, rel=2e-3)
    assert compute_epsilon(sigma, 1.0, steps, DELTA) <= 2.0
    assert compute_epsilon(sigma / 1.001, 1.0, steps, DELTA) > 2.0


def test_accounting_ledger_full_batch_segments_compose_exactly():
  # Two full-batch segments at different sigmas (a resume with another
  # plan): one Gaussian at (sum T_i / sigma_i^2)^-1/2, as the discretised
  # PLD composition says; a Poisson segment falls back to the PLD event.
  ledger = PrivacyLedger(delta=DELTA)
  ledger.record(30.0, 1.0, steps=100)
  ledger.record(60.0, 1.0, steps=400)
  assert accounting.full_batch_sigma([(30.0, 1.0, 100), (60.0, 1.0, 400)]) == (
      pytest.approx((100 / 900 + 400 / 3600) ** -0.5))
  acc = accounting.make_accountant("pld")
  acc.compose(dp_sgd_event(30.0, 1.0, 100))
  acc.compose(dp_sgd_event(60.0, 1.0, 400))
  assert ledger.epsilon() == pytest.approx(acc.get_epsilon(DELTA), rel=2e-3)
  assert ledger.epsilon() <= acc.get_epsilon(DELTA) * (1 + 1e-6)
  assert ledger.epsilon() == pytest.approx(
      _exact_gaussian_epsilon((100 / 900 + 400 / 3600) ** -0.5, DELTA),
      rel=1e-6)
  with pytest.raises(ValueError, match="q = 1"):
    accounting.full_batch_sigma([(1.0, 0.5, 3)])


@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_budget_guard_approves_every_full_batch_calibration(target):
  # The calibrated sigma must pass the ledger's own check for the planned
  # run: both evaluate the same float expression (a run of 131 steps at
  # epsilon 8 was refused by a last-bit difference: "over by 0.0000").
  for steps in (1, 20, 131, 382, 4753, 9342):
    sigma = calibrate_noise_multiplier(target, DELTA, 1.0, steps)
    ledger = PrivacyLedger(delta=DELTA, target_epsilon=target)
    assert ledger.approve(sigma, 1.0, steps) <= target
    for _ in range(min(3, steps)):
      ledger.check_step(sigma, 1.0)
      ledger.record(sigma, 1.0)
    assert ledger.epsilon() <= target
    # A resumed run: the ledger holds the first k steps as one entry and
    # approves the rest (fit's order); split or not, the same epsilon.
    for done in (1, steps // 3, steps - 1):
      if 0 < done < steps:
        resumed = PrivacyLedger(delta=DELTA, target_epsilon=target)
        resumed.record(sigma, 1.0, steps=done)
        assert resumed.approve(sigma, 1.0, steps - done) == (
            ledger.epsilon(extra=(sigma, 1.0, steps - min(3, steps))))
