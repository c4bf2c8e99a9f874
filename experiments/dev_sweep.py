r"""One config field swept on DEVELOPMENT splits (never the test split).

  adamix-train --config digits --workdir /tmp/dev_digits \
      --config.methods=public_only        # features, splits, public starts
  python -m experiments.dev_sweep --config digits --workdir /tmp/dev_digits \
      --key rules.theta --values 0.025,0.05,0.1 --epsilons 1 \
      --out /tmp/dev_sweep_theta

For each value of ``--key``, each seed of the config, each epsilon and each
method (``--methods``, default AdaMix and DP-SGD, which share the
noise-aware rules), ``--repeats`` runs with fresh coins are trained on
three quarters of the seed's private set and scored on the fourth
(``experiments/development.py``), by default at the epsilon that gives the
development split the full set's noise-to-size ratio sigma_1 / N
(``--match_full_set``: the rules then pick the regime of the run the split
stands for). This is how a rule's constant is chosen without looking at
test data. Writes OUT/dev_sweep.json (one record per
run, the command and the config) and OUT/dev_sweep.md (mean development
error and its standard error).
"""

from __future__ import annotations

import copy
import json

from absl import flags
import numpy as np

from adamix_jax import configs as configs_lib
from adamix_jax.experiment import recipe as recipe_lib
from adamix_jax.launch import cli
from experiments import development

PROG = "experiments.dev_sweep"
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "A finished adamix-train workdir of the config (its "
    "features, splits and public starts are read).", required=True)
_OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)
_KEY = flags.DEFINE_string("key", None, "Dotted config field to sweep, e.g. "
                           "rules.theta.", required=True)
_VALUES = flags.DEFINE_list("values", None, "Its values.", required=True)
_EPSILONS = flags.DEFINE_list("epsilons", ["1", "3", "8"], "Target epsilons.")
_METHODS = flags.DEFINE_list("methods", ["adamix", "dp_sgd"],
                             "Private methods (recipe.train_dp names), or "
                             "public_only (the workdir's w_0 itself, scored "
                             "on the development quarter; nothing trained).")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Runs per (value, seed, "
                                "epsilon, method).")
_MATCH = flags.DEFINE_bool(
    "match_full_set", True, "Run each target epsilon at the development "
    "epsilon with the full private set's sigma_1 / N "
    "(development.matched_epsilon), so that the rules pick the regime of "
    "the run it stands for; --nomatch_full_set runs the epsilon as given.")


def _with_value(config, key: str, text: str):
  """A copy of config with key set to text, cast to the field's type."""
  variant = copy.deepcopy(config)
  *parents, leaf = key.split(".")
  node = variant
  for name in parents:
    if name not in node:
      raise cli.UserError(f"--key {key}: the config has no field {name!r}.")
    node = node[name]
  if leaf not in node:
    raise cli.UserError(f"--key {key}: the config has no field {leaf!r}.")
  current = node[leaf]
  if isinstance(current, bool):
    value = text.lower() in ("1", "true", "yes")
  elif isinstance(current, (int, float, str)):
    value = type(current)(text)
  else:
    raise cli.UserError(f"--key {key}: only bool, int, float and str fields "
                        f"can be swept (it holds {type(current).__name__}).")
  node[leaf] = value
  recipe_lib.validate_config(variant)
  return variant, value


def main(argv):
  del argv
  config = flags.FLAGS.config
  configs_lib.split_comma_lists(config)
  epsilons = [float(e) for e in _EPSILONS.value]
  variants = [_with_value(config, _KEY.value, v) for v in _VALUES.value]
  rows = []
  for seed, data in development.seeds(config, _WORKDIR.value):
    # The development epsilon of each target (the split's size is the seed's).
    num_train = len(data.private_y)
    run_epsilons = {
        eps: (development.matched_epsilon(eps, float(config.delta),
                                          num_train,
                                          num_train + len(data.test_y))
              if _MATCH.value else eps) for eps in epsilons}
    for variant, value in variants:
      recipe = recipe_lib.make_recipe(variant)
      for eps, run_eps in run_epsilons.items():
        for method in _METHODS.value:
          if method == "public_only":  # no coins: one record per cell
            rows.append({"value": value, "seed": seed, "epsilon": eps,
                         "dev_epsilon": 0.0, "method": method,
                         "dev_error": recipe.test_error(data.public_params,
                                                        data),
                         "steps": 0, "epsilon_spent": 0.0})
            print(json.dumps(rows[-1]), flush=True)
            continue
          for _ in range(_REPEATS.value):
            run = recipe.train_dp(method, run_eps, seed, data)
            rows.append({"value": value, "seed": seed, "epsilon": eps,
                         "dev_epsilon": run_eps, "method": method,
                         "dev_error": recipe.test_error(run.params, data),
                         "steps": run.meta.get("steps"),
                         "epsilon_spent": run.ledger.epsilon()})
            print(json.dumps(rows[-1]), flush=True)
  matched = "Each epsilon was run as given (--nomatch_full_set). "
  if _MATCH.value:
    dev_eps = {e: np.mean([r["dev_epsilon"] for r in rows
                           if r["epsilon"] == e and
                           r["method"] != "public_only"] or [0.0])
               for e in epsilons}
    matched = ("Each epsilon is the target: the runs used the development "
               "epsilon with the full private set's sigma_1 / N (mean " +
               ", ".join(f"{e:g} -> {d:.2f}" for e, d in dev_eps.items()) +
               "). ")
  body = [f"Development error (%), mean ± standard error over seeds "
          f"{list(config.seeds)} x {_REPEATS.value} repeats. The development "
          "test set is a quarter of each seed's private set; the test split "
          "is not read. " + matched, "",
          "| method | epsilon | " + " | ".join(
              f"{_KEY.value} = {v}" for _, v in variants) + " |",
          "|---|---|" + "---|" * len(variants)]
  for method in _METHODS.value:
    for eps in epsilons:
      cells = [development.mean_and_error(
          [100 * r["dev_error"] for r in rows if r["value"] == value
           and r["epsilon"] == eps and r["method"] == method])
               for _, value in variants]
      body.append(f"| {method} | {eps:g} | " + " | ".join(cells) + " |")
  development.write_outputs(_OUT.value, "dev_sweep", "experiments.dev_sweep",
                            config, rows, f"{_KEY.value} on development "
                            "splits", body)


if __name__ == "__main__":
  development.run(PROG, main)
