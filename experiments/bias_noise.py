r"""Is a private run limited by its noise or by its optimisation? DEV splits.

  adamix-train --config digits --workdir /tmp/dev_digits \
      --config.methods=public_only        # features, splits, public starts
  python -m experiments.bias_noise --config digits --workdir /tmp/dev_digits \
      --epsilons 1 --out /tmp/bias_noise_digits

For each seed's development split (``experiments/development.py``; the test
split is never read), each target epsilon (matched to the full set's
sigma_1 / N, as ``dev_sweep`` does) and each method, the rules' plan is run
twice: as planned (noisy), and with the noise multiplier set to 0 and
nothing else changed (same T, step size, geometry, clipping, public
mixing, tail average). The second run is NOT private; it is a diagnostic:
its error is what the plan's optimisation reaches in T steps (bias), and
the gap to the noisy run is what the noise costs. A run whose bias-only
error sits far above the converged zero-noise diagnostic is limited by its
optimisation per unit of the step budget tau (conditioning, clipping), not
by noise; more tau then trades bias for noise one to one (see the
dev_sweeps README). Any config field can be set with --config.FIELD=VALUE.
Writes OUT/bias_noise.json and OUT/bias_noise.md, each with this command.
"""

from __future__ import annotations

import json

from absl import flags

from adamix_jax import configs as configs_lib
from adamix_jax.experiment import recipe as recipe_lib
from adamix_jax.privacy import accounting
from adamix_jax.train import fit as fit_lib
from experiments import development

PROG = "experiments.bias_noise"
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "A finished adamix-train workdir of the config (its "
    "features, splits and public starts are read).", required=True)
_OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)
_EPSILONS = flags.DEFINE_list("epsilons", ["1", "3", "8"], "Target epsilons.")
_METHODS = flags.DEFINE_list("methods", ["adamix", "dp_sgd"],
                             "Private methods with a noise-aware plan.")


def bias_only_error(recipe, plan: recipe_lib.RunPlan, data) -> float:
  """Development error (%) of ``plan`` run with sigma = 0 (not private: its
  own unbounded ledger, as ``recipe.zero_noise``)."""
  params = fit_lib.fit(recipe.program(development.without_noise(plan), data),
                       steps=plan.steps, ledger=accounting.PrivacyLedger(
                           float(recipe.config.delta)))
  return 100 * float(recipe.test_error(params, data))


def main(argv):
  del argv
  config = flags.FLAGS.config
  configs_lib.split_comma_lists(config)
  recipe = recipe_lib.make_recipe(config)
  epsilons = [float(e) for e in _EPSILONS.value]
  rows = []
  for seed, data in development.seeds(config, _WORKDIR.value):
    num_train = len(data.private_y)
    for eps in epsilons:
      run_eps = development.matched_epsilon(
          eps, float(config.delta), num_train, num_train + len(data.test_y))
      for method in _METHODS.value:
        plan = recipe.plan(method, run_eps, data)
        # The noisy run is a real one (its ledger holds it to run_eps).
        noisy = recipe.train_dp(method, run_eps, seed, data, plan=plan)
        rows.append({"seed": seed, "epsilon": eps, "dev_epsilon": run_eps,
                     "method": method, "steps": plan.steps,
                     "geometry": plan.info.get("geometry"),
                     "noisy": 100 * float(recipe.test_error(noisy.params,
                                                            data)),
                     "epsilon_spent": noisy.ledger.epsilon(),
                     "bias_only": bias_only_error(recipe, plan, data)})
        print(json.dumps(rows[-1]), flush=True)
  body = ["Development error (%), mean ± standard error over seeds "
          f"{list(config.seeds)}; epsilons matched to the full set's "
          "sigma_1 / N. 'Bias only': the same plan with sigma = 0 (not "
          "private); 'noise costs': the difference.", "",
          "| method | epsilon | steps | noisy | bias only | noise costs |",
          "|---|---|---|---|---|---|"]
  for method in _METHODS.value:
    for eps in epsilons:
      cell = [r for r in rows if r["method"] == method and r["epsilon"] == eps]
      steps = sorted({r["steps"] for r in cell})
      gaps = [r["noisy"] - r["bias_only"] for r in cell]
      body.append(
          f"| {method} | {eps:g} | {steps[0]}-{steps[-1]} | "
          f"{development.mean_and_error([r['noisy'] for r in cell])} | "
          f"{development.mean_and_error([r['bias_only'] for r in cell])} | "
          f"{development.mean_and_error(gaps)} |")
  development.write_outputs(_OUT.value, "bias_noise", PROG, config, rows,
                            "Bias and noise on development splits", body)


if __name__ == "__main__":
  development.run(PROG, main)
