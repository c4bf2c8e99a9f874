"""The noise-aware rules (adamix/noise_aware.py) and the plans built on them.

Guarantees checked (docs/design.md, invariant 3: hyperparameters come from
public data and (sigma, q, N) only; invariant 4: the accounting matches the
run):

* every plan (DP-SGD, PILLAR, AdaMix) is a function of the public examples
  and (epsilon, delta, N, D, c): replacing every private example by another
  one (same N) leaves T, eta, sigma, C, alpha and the feature map unchanged;
* each plan is full batch (q = 1) with sigma calibrated so that its T steps
  spend at most epsilon, and tightly (a plan that overspends, or wastes the
  budget by calibrating for the wrong T, fails);
* the geometry rule keeps the released noise norm nu(k) below theta, keeps
  the full space when it fits, and fixes the public scale the clip norm
  refers to;
* the schedule shortens with the noise and stays in [min_steps, max_steps];
  where max_steps binds (large N) the steps lengthen up to 1/L so that the
  run still reaches tau, and a plan the cap still cuts short says so;
  a truncated public subspace (AdaMix's high-noise geometry, PILLAR's)
  takes subspace_kappa, every other geometry (DP-SGD's included) kappa;
  the public weight reduces to the paper's n / (n + N) at sigma = 0 and
  trust 1, grows with the noise, and is 0 without public examples;
* DP class prototypes release ONE Gaussian sum: bounded sensitivity sqrt(2)
  per example (huge rows included), noise std sigma_1 sqrt(2) (caught at
  2/3 and 3/2 of it), and a ledger of one full-batch step.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest

from adamix_jax.adamix import noise_aware
from adamix_jax.configs import digits
from adamix_jax.experiment import recipe as recipe_lib
from adamix_jax.models import linear
from adamix_jax.privacy import accounting
from adamix_jax.privacy import randomness
from adamix_jax.privacy import sampler as sampler_lib
from adamix_jax.train import prototypes

DELTA = 1e-5
RULES = noise_aware.Rules()


def _unit_rows(rng, n, dim):
  x = rng.normal(size=(n, dim))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _seed_data(rng, num_private=900, num_public=50, dim=24, classes=5,
               private=None):
  """Unit-norm features (the project's preprocessing) with a class signal."""
  means = rng.normal(size=(classes, dim))

  def draw(n):
    y = rng.integers(0, classes, size=n)
    x = means[y] + 1.5 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y

  public_x, public_y = draw(num_public)
  private_x, private_y = private or draw(num_private)
  test_x, test_y = draw(100)
  head = {"kernel": rng.normal(size=(dim, classes)).astype(np.float32) * 0.1,
          "bias": np.zeros(classes, np.float32)}
  return recipe_lib.SeedData(public_x, public_y, private_x, private_y, test_x,
                             test_y, classes, head, zero_shot=False)


def _recipe():
  config = digits.get_config()
  config.delta = DELTA
  return recipe_lib.make_recipe(config)


@pytest.mark.parametrize("method", ["dp_sgd", "pillar", "adamix"])
@pytest.mark.parametrize("epsilon", [1.0, 8.0])
def test_noise_aware_plan_depends_on_public_data_only(method, epsilon):
  rng = np.random.default_rng(0)
  data = _seed_data(rng)
  n = len(data.private_y)
  other = dataclasses.replace(
      data, private_x=_unit_rows(rng, n, data.private_x.shape[1]) * 0.3,
      private_y=rng.integers(0, data.num_classes, size=n))
  recipe = _recipe()
  a, b = recipe.plan(method, epsilon, data), recipe.plan(method, epsilon,
                                                         other)
  assert a.steps == b.steps and a.sampling_rate == b.sampling_rate
  assert a.step_config == b.step_config  # sigma, eta, C, alpha, q N
  assert a.info == b.info
  if a.feature_map is None:
    assert b.feature_map is None
  else:
    np.testing.assert_array_equal(a.feature_map, b.feature_map)
  # ...while the public examples do move it (the rules are not constants).
  moved = dataclasses.replace(data, public_x=data.public_x[::-1] * 0.5 +
                              _unit_rows(rng, len(data.public_y),
                                         data.public_x.shape[1]) * 0.5)
  c = recipe.plan(method, epsilon, moved)
  assert (c.step_config != a.step_config or c.steps != a.steps)


@pytest.mark.parametrize("method", ["dp_sgd", "pillar", "adamix"])
@pytest.mark.parametrize("epsilon", [1.0, 3.0, 8.0])
def test_noise_aware_plan_spends_at_most_epsilon_tightly(method, epsilon):
  data = _seed_data(np.random.default_rng(1))
  plan = _recipe().plan(method, epsilon, data)
  assert plan.sampling_rate == 1.0  # full batch: the rules' regime
  assert plan.step_config.expected_batch_size == len(data.private_y)
  assert RULES.min_steps <= plan.steps <= RULES.max_steps
  sigma = plan.step_config.noise_multiplier
  spent = accounting.compute_epsilon(sigma, 1.0, plan.steps, DELTA)
  assert spent <= epsilon * (1 + 1e-6)
  assert spent >= 0.99 * epsilon  # not calibrated for another T
  assert plan.step_config.clip_norm == RULES.clip_norm
  # T full-batch Gaussian releases compose to one at sigma / sqrt(T).
  sigma_1 = noise_aware.single_release_sigma(epsilon, DELTA)
  assert sigma / math.sqrt(plan.steps) == pytest.approx(sigma_1, rel=0.02)


def test_noise_aware_geometry_keeps_released_noise_norm_below_theta():
  rng = np.random.default_rng(2)
  public = np.asarray(linear.augment(_unit_rows(rng, 60, 40)))
  n_priv, classes = 1000, 10
  for sigma_1, kind in ((0.05, "full"), (3.0, "full"), (10.0, "subspace"),
                        (20.0, "subspace")):
    geometry = noise_aware.public_geometry(public, sigma_1, n_priv, classes,
                                           RULES)
    assert geometry.kind == kind, sigma_1
    if kind == "full":
      assert geometry.dim == public.shape[1]
    else:
      assert 1 <= geometry.dim <= len(public) - 1
      nu = noise_aware.released_noise_norm(sigma_1, RULES.clip_norm,
                                           geometry.dim, classes, n_priv)
      # The largest k that fits (unless capped at 1).
      assert nu <= RULES.theta or geometry.dim == 1
      if 1 < geometry.dim < len(public) - 1:
        assert noise_aware.released_noise_norm(
            sigma_1, RULES.clip_norm, geometry.dim + 1, classes,
            n_priv) > RULES.theta
    # The scale C refers to: median public ||z|| = sqrt(2).
    z_norms = np.linalg.norm(public @ geometry.feature_map, axis=1)
    assert np.median(z_norms) == pytest.approx(math.sqrt(2), rel=1e-4)
  more_noise = [noise_aware.public_geometry(public, s, n_priv, classes,
                                            RULES).dim for s in (10.0, 20.0)]
  assert more_noise[0] > more_noise[1]


@pytest.mark.parametrize("num_public", [50, 100, 205])
def test_noise_aware_geometry_is_the_one_whose_noise_norm_is_nearest_theta(
    num_public):
  """Between "the public span fills the noise budget" and "the full space
  fits it", the geometry is the candidate whose released noise norm is
  nearer theta as a ratio: the n - 1 public directions when they spend
  most of it, the full space once they would leave more unspent than the
  full space overspends (Fashion-MNIST-like D = 1281; the first rule kept
  49 directions at N = 4000, epsilon 1, where k_theta ~ 1150)."""
  dim, classes = 1281, 10
  sigma_1 = noise_aware.single_release_sigma(1.0, DELTA)
  kinds = []
  for n_priv in (300, 1000, 2000, 4000, 6000):
    kind, k = noise_aware.geometry_choice(dim, num_public, sigma_1, n_priv,
                                          classes, RULES)
    nu = lambda d: noise_aware.released_noise_norm(  # pylint: disable=cell-var-from-loop
        sigma_1, RULES.clip_norm, d, classes, n_priv) / RULES.theta
    budget = noise_aware.noisy_dim_budget(sigma_1, n_priv, classes, RULES)
    span = max(1, min(num_public - 1, budget))
    if nu(dim) <= 1:
      assert (kind, k) == ("full", dim)
    elif budget <= num_public - 1:  # the span spends the budget exactly
      assert (kind, k) == ("subspace", budget)
    else:
      assert kind == ("full" if budget >= math.sqrt(dim * (num_public - 1))
                      else "subspace")
      chosen, other = (nu(dim), nu(span)) if kind == "full" else (
          nu(span), nu(dim))
      assert abs(math.log(chosen)) <= abs(math.log(other))
    kinds.append(kind)
  # More private examples never go back from the full space to a subspace.
  assert kinds == sorted(kinds, key=lambda kind: kind == "full")
  assert kinds[0] == "subspace" and kinds[-1] == "full"
  if num_public == 50:  # the case the first rule got wrong
    public = np.asarray(linear.augment(_unit_rows(np.random.default_rng(3),
                                                  50, dim - 1)))
    geometry = noise_aware.public_geometry(public, sigma_1, 4000, classes,
                                           RULES)
    assert (geometry.kind, geometry.dim) == ("full", dim)


def test_noise_aware_schedule_shortens_with_noise_and_stays_in_range():
  rng = np.random.default_rng(3)
  public_z = np.asarray(linear.augment(_unit_rows(rng, 50, 20)))
  steps = []
  for sigma_1 in (0.5, 2.0, 8.0, 1e3):
    t, eta = noise_aware.schedule(public_z, 21, sigma_1, 2000, 10, RULES)
    assert RULES.min_steps <= t <= RULES.max_steps
    steps.append(t)
  assert steps == sorted(steps, reverse=True) and steps[0] > steps[-1]
  assert steps[-1] == RULES.min_steps  # huge noise: the floor
  # eta = 1 / (2 L), L = lambda_max(Z^T Z / n) / 2.
  _, eta = noise_aware.schedule(public_z, 21, 1.0, 2000, 10, RULES)
  lam = np.linalg.eigvalsh(public_z.T @ public_z / len(public_z)).max()
  assert eta == pytest.approx(1.0 / lam, rel=1e-5)
  assert noise_aware.schedule(public_z, 21, 0.0, 2000, 10,
                              RULES)[0] == RULES.max_steps


def test_noise_aware_schedule_takes_subspace_kappa_in_a_truncated_geometry():
  rng = np.random.default_rng(3)
  public_z = np.asarray(linear.augment(_unit_rows(rng, 50, 20)))
  rules = dataclasses.replace(RULES, kappa=30.0, subspace_kappa=10.0,
                              max_steps=10**6)
  full, eta = noise_aware.schedule(public_z, 21, 2.0, 2000, 10, rules)
  sub, eta_sub = noise_aware.schedule(public_z, 21, 2.0, 2000, 10, rules,
                                      "subspace")
  assert eta_sub == eta
  # tau = kappa N / (sigma_1 C sqrt(c D_ref) (D / D_ref)^p), T = tau / eta.
  tau = 30.0 * 2000 / (2.0 * rules.clip_norm * math.sqrt(10 * 64.0) *
                       (21 / 64.0) ** 0.25)
  assert full == round(tau / eta)
  assert sub == round(tau / 3.0 / eta)
  assert noise_aware.schedule(public_z, 21, 2.0, 2000, 10, rules,
                              "pca")[0] == sub
  for other in ("full", "none"):
    assert noise_aware.schedule(public_z, 21, 2.0, 2000, 10, rules,
                                other)[0] == full


def test_noise_aware_schedule_falls_with_the_dimension_power():
  # tau scales as D_z^-p: p = 1/4 by default; p = 1/2 is the
  # parameter-noise norm's sqrt(D_z c) of the first rule; at D_ref the
  # power does not matter. Large N keeps T far from the caps and rounding.
  rng = np.random.default_rng(3)
  public_z = np.asarray(linear.augment(_unit_rows(rng, 50, 20)))
  rules = dataclasses.replace(RULES, min_steps=1, max_steps=10**9)
  assert (rules.reference_dim, rules.dim_power) == (64.0, 0.25)

  def steps(dim, **change):
    return noise_aware.schedule(public_z, dim, 1.0, 10**7, 10,
                                dataclasses.replace(rules, **change))[0]

  assert steps(64 * 16) / steps(64) == pytest.approx(16 ** -0.25, rel=1e-4)
  assert steps(64 * 16, dim_power=0.5) / steps(64, dim_power=0.5) == (
      pytest.approx(0.25, rel=1e-4))
  assert steps(64, dim_power=0.5) == steps(64) == steps(64, dim_power=0.0)
  # p = 1/2 is the first rule, tau = kappa N / (sigma_1 C sqrt(D c)).
  _, eta = noise_aware.schedule(public_z, 1281, 1.0, 10**7, 10, rules)
  assert steps(1281, dim_power=0.5) == round(
      rules.kappa * 10**7 / (rules.clip_norm * math.sqrt(1281 * 10)) / eta)


def test_noise_aware_step_cap_lengthens_steps_before_it_cuts_tau():
  # Large N: tau / eta(1/(2L)) passes max_steps. The capped run must still
  # reach tau (longer, stable steps, eta <= 1/L) and only where even 1/L
  # cannot, fall short; a plain cap (eta fixed, T clipped) fails both.
  rng = np.random.default_rng(3)
  public_z = np.asarray(linear.augment(_unit_rows(rng, 50, 20)))
  rules = dataclasses.replace(RULES, max_steps=1000)
  lam = np.linalg.eigvalsh(public_z.T @ public_z / len(public_z)).max()
  one_over_l = 2.0 / lam
  tau = noise_aware.step_budget(21, 1.0, 10**5, 10, rules)
  small_n = 10**5 * (0.75 * rules.max_steps * one_over_l) / tau
  for n, reaches in ((int(small_n), True), (10**5, False)):
    tau_n = noise_aware.step_budget(21, 1.0, n, 10, rules)
    assert tau_n / (one_over_l / 2) > rules.max_steps  # the cap would bind
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      steps, eta = noise_aware.schedule(public_z, 21, 1.0, n, 10, rules)
    # A warning exactly where the cap cuts tau short.
    shortening = [w for w in caught if "shortens" in str(w.message)]
    assert len(shortening) == (0 if reaches else 1)
    assert steps == rules.max_steps
    assert eta <= one_over_l * (1 + 1e-6)
    if reaches:
      assert eta * steps == pytest.approx(tau_n, rel=1e-6)
    else:
      assert eta == pytest.approx(one_over_l, rel=1e-6)
      assert eta * steps < tau_n
  # Below the cap nothing changes: eta = 1 / (2L).
  steps, eta = noise_aware.schedule(public_z, 21, 1.0, 100, 10, rules)
  assert eta == pytest.approx(one_over_l / 2, rel=1e-6)
  assert steps < rules.max_steps


def test_noise_aware_plan_warns_and_records_when_the_cap_cuts_tau():
  data = _seed_data(np.random.default_rng(1))
  config = digits.get_config()
  config.delta = DELTA
  config.rules.max_steps = 25
  with pytest.warns(UserWarning, match=r"rules.max_steps=25 shortens"):
    plan = recipe_lib.make_recipe(config).plan("dp_sgd", 8.0, data)
  assert plan.steps == 25
  assert plan.info["tau_reached"] < plan.info["tau"]
  # Default cap: not binding, and T's rounding (a few % at T ~ 30: T =
  # round(tau / eta) rounded down by 0.25-0.5 of a step) is no reason to
  # warn.
  rng = np.random.default_rng(5)
  sigma_1 = noise_aware.single_release_sigma(0.5, DELTA)
  public_z = np.asarray(linear.augment(data.public_x))
  _, eta = noise_aware.schedule(public_z, public_z.shape[1], sigma_1, 1000,
                                data.num_classes, RULES)
  for n in range(10, 5000):  # T ~ 20-40: half a step is over 1 % of tau
    ratio = noise_aware.step_budget(public_z.shape[1], sigma_1, n,
                                    data.num_classes, RULES) / eta
    if ratio > RULES.min_steps and 0.3 < ratio - round(ratio) < 0.5:
      break
  rounded = dataclasses.replace(  # same public set: same eta
      data, private_x=_unit_rows(rng, n, data.public_x.shape[1]),
      private_y=rng.integers(0, data.num_classes, size=n))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    plan = _recipe().plan("dp_sgd", 0.5, rounded)
  assert plan.steps < 2 * RULES.min_steps
  assert plan.info["tau_reached"] < 0.99 * plan.info["tau"]
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    for epsilon in (1.0, 8.0):
      for method in ("dp_sgd", "pillar", "adamix"):
        plan = _recipe().plan(method, epsilon, data)
        assert plan.info["tau_reached"] == pytest.approx(
            plan.info["tau"], rel=0.5 / plan.steps + 1e-6)


@pytest.mark.parametrize("epsilon", [1.0, 8.0])
def test_noise_aware_subspace_kappa_moves_only_truncated_subspace_plans(
    epsilon):
  # High noise (epsilon 1, few private examples): AdaMix keeps a truncated
  # subspace; low noise (epsilon 8, many): the full whitened space.
  data = _seed_data(np.random.default_rng(5), dim=64,
                    num_private=300 if epsilon == 1.0 else 20000)
  base = _recipe()
  config = base.config.copy_and_resolve_references()
  config.rules.subspace_kappa = config.rules.kappa / 4
  config.rules.min_steps = 1
  config.rules.max_steps = 10**6
  shortened = recipe_lib.make_recipe(config)
  wide = config.copy_and_resolve_references()
  wide.rules.subspace_kappa = wide.rules.kappa
  same = recipe_lib.make_recipe(wide)
  adamix = shortened.plan("adamix", epsilon, data)
  reference = same.plan("adamix", epsilon, data)
  if epsilon == 1.0:
    assert adamix.info["geometry"] == "subspace"
    assert adamix.steps == pytest.approx(reference.steps / 4, abs=1)
  else:
    assert adamix.info["geometry"] == "full"
    assert adamix.steps == reference.steps
  assert (shortened.plan("dp_sgd", epsilon, data).steps ==
          same.plan("dp_sgd", epsilon, data).steps)
  pillar = shortened.plan("pillar", epsilon, data)
  assert pillar.info["geometry"] == "pca"
  assert pillar.steps == pytest.approx(
      same.plan("pillar", epsilon, data).steps / 4, abs=1)


def test_noise_aware_public_weight_limits():
  full_trust = dataclasses.replace(RULES, public_trust=1.0)
  assert noise_aware.public_gradient_weight(
      0.0, 50, 950, 65, 10, full_trust) == pytest.approx(50 / 1000)
  weights = [noise_aware.public_gradient_weight(s, 50, 950, 65, 10, RULES)
             for s in (0.0, 1.0, 5.0, 50.0)]
  assert weights == sorted(weights) and weights[-1] < RULES.public_trust
  assert weights[-1] > 0.9 * RULES.public_trust
  assert noise_aware.public_gradient_weight(5.0, 0, 950, 65, 10, RULES) == 0.0


@pytest.mark.parametrize("field,value", [("clip_norm", 0.0), ("theta", -1.0),
                                         ("subspace_kappa", 0.0),
                                         ("reference_dim", 0.0),
                                         ("dim_power", 0.75),
                                         ("public_trust", 1.5),
                                         ("min_steps", 0),
                                         ("max_steps", 5)])
def test_noise_aware_rules_refuse_bad_constants(field, value):
  with pytest.raises(ValueError, match=f"rules.{field.split('_')[0]}"):
    noise_aware.Rules(**{field: value})


# --- DP class prototypes ------------------------------------------------------


def _released_sums(x, y, classes, sigma, entropy=1):
  program = prototypes.PrototypesProgram(x, y, x[:0], y[:0], classes, sigma)
  coins = randomness.MechanismCoins(entropy=entropy)
  state = program.init(coins)
  batch = sampler_lib.PoissonSampler(len(y), 1.0, 0).batch(0)
  (_, sums), _ = program.step(0, state, batch)
  return np.asarray(sums, np.float64)


def test_dp_prototypes_sensitivity_is_bounded_by_sqrt2():
  rng = np.random.default_rng(4)
  x = _unit_rows(rng, 40, 8)
  y = rng.integers(0, 3, size=40)
  x_big = x.copy()
  x_big[7] *= 1e6  # an adversarial row: clipped to sqrt(2) all the same
  without = np.delete(np.arange(40), 7)
  for rows in (x, x_big):
    full = _released_sums(rows, y, 3, 0.0)
    dropped = _released_sums(rows[without], y[without], 3, 0.0)
    assert np.linalg.norm(full - dropped) <= prototypes.CLIP_NORM * (1 + 1e-5)
  assert np.linalg.norm(_released_sums(x_big, y, 3, 0.0) - _released_sums(
      x_big[without], y[without], 3, 0.0)) > 0.99 * prototypes.CLIP_NORM


@pytest.mark.parametrize("factor", [1.0, 2 / 3, 1.5])
def test_dp_prototypes_noise_std_is_sigma_times_sqrt2(factor):
  rng = np.random.default_rng(5)
  x = _unit_rows(rng, 30, 63)
  y = rng.integers(0, 10, size=30)
  sigma = 1.7
  exact = _released_sums(x, y, 10, 0.0)
  noise = np.concatenate([
      (_released_sums(x, y, 10, sigma, entropy=e) - exact).ravel()
      for e in (11, 12, 13)])  # 3 x 640 entries
  expected = factor * sigma * prototypes.CLIP_NORM
  ratio = noise.std() / expected
  if factor == 1.0:
    assert 0.95 < ratio < 1.05
  else:
    assert not 0.95 < ratio < 1.05


def test_dp_prototypes_run_is_one_full_batch_release():
  rng = np.random.default_rng(6)
  data = _seed_data(rng)
  recipe = _recipe()
  run = recipe.train_dp("dp_prototypes", 3.0, 0, data)
  assert run.ledger.entries == [accounting.LedgerEntry(
      noise_multiplier=noise_aware.single_release_sigma(3.0, DELTA),
      sampling_rate=1.0, steps=1)]
  assert 0.99 * 3.0 <= run.ledger.epsilon() <= 3.0
  assert run.meta["steps"] == 1 and run.meta["sampling_rate"] == 1.0
  # A linear head that beats chance on the class signal.
  error = recipe.test_error(run.params, data)
  assert error < 0.6


def test_zero_noise_diagnostic_is_the_same_rules_at_sigma_zero():
  data = _seed_data(np.random.default_rng(7))
  recipe = _recipe()
  plan = recipe.plan("adamix", None, data)
  assert plan.step_config.noise_multiplier == 0.0
  assert plan.steps == RULES.max_steps and plan.info["sigma_1"] == 0.0
  assert plan.feature_map.shape[1] == data.private_x.shape[1] + 1  # full
  # The same clipping and public weight rule as the private runs.
  assert plan.step_config.clip_norm == RULES.clip_norm
  assert plan.step_config.public_weight == pytest.approx(
      noise_aware.public_gradient_weight(
          0.0, len(data.public_y), len(data.private_y),
          plan.feature_map.shape[1], data.num_classes, RULES))
  private = recipe.plan("adamix", 8.0, data)
  assert private.step_config.noise_multiplier > 0
  assert private.step_config.public_weight > plan.step_config.public_weight


@pytest.mark.parametrize("field,value,message", [
    ("rules.kappa", -1.0, "config.rules.kappa must be > 0"),
    ("rules.max_steps", 5,
     "need 1 <= config.rules.min_steps <= config.rules.max_steps, got 20, 5"),
])
def test_noise_aware_bad_rules_are_refused_before_any_work(tmp_path, field,
                                                           value, message):
  from adamix_jax.experiment import stages  # pylint: disable=g-import-not-at-top
  config = digits.get_config()
  config.update_from_flattened_dict({field: value})
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=message):
    stages.run(config, str(workdir))
  assert not workdir.exists()
