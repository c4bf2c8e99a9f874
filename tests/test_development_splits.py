"""Development splits (experiments/development.py): how rule constants are
chosen without the test split.

Guarantees checked:

* the development split never holds a row of the real test split: its
  'test' rows are a quarter of the PRIVATE set, disjoint from the rows it
  trains on, and the same rows for a seed every time;
* ``matched_epsilon`` gives the development split the full private set's
  noise-to-size ratio sigma_1 / N (so the rules pick the same geometry and
  dimension as the run it stands for), and is the identity on the full set;
* ``experiments.dev_sweep`` runs end to end from a public-only workdir,
  takes ``--config.FIELD`` overrides, records the command as typed and the
  development epsilon of every run, and refuses an unknown ``--key`` in
  one line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from adamix_jax import configs as configs_lib
from adamix_jax.adamix import noise_aware
from adamix_jax.experiment import recipe as recipe_lib
from experiments import development

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DELTA = 1e-5


def _data(rng, num_private=400, dim=8, classes=3):
  def draw(n):
    return (rng.normal(size=(n, dim)).astype(np.float32),
            rng.integers(0, classes, size=n))
  public_x, public_y = draw(12)
  private_x, private_y = draw(num_private)
  test_x, test_y = draw(50)
  head = {"kernel": np.zeros((dim, classes), np.float32),
          "bias": np.zeros(classes, np.float32)}
  return recipe_lib.SeedData(public_x, public_y, private_x, private_y, test_x,
                             test_y, classes, head, zero_shot=False)


def test_development_split_holds_out_private_rows_never_test_rows():
  data = _data(np.random.default_rng(0))
  split = development.development_split(data, seed=3)
  private_rows = {r.tobytes() for r in data.private_x}
  test_rows = {r.tobytes() for r in data.test_x}
  held = {r.tobytes() for r in split.test_x}
  trained = {r.tobytes() for r in split.private_x}
  assert held <= private_rows and not held & test_rows
  assert not held & trained  # disjoint parts
  assert len(held) + len(trained) == len(private_rows)
  assert 0.15 < len(held) / len(private_rows) < 0.35  # about a quarter
  again = development.development_split(data, seed=3)
  np.testing.assert_array_equal(again.test_x, split.test_x)
  other = development.development_split(data, seed=4)
  assert not np.array_equal(other.test_x, split.test_x)


@pytest.mark.parametrize("epsilon", [1.0, 3.0, 8.0])
def test_matched_epsilon_keeps_the_full_sets_noise_to_size_ratio(epsilon):
  n_train, n_full = 750, 1000
  matched = development.matched_epsilon(epsilon, DELTA, n_train, n_full)
  assert matched > epsilon  # fewer examples: more epsilon for the same ratio
  sigma_full = noise_aware.single_release_sigma(epsilon, DELTA)
  sigma_dev = noise_aware.single_release_sigma(matched, DELTA)
  assert sigma_dev / n_train == pytest.approx(sigma_full / n_full, rel=2e-3)
  # The rules see the same released noise norm, hence the same geometry.
  rules = noise_aware.Rules()
  assert noise_aware.released_noise_norm(
      sigma_dev, rules.clip_norm, 1281, 10, n_train) == pytest.approx(
          noise_aware.released_noise_norm(sigma_full, rules.clip_norm, 1281,
                                          10, n_full), rel=2e-3)
  assert development.matched_epsilon(epsilon, DELTA, n_full,
                                     n_full) == pytest.approx(epsilon,
                                                              rel=2e-3)


def _run(*args):
  return subprocess.run([sys.executable, *args], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=900,
                        check=False)


def test_dev_sweep_runs_from_a_public_only_workdir(tmp_path):
  workdir, out = tmp_path / "wd", tmp_path / "sweep"
  made = _run("-m", "adamix_jax.launch.main", "--config", "digits",
              "--workdir", str(workdir), "--config.seeds=0",
              "--config.methods=public_only", "--config.progress=False")
  assert made.returncode == 0, made.stderr[-3000:]
  sweep = _run("-m", "experiments.dev_sweep", "--config", "digits",
               "--config.seeds=0", "--config.rules.max_steps=40",
               "--workdir", str(workdir), "--key", "rules.kappa",
               "--values", "15,30", "--epsilons", "1", "--methods",
               "adamix", "--repeats", "1", "--out", str(out))
  assert sweep.returncode == 0, sweep.stderr[-3000:]
  with open(out / "dev_sweep.json") as f:
    saved = json.load(f)
  assert saved["command"].startswith(
      "python -m experiments.dev_sweep --config digits --config.seeds=0")
  assert saved["config"]["rules"]["max_steps"] == 40
  records = saved["records"]
  assert sorted(r["value"] for r in records) == [15.0, 30.0]
  for record in records:
    assert record["epsilon"] == 1.0 and record["dev_epsilon"] > 1.0
    assert record["epsilon_spent"] <= record["dev_epsilon"] * (1 + 1e-6)
    assert 0.0 <= record["dev_error"] < 0.5 and record["steps"] <= 40
  with open(out / "dev_sweep.md") as f:
    assert "| adamix | 1 |" in f.read()
  bad = _run("-m", "experiments.dev_sweep", "--config", "digits",
             "--workdir", str(workdir), "--key", "rules.kapa", "--values",
             "1", "--out", str(tmp_path / "bad"))
  assert bad.returncode != 0
  assert "--key rules.kapa: the config has no field 'kapa'" in bad.stderr
  assert "Traceback" not in bad.stderr
  assert not (tmp_path / "bad").exists()


def test_bias_only_diagnostic_removes_the_noise_and_nothing_else():
  config = configs_lib.load("digits")
  data = _data(np.random.default_rng(0))
  plan = recipe_lib.make_recipe(config).plan("adamix", 1.0, data)
  assert plan.step_config.noise_multiplier > 0
  quiet = development.without_noise(plan)
  assert quiet.step_config.noise_multiplier == 0.0
  assert plan.step_config.noise_multiplier > 0  # the plan itself unchanged
  same = dataclasses.replace(quiet.step_config,
                             noise_multiplier=plan.step_config.noise_multiplier)
  assert same == plan.step_config
  assert (quiet.steps, quiet.sampling_rate, quiet.info) == (
      plan.steps, plan.sampling_rate, plan.info)
  assert quiet.feature_map is plan.feature_map and quiet.inputs is plan.inputs


def test_public_views_keep_the_image_first_and_move_its_pixels():
  from experiments import public_views  # pylint: disable=g-import-not-at-top
  image = np.zeros((8, 8, 3), np.uint8)
  image[3, 3] = 255  # one bright pixel at row 3, column 3
  out = public_views.views(image, "flip_shift")
  assert len(out) == 10 and len(public_views.views(image, "flip")) == 2
  assert np.array_equal(out[0], image)
  lit = [tuple(int(i) for i in np.argwhere(v[..., 0] == 255)[0]) for v in out]
  assert lit == [(3, 3), (3, 4),  # the image, mirrored
                 (3, 5), (3, 1), (5, 3), (1, 3),  # its shifts by 2
                 (3, 6), (3, 2), (5, 4), (1, 4)]  # the mirror's
  assert all(int(v.sum()) == 3 * 255 for v in out)
  # Content moved past the border is dropped, not wrapped around.
  edge = np.zeros((8, 8, 3), np.uint8)
  edge[3, 0] = 255
  assert public_views.views(edge, "flip_shift")[3].sum() == 0


def test_public_view_cosine_tells_copies_from_unrelated_rows():
  from experiments import public_views  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  images = rng.normal(size=(40, 16))
  groups = np.repeat(np.arange(40), 2)
  original = np.tile([True, False], 40)
  copies = np.repeat(images, 2, axis=0)
  assert public_views.view_cosine(copies, groups, original) == pytest.approx(1)
  unrelated = rng.normal(size=(80, 16))
  assert abs(public_views.view_cosine(unrelated, groups, original)) < 0.1
