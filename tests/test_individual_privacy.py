"""Individual privacy accounting (issue #13): each example's own epsilon.

The guarantees: no example is charged more than the run's (worst-case)
epsilon; an example clipped at every step is charged exactly that; one with
a zero gradient is charged nothing; raising any ratio never lowers an
epsilon; the grid rounds up (never below the exact value); the r = 1 row is
dp_accounting's own RDP.

Then the recording inside the private step (``adamix.sensitivity``): the
level it adds for every private example at step t is that of the explicit
per-example gradient at the parameters, in the subspace and against the
threshold that step used (one device, a mesh, matrix and dual forms); it
does not change the run; its counts survive a crash and a resume; and a run
that clips everything charges every example exactly the run's epsilon.
"""

from __future__ import annotations

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

from adamix_jax.adamix import linear_step
from adamix_jax.adamix import sensitivity
from adamix_jax.adamix import settings
from adamix_jax.adamix import subspace as subspace_lib
from adamix_jax.models import linear
from adamix_jax.privacy import accounting
from adamix_jax.privacy import individual
from adamix_jax.privacy import per_example
from adamix_jax.privacy import randomness
from adamix_jax.privacy import sampler as sampler_lib
from adamix_jax.train import checkpoint as checkpoint_lib
from adamix_jax.train import linear_head

DELTA = 1e-5
SIGMA, Q, STEPS = 1.2, 0.1, 40
LEVELS = 20  # a coarse grid keeps the table cheap; the default is tested too


def _ledger(steps: int = STEPS, sigma: float = SIGMA, q: float = Q):
  ledger = accounting.PrivacyLedger(DELTA)
  ledger.record(sigma, q, steps)
  return ledger


def _recorder(history: np.ndarray, levels: int = LEVELS):
  """history: (T, N) ratios."""
  recorder = individual.IndividualRecorder(history.shape[1], levels)
  for ratios in history:
    recorder.record(ratios)
  return recorder


@pytest.fixture(scope="module")
def ledger():
  return _ledger()


def test_individual_privacy_never_above_worst_case(ledger):
  rng = np.random.default_rng(0)
  history = rng.uniform(0, 1.3, (STEPS, 300)).clip(0, 1)
  history[:, :50] = rng.uniform(0.9, 1.0, (STEPS, 50))  # near the worst case
  history[:, 50:100] = rng.uniform(0.0, 0.2, (STEPS, 50))  # well inside
  result = individual.individual_epsilons(_recorder(history), ledger)
  assert result.worst_case == ledger.epsilon()
  assert np.all(result.epsilon <= result.worst_case)
  assert np.all(result.epsilon >= 0)
  # Not vacuous: small ratios cost far less than the worst case.
  assert np.min(result.epsilon) < 0.5 * result.worst_case


def test_individual_privacy_clipped_every_step_gets_exactly_worst_case(ledger):
  history = np.random.default_rng(1).uniform(0, 1, (STEPS, 5))
  history[:, 0] = 1.0
  for levels in (LEVELS, individual.DEFAULT_LEVELS):
    result = individual.individual_epsilons(_recorder(history, levels), ledger)
    assert result.epsilon[0] == ledger.epsilon()  # exactly, not approx
    assert result.epsilon_rdp[0] == result.worst_case_rdp
    assert result.worst_case_rdp >= result.worst_case  # RDP is the looser one
    assert np.all(result.epsilon[1:] < result.epsilon[0])


def test_individual_privacy_zero_gradient_costs_nothing(ledger):
  history = np.ones((STEPS, 3))
  history[:, 1] = 0.0
  result = individual.individual_epsilons(_recorder(history), ledger)
  assert result.epsilon[1] == 0.0
  assert result.epsilon_rdp[1] == 0.0
  assert result.epsilon[0] > 0


def test_individual_privacy_monotone_in_every_ratio():
  rng = np.random.default_rng(2)
  base = rng.uniform(0, 1, (STEPS, 200))
  raised = base.copy()
  # Raise a random subset of (step, example) ratios by random amounts.
  pick = rng.uniform(size=base.shape) < 0.2
  raised[pick] = np.minimum(1.0, base[pick] + rng.uniform(0, 0.5, pick.sum()))
  low = individual.individual_epsilons_from_counts(
      _recorder(base).counts, SIGMA, Q, DELTA, np.inf, LEVELS)
  high = individual.individual_epsilons_from_counts(
      _recorder(raised).counts, SIGMA, Q, DELTA, np.inf, LEVELS)
  assert np.all(high.epsilon_rdp >= low.epsilon_rdp)
  assert np.any(high.epsilon_rdp > low.epsilon_rdp)
  # The table itself is non-decreasing along levels at every order (some
  # entries are inf: orders dp_accounting cannot evaluate at small sigma).
  table = individual.rdp_table(SIGMA, Q, LEVELS)
  assert np.all(table[1:] >= table[:-1])


def test_individual_privacy_grid_rounds_up_never_below_exact():
  rng = np.random.default_rng(3)
  steps = 20
  for example in range(3):
    ratios = rng.uniform(0.05, 1.0, steps)
    exact = individual.exact_individual_rdp_epsilon(ratios, SIGMA, Q, DELTA)
    bucketed = individual.individual_epsilons_from_counts(
        _recorder(ratios[:, None]).counts, SIGMA, Q, DELTA, np.inf,
        LEVELS).epsilon_rdp[0]
    assert exact <= bucketed, example
    # ... and close: rounding moves each r by < 1/L.
    assert bucketed <= exact * 1.15 + 1e-9, example
  # On the grid, the bucketed value is the exact one.
  on_grid = rng.integers(0, LEVELS + 1, steps) / LEVELS
  exact = individual.exact_individual_rdp_epsilon(on_grid, SIGMA, Q, DELTA)
  bucketed = individual.individual_epsilons_from_counts(
      _recorder(on_grid[:, None]).counts, SIGMA, Q, DELTA, np.inf,
      LEVELS).epsilon_rdp[0]
  assert bucketed == pytest.approx(exact, rel=1e-9)


@pytest.mark.parametrize("sigma,q,steps", [(SIGMA, Q, STEPS),
                                           (0.8, 0.02, 500), (3.0, 1.0, 25)])
def test_individual_privacy_table_top_row_is_rdp_accountant(sigma, q, steps):
  table = individual.rdp_table(sigma, q, LEVELS)
  accountant = dp_accounting.rdp.RdpAccountant()
  accountant.compose(accounting.dp_sgd_event(sigma, q, steps))
  expected = accountant.get_epsilon(DELTA)
  got = individual.rdp_to_epsilon(individual.DEFAULT_ORDERS,
                                  steps * table[LEVELS], DELTA)
  assert got == pytest.approx(expected, rel=1e-12)
  assert expected == pytest.approx(
      accounting.compute_epsilon(sigma, q, steps, DELTA, "rdp"), rel=1e-12)
  assert np.all(table[0] == 0)


def test_individual_privacy_vectorised_conversion_is_dp_accountings():
  rng = np.random.default_rng(4)
  orders = individual.DEFAULT_ORDERS
  base = individual.sampled_gaussian_rdp(SIGMA, Q, orders)
  assert np.isinf(base).any()  # as RdpAccountant composes it
  rows = np.stack([np.zeros(len(orders))] +
                  [s * base for s in (1e-12, 0.01, 1.0, 30.0, 400.0)] +
                  [rng.uniform(0, 2, len(orders))])
  got = individual.rdp_to_epsilon(orders, rows, DELTA)
  for row, value in zip(rows, got):
    expected = rdp_privacy_accountant.compute_epsilon(orders, row, DELTA)[0]
    assert value == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_individual_privacy_recorder_refuses_a_missed_step(ledger):
  recorder = _recorder(np.ones((STEPS - 1, 4)))
  with pytest.raises(ValueError, match="record every step"):
    individual.individual_epsilons(recorder, ledger)
  recorder.record_worst_case(1)  # the missed step, charged at r = 1
  assert np.all(individual.individual_epsilons(recorder, ledger).epsilon ==
                ledger.epsilon())


def test_individual_privacy_stride_only_raises_epsilons(ledger):
  rng = np.random.default_rng(5)
  history = rng.uniform(0, 1, (STEPS, 100))
  full = _recorder(history)
  strided = individual.IndividualRecorder(100, LEVELS)
  for t, ratios in enumerate(history):
    if t % 4 == 0:
      strided.record(ratios)
    else:
      strided.record_worst_case()
  assert strided.steps == full.steps == STEPS
  low = individual.individual_epsilons(full, ledger)
  high = individual.individual_epsilons(strided, ledger)
  assert np.all(high.epsilon_rdp >= low.epsilon_rdp)
  assert np.all(high.epsilon <= ledger.epsilon())


def test_individual_privacy_quantizer_rounds_up_on_host_and_device():
  ratios = np.array([0.0, 1e-9, 0.05, 0.0500001, 0.5, 0.99, 1.0, 1.5, np.nan])
  expected = np.array([0, 1, 1, 2, 10, 20, 20, 20, 20])
  np.testing.assert_array_equal(individual.quantize_ratios(ratios, 20),
                                expected)
  np.testing.assert_array_equal(
      np.asarray(individual.quantize_ratios(jnp.asarray(ratios), 20)),
      expected)
  levels = individual.level_ratios(20)
  finite = ~np.isnan(ratios)
  assert np.all(levels[expected[finite]] >= np.minimum(ratios[finite], 1.0))
  # The on-device scatter-add is the host recorder's.
  history = np.random.default_rng(6).uniform(0, 1, (7, 30)).astype(np.float32)
  counts = jnp.zeros((30, 21), jnp.int32)
  for ratios in history:
    counts = jax.jit(individual.update_counts, static_argnums=2)(
        counts, jnp.asarray(ratios), 20)
  np.testing.assert_array_equal(np.asarray(counts), _recorder(history).counts)


def test_individual_privacy_recorder_arrays_round_trip():
  recorder = _recorder(np.random.default_rng(7).uniform(0, 1, (5, 8)))
  recorder.record_worst_case(2)
  again = individual.IndividualRecorder.from_arrays(recorder.to_arrays())
  np.testing.assert_array_equal(again.counts, recorder.counts)
  assert (again.measured_steps, again.worst_case_steps) == (5, 2)
  bad = recorder.to_arrays()
  bad["counts"] = bad["counts"].copy()
  bad["counts"][0, 0] += 1
  with pytest.raises(ValueError, match="same"):
    individual.IndividualRecorder.from_arrays(bad)


# --- recording inside the private step of the linear head -------------------

N, D, C_CLASSES, N_PUBLIC = 160, 8, 4, 16
Q_RUN, STEPS_RUN = 0.25, 12
# (subspace, adaptive threshold, representation): DP-SGD (no public data,
# fixed C) and AdaMix in each clipping space and both representations.
CASES = {
    "dp_sgd": (settings.SubspaceSpec(), False, "matrix"),
    "features": (settings.SubspaceSpec("features", 4), True, "matrix"),
    "gradients_matrix": (settings.SubspaceSpec(
        "gradients", 5, refresh_every=4, method="iterative"), True, "matrix"),
    "gradients_dual": (settings.SubspaceSpec(
        "gradients", 5, refresh_every=4, method="iterative"), True, "dual"),
}


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, C_CLASSES, N)
  x = (rng.normal(size=(N, D)) + 1.5 * np.eye(D)[y]).astype(np.float32)
  py = np.arange(N_PUBLIC) % C_CLASSES
  px = (rng.normal(size=(N_PUBLIC, D)) + 1.5 * np.eye(D)[py]).astype(
      np.float32)
  anchor = {"kernel": (rng.normal(size=(D, C_CLASSES)) * 0.1).astype(
      np.float32), "bias": np.zeros(C_CLASSES, np.float32)}
  return x, y, px, py, anchor


def _run_args(case, problem, clip_norm=2.0):
  x, y, px, py, anchor = problem
  spec, adaptive, representation = CASES[case]
  if not adaptive:  # DP-SGD uses no public data at all
    px, py = px[:0], py[:0]
  config = settings.StepConfig(
      noise_multiplier=1.0, expected_batch_size=Q_RUN * N, learning_rate=0.5,
      clip_norm=clip_norm, adaptive_threshold=adaptive,
      public_weight=0.1 if adaptive else 0.0)
  return (x, y, px, py, anchor, config), dict(
      steps=STEPS_RUN, sampling_rate=Q_RUN, subspace=spec,
      flags=settings.PerformanceFlags(representation=representation))


def _fit(case, recorder, problem=None, checkpointer=None, crash_at=None,
         mesh=None, clip_norm=2.0):
  args, kwargs = _run_args(case, problem or _problem(), clip_norm)

  def on_step(t, _):
    if t == crash_at:
      raise _Crash()

  ledger = accounting.PrivacyLedger(DELTA)
  params = linear_head.train_private_head(
      *args, **kwargs, ledger=ledger,
      coins=randomness.MechanismCoins.insecure_from_seed(3), mesh=mesh,
      checkpointer=checkpointer, on_step=on_step, individual=recorder)
  return params, ledger


class _Crash(Exception):
  pass


@jax.jit
def _explicit_gradients(matrix, subspace, x, y):
  """Per-example gradients by autodiff, mapped where the step clips them."""
  grads = per_example.per_example_grads(
      linear_step._matrix_example_loss,  # pylint: disable=protected-access
      matrix, (linear.augment(x), y))
  if subspace.kind != "none":
    grads = jax.vmap(lambda g: subspace_lib.coefficients_of(subspace, g))(
        grads)
  return grads


def _explicit_norms(matrix, subspace, x, y):
  grads = _explicit_gradients(jnp.asarray(matrix), subspace, jnp.asarray(x),
                              jnp.asarray(y))
  flat = np.asarray(grads, np.float64).reshape(len(y), -1)
  return np.sqrt(np.sum(flat**2, axis=1))


@pytest.mark.parametrize("case", list(CASES))
def test_individual_privacy_recorded_level_is_the_steps_own_clipping(case):
  """At every step, the level added for EVERY private example is ceil(L r)
  of its explicit gradient at the step's input parameters, in the subspace
  the step used, against the step's threshold; and the sampled examples at
  level L are exactly those the mechanism clipped."""
  problem = _problem()
  x, y = problem[:2]
  args, kwargs = _run_args(case, problem)
  recorder = individual.IndividualRecorder(N, LEVELS)
  program = linear_head.LinearHeadProgram(*args, **kwargs,
                                          individual=recorder)
  coins = randomness.MechanismCoins.insecure_from_seed(3)
  state = program.init(coins)
  sampler = sampler_lib.PoissonSampler(N, Q_RUN, coins.sampler_seed,
                                       pad_multiple=program.pad_multiple)
  levels_seen, clipped_total = set(), 0
  for t in range(STEPS_RUN):
    matrix = np.array(linear_step.final_matrix(
        state[0], program._cache, program.public, average=False))  # pylint: disable=protected-access
    before = np.array(state[2])  # copied: the step donates the counts
    batch = sampler.batch(t)
    state, metrics = program.step(t, state, batch)
    added = np.array(state[2]) - before
    assert np.all(added >= 0) and np.all(added.sum(axis=1) == 1), t
    level = added.argmax(axis=1)
    threshold = float(metrics.threshold)
    norms = _explicit_norms(matrix, state[1], x, y)
    scaled = np.minimum(1.0, norms / threshold) * LEVELS
    # Rounded up; at a grid point float rounding and the 1e-5 slack decide.
    on_grid = np.abs(scaled - np.round(scaled)) < 1e-3
    np.testing.assert_array_equal(level[~on_grid],
                                  np.ceil(scaled[~on_grid]), err_msg=str(t))
    assert np.all(level[on_grid] >= np.round(scaled[on_grid])), t
    real = batch.indices[batch.mask.astype(bool)]
    clipped = int(metrics.num_clipped)
    assert int(np.sum(norms[real] > threshold)) == clipped, t
    assert np.all(level[real[norms[real] > threshold]] == LEVELS), t
    clipped_total += clipped
    levels_seen.update(level.tolist())
  # Not vacuous: clipped examples, and examples well below the threshold.
  assert clipped_total > 0 and min(levels_seen) < LEVELS // 2
  assert recorder.steps == 0  # filled by release, once
  program.release(state)
  assert recorder.steps == recorder.measured_steps == STEPS_RUN
  np.testing.assert_array_equal(recorder.counts, np.array(state[2]))


@pytest.mark.parametrize("case", ["gradients_matrix", "gradients_dual"])
def test_individual_privacy_counts_survive_crash_and_resume(tmp_path, case):
  """The counts are checkpointed with the state: a crash and a resume end
  with the counts of an uninterrupted run (and recording changes nothing
  the run releases)."""
  reference = individual.IndividualRecorder(N, LEVELS)
  params, ledger = _fit(case, reference)
  if case == "gradients_dual":  # one form is enough: the step is the same
    plain, _ = _fit(case, None)
    for name in ("kernel", "bias"):
      np.testing.assert_array_equal(params[name], plain[name])
  directory = str(tmp_path / "ckpt")
  with checkpoint_lib.RunCheckpointer(directory, every_steps=5) as ckpt:
    with pytest.raises(_Crash):
      _fit(case, individual.IndividualRecorder(N, LEVELS), checkpointer=ckpt,
           crash_at=8)
    assert ckpt.latest_step() == 5
  resumed = individual.IndividualRecorder(N, LEVELS)  # a new process
  with checkpoint_lib.RunCheckpointer(directory, every_steps=5) as ckpt:
    again, ledger_again = _fit(case, resumed, checkpointer=ckpt)
  assert ledger_again.total_steps == ledger.total_steps == STEPS_RUN
  assert resumed.steps == STEPS_RUN
  np.testing.assert_array_equal(resumed.counts, reference.counts)
  np.testing.assert_allclose(again["kernel"], params["kernel"], atol=1e-6)
  result = individual.individual_epsilons(resumed, ledger_again)
  assert np.all(result.epsilon <= ledger_again.epsilon())
  # A checkpoint with counts fits only a run that records them.
  with checkpoint_lib.RunCheckpointer(directory, every_steps=5) as ckpt:
    with pytest.raises(checkpoint_lib.CheckpointError,
                       match="individual_levels"):
      _fit(case, None, checkpointer=ckpt)


@pytest.mark.parametrize("case", ["dp_sgd", "gradients_matrix"])
def test_individual_privacy_counts_on_a_mesh_match_one_device(meshes, case):
  one = individual.IndividualRecorder(N, LEVELS)
  _fit(case, one)
  sharded = individual.IndividualRecorder(N, LEVELS)
  _fit(case, sharded, mesh=meshes[1])
  assert sharded.steps == STEPS_RUN
  # The same steps up to float summation order: a ratio may cross a grid
  # point only where it lies within rounding of one.
  differ = np.any(sharded.counts != one.counts, axis=1)
  assert differ.mean() <= 0.02, differ.sum()


def test_individual_privacy_run_charges_clipped_fully_and_zero_gradient_nothing():
  """End to end through the recorded step: an example whose gradient is
  huge (clipped at every step) is charged exactly the run's epsilon, one
  whose softmax residual is exactly 0 at every step is charged 0, and every
  example is charged at most the run's epsilon."""
  x, y, px, py, anchor = _problem()
  x, y = x.copy(), y.copy()
  anchor = {k: v.copy() for k, v in anchor.items()}
  # Example 0: logit 1000 for its own class (softmax exactly one-hot in
  # float32, so a zero residual); example 1: logit 1000 for another class.
  anchor["kernel"][0] = [1.0, 0.0, 0.0, 0.0]
  anchor["kernel"][1] = [0.0, 1.0, 0.0, 0.0]
  x[0], y[0] = 1000.0 * np.eye(D)[0], 0
  x[1], y[1] = 1000.0 * np.eye(D)[1], 0
  recorder = individual.IndividualRecorder(N, LEVELS)
  _, ledger = _fit("dp_sgd", recorder, problem=(x, y, px, py, anchor))
  assert recorder.counts[0, 0] == STEPS_RUN  # r = 0 at every step
  assert recorder.counts[1, LEVELS] == STEPS_RUN  # r = 1 at every step
  result = individual.individual_epsilons(recorder, ledger)
  assert result.epsilon[0] == 0.0
  assert result.epsilon[1] == ledger.epsilon()  # exactly
  assert np.all(result.epsilon <= ledger.epsilon())
  assert np.min(result.epsilon[2:]) < ledger.epsilon()


def test_individual_privacy_program_refuses_a_used_or_mismatched_recorder():
  args, kwargs = _run_args("dp_sgd", _problem())
  used = individual.IndividualRecorder(N, LEVELS)
  used.record_worst_case(1)
  for bad in (used, individual.IndividualRecorder(N + 1, LEVELS)):
    with pytest.raises(ValueError, match="empty IndividualRecorder"):
      linear_head.LinearHeadProgram(*args, **kwargs, individual=bad)


def test_individual_privacy_ratios_round_up_and_treat_nonfinite_as_clipped():
  norms = jnp.array([0.0, 0.3, 0.6, jnp.nan, jnp.inf])
  ratios = np.asarray(sensitivity.clipping_ratios(norms, 0.6))
  assert ratios[0] == 0.0
  assert 0.5 < ratios[1] and ratios[1] >= 0.5 * (1 + sensitivity.RATIO_SLACK)
  np.testing.assert_array_equal(ratios[2:], [1.0, 1.0, 1.0])
