r"""How much the 1/L ratio grid overstates individual epsilons (issue #13).

  adamix-train --workdir W --stages features,public_init    # any workdir
  python experiments/individual_grid_check.py --workdir W --epsilon 3 \
      --examples 5 --json out.json

Runs one private run per DP method (fresh secret coins: a new run, not the
workdir's) through ``LinearHeadProgram`` with its on-device recording, and
keeps, next to the recorded level counts, the EXACT ratio history
r_{i,t} = min(1, ||c_i(W~_t)|| / C_t) of a few random private examples
(the step's own closed forms at its input state, subspace and threshold,
without the 1e-5 slack). For those examples it composes the exact history
in dp_accounting (one Poisson-sampled Gaussian event per distinct ratio)
and compares with the gridded RDP epsilon from the counts, which must be
at least as large. It also checks that every recorded level is the
rounded-up level of the exact ratio, for every example and step.

Individual epsilons depend on the private data: data owner only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from adamix_jax import io
from adamix_jax.adamix import sensitivity
from adamix_jax.experiment import recipe as recipe_lib
from adamix_jax.experiment import stages
from adamix_jax.privacy import accounting
from adamix_jax.privacy import individual
from adamix_jax.privacy import randomness
from adamix_jax.privacy import sampler as sampler_lib
from adamix_jax.train import linear_head

_norms = jax.jit(sensitivity.all_example_norms)


def check_run(config, method: str, epsilon: float, data, tracked: np.ndarray,
              levels: int) -> dict:
  recipe = recipe_lib.make_recipe(config)
  train = config.train
  steps = recipe_lib.num_steps(config)
  sigma = recipe_lib.noise_multiplier(config, epsilon)
  recorder = individual.IndividualRecorder(len(data.private_y), levels)
  program = linear_head.LinearHeadProgram(
      data.private_x, data.private_y,
      config=recipe.step_config(method, sigma, data), steps=steps,
      sampling_rate=train.sampling_rate, flags=recipe.flags(),
      average_tail=train.average_tail, lr_schedule=train.lr_schedule,
      individual=recorder, **recipe.run_inputs(method, data))
  coins = randomness.MechanismCoins.fresh()
  state = program.init(coins)
  sampler = sampler_lib.PoissonSampler(
      program.num_examples, train.sampling_rate, coins.sampler_seed)
  ledger = accounting.PrivacyLedger(float(config.delta), float(epsilon))
  history, mismatched = [], 0
  cache = program._cache  # pylint: disable=protected-access
  for t in range(steps):
    head = jax.tree_util.tree_map(lambda a: a.copy(), state[0])  # donated
    before = np.array(state[2])
    state, metrics = program.step(t, state, sampler.batch(t))
    ledger.record(sigma, train.sampling_rate)
    norms = np.asarray(_norms(head, cache, state[1], program.private),
                       np.float64)
    exact = np.minimum(1.0, norms / float(metrics.threshold))
    level = (np.array(state[2]) - before).argmax(axis=1)
    scaled = exact * levels
    # The recorded level must be ceil(L r), up to the slack at a grid point.
    off_grid = np.abs(scaled - np.round(scaled)) > 1e-3
    mismatched += int(np.sum(level[off_grid] != np.ceil(scaled[off_grid])))
    history.append(exact[tracked])
  program.release(state)
  result = individual.individual_epsilons(recorder, ledger)
  history = np.asarray(history)
  examples = []
  for j, index in enumerate(tracked):
    start = time.time()
    exact_rdp = individual.exact_individual_rdp_epsilon(
        history[:, j], sigma, train.sampling_rate, float(config.delta))
    examples.append({
        "index": int(index), "exact_rdp_epsilon": exact_rdp,
        "gridded_rdp_epsilon": float(result.epsilon_rdp[index]),
        "overstatement": (float(result.epsilon_rdp[index]) / exact_rdp - 1
                          if exact_rdp > 0 else None),
        "seconds": round(time.time() - start, 1)})
  return {"method": method, "epsilon": epsilon, "steps": steps,
          "levels": levels, "run_epsilon": result.worst_case,
          "mismatched_levels": mismatched,
          "pairs_checked": int(steps * len(data.private_y)),
          "examples": examples}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--epsilon", type=float, default=3.0)
  parser.add_argument("--examples", type=int, default=5)
  parser.add_argument("--levels", type=int, default=individual.DEFAULT_LEVELS)
  parser.add_argument("--json", default="")
  args = parser.parse_args(argv)
  workdir = stages.Workdir(args.workdir)
  config = ml_collections.ConfigDict(io.load_json(workdir.path("config.json")))
  data = stages.load_seed(config, workdir, args.seed)
  tracked = np.sort(np.random.default_rng(args.seed).choice(
      len(data.private_y), args.examples, replace=False))
  results = []
  for method in stages.DP_METHODS:
    results.append(check_run(config, method, args.epsilon, data, tracked,
                             args.levels))
    print(json.dumps(results[-1]), flush=True)
  if args.json:
    io.save_json(args.json, results)
  return 0


if __name__ == "__main__":
  sys.exit(main())
