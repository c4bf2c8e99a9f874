"""Private model selection (privacy/selection.py; issue #15, item 4).

Guarantees checked (docs/design.md, invariant 7: disjoint parts compose in
parallel):

* the noise of report-noisy-max is Gumbel(1 / epsilon): the selection
  frequencies are the exponential mechanism's softmax(-epsilon counts), and
  a scale 2/3 or 3/2 of the right one is caught;
* the ledger composes a selection in PARALLEL with the training steps
  (epsilon is the larger of the two, not their sum), refuses a selection
  over the target, and keeps it through save/load;
* the split is by per-record coins from the run's secret coins (a record's
  part does not depend on the others), the training run reads only the
  training part and the selection only the validation part, and a resumed
  run keeps the first attempt's split (the checkpoint's coins);
* bad settings are refused before any work.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from adamix_jax.configs import digits
from adamix_jax.experiment import recipe as recipe_lib
from adamix_jax.privacy import accounting
from adamix_jax.privacy import randomness
from adamix_jax.privacy import selection
from adamix_jax.train import checkpoint as checkpoint_lib

DELTA = 1e-5


@pytest.mark.parametrize("scale_factor", [1.0, 2.0 / 3.0, 1.5])
def test_private_selection_noise_is_gumbel_one_over_epsilon(scale_factor):
  """P(pick j) = exp(-eps c_j) / sum_k exp(-eps c_k); a wrong noise scale
  (2/3 or 3/2 of 1 / eps) moves the frequencies far outside the tolerance."""
  epsilon, counts, draws = 1.0, np.array([3, 4, 6]), 40_000
  rng = np.random.default_rng(0)
  picks = np.bincount(
      [selection.report_noisy_max(counts, epsilon / scale_factor, rng)
       for _ in range(draws)], minlength=3) / draws
  expected = np.exp(-epsilon * counts) / np.exp(-epsilon * counts).sum()
  close = np.all(np.abs(picks - expected) < 4.5 * np.sqrt(
      expected * (1 - expected) / draws) + 1e-3)
  assert close == (scale_factor == 1.0), (picks, expected)


def test_private_selection_ledger_composes_in_parallel():
  ledger = accounting.PrivacyLedger(DELTA, target_epsilon=1.0)
  sigma = accounting.calibrate_noise_multiplier(0.8, DELTA, 1.0, 5)
  ledger.record(sigma, 1.0, 5)
  steps_epsilon = ledger.epsilon()
  assert 0.75 < steps_epsilon <= 0.8
  ledger.record_parallel(selection.MECHANISM, 1.0, records=40)
  # The larger of the two parts, never the sum (1.8 would be sequential).
  assert ledger.epsilon() == pytest.approx(1.0)
  assert ledger.epsilon("rdp") == pytest.approx(1.0)
  with pytest.raises(accounting.BudgetExceededError, match="exceeds the "
                     "target"):
    ledger.record_parallel(selection.MECHANISM, 1.5, records=40)
  restored = accounting.PrivacyLedger.from_dict(ledger.to_dict())
  assert restored.parallel == ledger.parallel
  assert restored.epsilon() == pytest.approx(1.0)
  # A ledger written before parallel releases existed still loads.
  old = ledger.to_dict()
  del old["parallel"]
  assert accounting.PrivacyLedger.from_dict(old).epsilon() == pytest.approx(
      steps_epsilon)
  for bad in (0.0, -1.0, math.inf, math.nan):
    with pytest.raises(ValueError, match="epsilon"):
      ledger.record_parallel(selection.MECHANISM, bad, records=40)


def test_private_selection_split_is_per_record_coins():
  coins = randomness.MechanismCoins(entropy=12345)
  mask = selection.validation_mask(1000, 0.2, coins)
  assert 150 < mask.sum() < 250
  # One more record does not move anyone else's part.
  np.testing.assert_array_equal(
      selection.validation_mask(1001, 0.2, coins)[:1000], mask)
  # Secret: other coins give another split; not the sampler's stream.
  other = selection.validation_mask(1000, 0.2,
                                    randomness.MechanismCoins(entropy=54321))
  assert not np.array_equal(mask, other)
  assert coins.selection_seed != coins.sampler_seed
  for bad in (0.0, 1.0, -0.1):
    with pytest.raises(ValueError, match="fraction"):
      selection.validation_mask(100, bad, coins)


def _seed_data(num_private=600, dim=16, classes=4, seed=0):
  rng = np.random.default_rng(seed)
  means = rng.normal(size=(classes, dim))

  def draw(n):
    y = rng.integers(0, classes, size=n)
    x = means[y] + 1.5 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y

  (public_x, public_y), (private_x, private_y), (test_x, test_y) = (
      draw(20), draw(num_private), draw(50))
  head = {"kernel": rng.normal(size=(dim, classes)).astype(np.float32) * 0.1,
          "bias": np.zeros(classes, np.float32)}
  return recipe_lib.SeedData(public_x, public_y, private_x, private_y, test_x,
                             test_y, classes, head, zero_shot=False)


def _selecting_recipe(fraction=0.25):
  config = digits.get_config()
  config.delta = DELTA
  config.analysis.individual_privacy = False
  config.adamix.selection_fraction = fraction
  config.rules.max_steps = 40
  recipe_lib.validate_config(config)
  return recipe_lib.make_recipe(config)


class _Spy:
  """Records the private rows each training program and each validation
  count reads."""

  def __init__(self, recipe, monkeypatch):
    self.trained_on, self.counted_on = [], []
    program = recipe.program

    def spy_program(plan, data, **kwargs):
      self.trained_on.append(np.asarray(data.private_x))
      return program(plan, data, **kwargs)

    count = recipe_lib.linear.error_count

    def spy_count(params, x, y):
      self.counted_on.append(np.asarray(x))
      return count(params, x, y)

    monkeypatch.setattr(recipe, "program", spy_program)
    monkeypatch.setattr(recipe_lib.linear, "error_count", spy_count)


def test_private_selection_training_and_validation_parts_are_disjoint(
    monkeypatch):
  recipe, data = _selecting_recipe(), _seed_data()
  coins = randomness.MechanismCoins(entropy=777)
  spy = _Spy(recipe, monkeypatch)
  run = recipe.train_dp("adamix", 1.0, 0, data, coins=coins)
  mask = selection.validation_mask(len(data.private_y), 0.25, coins)
  (trained,) = spy.trained_on
  np.testing.assert_array_equal(trained, data.private_x[~mask])
  assert len(spy.counted_on) == len(recipe.config.adamix.selection_path)
  for rows in spy.counted_on:
    np.testing.assert_array_equal(rows, data.private_x[mask])
  assert run.meta["private_examples"] == int((~mask).sum())
  assert run.meta["selection_records"] == int(mask.sum())
  assert run.meta["selection_t"] in recipe.config.adamix.selection_path
  assert run.ledger.parallel == [accounting.ParallelRelease(
      selection.MECHANISM, 1.0, int(mask.sum()))]
  # The whole run: (epsilon, delta), by parallel composition.
  assert 0.9 < run.ledger.epsilon() <= 1.0 + 1e-9
  # The released head is a point of w_0 + t (w - w_0).
  assert set(run.params) == {"kernel", "bias"}


def test_private_selection_resume_keeps_the_first_attempts_split(
    tmp_path, monkeypatch):
  """A resumed run takes the split from the checkpoint's coins: a record
  trained on before the crash can never land in the validation part."""
  recipe, data = _selecting_recipe(), _seed_data()
  recipe.config.train.checkpoint_every = 5

  class Crash(Exception):
    pass

  class CrashAt:
    def start(self, total, done):
      pass

    def update(self, step, metrics, ledger):
      if step == 12:
        raise Crash()

    def close(self):
      pass

  directory = str(tmp_path / "ckpt")
  with pytest.raises(Crash):
    recipe.train_dp("adamix", 1.0, 0, data, checkpoint_dir=directory,
                    progress=CrashAt())
  with checkpoint_lib.RunCheckpointer(directory, every_steps=5) as ckpt:
    first_coins = ckpt.saved_coins()
  assert first_coins is not None
  first_split = selection.validation_mask(len(data.private_y), 0.25,
                                          first_coins)
  spy = _Spy(recipe, monkeypatch)
  run = recipe.train_dp("adamix", 1.0, 0, data, checkpoint_dir=directory)
  assert run.meta["resumed_from_step"] == 10
  np.testing.assert_array_equal(spy.trained_on[0],
                                data.private_x[~first_split])
  assert run.meta["selection_records"] == int(first_split.sum())


@pytest.mark.parametrize("overrides, message", [
    ({"adamix.selection_fraction": 1.0}, "selection_fraction"),
    ({"adamix.selection_fraction": -0.2}, "selection_fraction"),
    ({"adamix.selection_fraction": 0.2, "adamix.selection_path": ()},
     "selection_path"),
    ({"adamix.selection_fraction": 0.2,
      "analysis.individual_privacy": True}, "individual_privacy=False"),
    ({"adamix.selection_fraction": 0.2, "train.schedule": "fixed",
      "analysis.individual_privacy": False}, "noise-aware"),
])
def test_private_selection_bad_settings_are_refused(overrides, message):
  config = digits.get_config()
  for field, value in overrides.items():
    node = config
    *path, last = field.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  with pytest.raises(ValueError, match=message):
    recipe_lib.validate_config(config)


def test_private_selection_candidates_are_the_path_from_w0():
  start = {"kernel": np.zeros((2, 2)), "bias": np.ones(2)}
  trained = {"kernel": np.full((2, 2), 4.0), "bias": np.full(2, 3.0)}
  path = selection.path_candidates(start, trained, (0.0, 0.25, 1.0))
  np.testing.assert_allclose(path[0]["bias"], start["bias"])
  np.testing.assert_allclose(path[1]["kernel"], np.ones((2, 2)))
  np.testing.assert_allclose(path[2]["bias"], trained["bias"])
