"""Development splits: a quarter of each seed's PRIVATE set as the test set.

Rules and constants are chosen on these, never on the test split (the
project's standard: held-out benchmarks check that the rules generalise).
The quarter is fixed per seed (its own coin per record, seed 10000 + seed),
so every experiment that uses it scores on the same rows.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from adamix_jax import configs as configs_lib
from adamix_jax import io
from adamix_jax.adamix import noise_aware
from adamix_jax.experiment import recipe as recipe_lib
from adamix_jax.experiment import stages
from adamix_jax.experiment.workdir import Workdir
from adamix_jax.launch import cli
from adamix_jax.privacy import accounting

DEV_TEST_FRACTION = 0.25


def development_split(data: recipe_lib.SeedData,
                      seed: int) -> recipe_lib.SeedData:
  """The private set without its development quarter, whose rows become the
  'test' set; the real test split is dropped."""
  held = np.random.default_rng(10_000 + seed).random(
      len(data.private_y)) < DEV_TEST_FRACTION
  return dataclasses.replace(
      data, private_x=data.private_x[~held], private_y=data.private_y[~held],
      test_x=data.private_x[held], test_y=data.private_y[held])


def matched_epsilon(epsilon: float, delta: float, num_train: int,
                    num_full: int) -> float:
  """The epsilon at which a development run on ``num_train`` private
  examples has the full set's noise-to-size ratio sigma_1 / N.

  The noise-aware rules are functions of sigma_1 / N (the geometry switches
  from a top-k subspace to the full space where sigma_1 C sqrt(D c) / N
  crosses theta), and a development split holds only three quarters of the
  private set: at the same epsilon it sits in a noisier regime than the
  run it stands for (digits at epsilon 1: a 49-direction subspace on the
  development split, the full space on the full set). Running it at the
  epsilon whose sigma_1 is num_train / num_full of the target's keeps the
  regime. It is the epsilon of ONE full-batch Gaussian release at that
  sigma_1 (``noise_aware.single_release_sigma`` inverted).
  """
  sigma_1 = noise_aware.single_release_sigma(epsilon, delta)
  return accounting.compute_epsilon(sigma_1 * num_train / num_full, 1.0, 1,
                                    delta)


def without_noise(plan: recipe_lib.RunPlan) -> recipe_lib.RunPlan:
  """The same plan with sigma = 0 and nothing else changed: a diagnostic of
  what the plan's optimisation reaches (``bias_noise``), never a release."""
  return dataclasses.replace(plan, step_config=dataclasses.replace(
      plan.step_config, noise_multiplier=0.0))


def seeds(config, workdir_path: str):
  """(seed, development SeedData) for each seed of config, from a finished
  ``adamix-train`` workdir of it (features, splits and public starts)."""
  workdir = Workdir(workdir_path)
  features = stages.load_features(workdir)
  for seed in config.seeds:
    yield seed, development_split(
        stages.load_seed(config, workdir, seed, features), seed)


def mean_and_error(values) -> str:
  """'mean ± standard error' of a list of percentages."""
  return f"{np.mean(values):.2f} ± {np.std(values) / np.sqrt(len(values)):.2f}"


def write_outputs(out: str, stem: str, module: str, config, rows: list[dict],
                  title: str, body: list[str]) -> None:
  """OUT/stem.json (command, config, records) and OUT/stem.md (title, the
  command, body), the command being this process's ``python -m module``."""
  command = cli.typed_command(f"python -m {module}")
  os.makedirs(out, exist_ok=True)
  io.save_json(os.path.join(out, f"{stem}.json"),
               {"command": command, "config": config.to_dict(),
                "records": rows})
  lines = [f"# {title}: {configs_lib.label(config)}", "",
           f"Command: `{command}`", "", *body]
  with open(os.path.join(out, f"{stem}.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


def run(prog: str, main) -> None:
  """The entry point of a development-split experiment ``python -m prog``:
  ``--config`` (a packaged name or a config file) and its overrides."""
  cli.run_with_config(prog, main, "Dataset config: a packaged name or a "
                      "config file; --config.FIELD=VALUE overrides a field "
                      "(e.g. --config.private_per_class=500).")
