"""Development splits: a quarter of each seed's PRIVATE set as the test set.

Rules and constants are chosen on these, never on the test split (the
project's standard: held-out benchmarks check that the rules generalise).
The quarter is fixed per seed (its own coin per record, seed 10000 + seed),
so every experiment that uses it scores on the same rows.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from adamix_jax.experiment import recipe as recipe_lib

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
