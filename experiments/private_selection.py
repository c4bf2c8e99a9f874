r"""Does private model selection pay? (issue #15, item 4). DEVELOPMENT splits.

  adamix-train --config digits --workdir /tmp/sel_digits \
      --config.methods=public_only        # features, splits, public starts
  python -m experiments.private_selection --config digits \
      --workdir /tmp/sel_digits --out experiments/results/private_selection/digits

The test split is never read. For each seed, a quarter of the private set
(a fixed coin per record, seed 10000 + seed) becomes the development test
set; AdaMix (the config's defaults) runs on the other three quarters with
``adamix.selection_fraction`` 0 (no selection), 0.1 and 0.2 (that fraction
of them is the validation part, privacy/selection.py), at epsilon 1, 3, 8,
``--repeats`` times each with fresh coins (the training noise, the split
and the selection differ between repeats). Writes OUT/selection.json (one
record per run) and OUT/selection.md (mean development error, its standard
error, the mean chosen t), each with this command. ``--fractions 0`` runs
no selection only; runs without selection also score every point of the
path on the development quarter (``path_dev_errors``, a diagnostic of
where on w_0 + t (w - w_0) the good points lie; nothing is released).
"""

from __future__ import annotations

import copy
import json

from absl import flags
import numpy as np

from adamix_jax import configs as configs_lib
from adamix_jax.experiment import recipe as recipe_lib
from adamix_jax.models import linear
from adamix_jax.privacy import selection as selection_lib
from experiments import development

PROG = "experiments.private_selection"
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "A finished adamix-train workdir of the config (its "
    "features, splits and public starts are read).", required=True)
_OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)
_REPEATS = flags.DEFINE_integer("repeats", 4, "Runs per (seed, epsilon, "
                                "fraction).")
_FRACTIONS_FLAG = flags.DEFINE_list(
    "fractions", ["0", "0.1", "0.2"], "selection_fraction values to run.")
_EPSILONS = (1.0, 3.0, 8.0)


def _table(rows: list[dict]) -> list[str]:
  fractions = _fractions()
  lines = ["| epsilon | " + " | ".join(
      "no selection" if f == 0 else f"selection, fraction {f}"
      for f in fractions) + " |", "|---|" + "---|" * len(fractions)]
  for eps in _EPSILONS:
    cells = []
    for frac in fractions:
      errors = [100 * r["dev_error"] for r in rows
                if r["epsilon"] == eps and r["fraction"] == frac]
      cell = development.mean_and_error(errors)
      if frac:
        cell += f" (t {np.mean([r['selection_t'] for r in rows if r['epsilon'] == eps and r['fraction'] == frac]):.2f})"
      cells.append(cell)
    lines.append(f"| {eps:g} | " + " | ".join(cells) + " |")
  return lines


def _fractions() -> tuple[float, ...]:
  return tuple(float(f) for f in _FRACTIONS_FLAG.value)


def _path_table(rows: list[dict]) -> list[str]:
  """Development error along w_0 + t (w - w_0) without selection: a
  diagnostic of where on the path the good points lie (every point is
  scored on the development test quarter; nothing here is a release)."""
  with_path = [r for r in rows if "path_dev_errors" in r]
  if not with_path:
    return []
  path = with_path[0]["path"]
  lines = ["", "Development error (%) at each point t of the path, no "
           "selection (diagnostic):", "",
           "| epsilon | " + " | ".join(f"t = {t:g}" for t in path) + " |",
           "|---|" + "---|" * len(path)]
  for eps in _EPSILONS:
    errors = np.array([r["path_dev_errors"] for r in with_path
                       if r["epsilon"] == eps])
    if errors.size:
      lines.append(f"| {eps:g} | " + " | ".join(
          f"{100 * e:.2f}" for e in errors.mean(axis=0)) + " |")
  return lines


def main(argv):
  del argv
  config = flags.FLAGS.config
  configs_lib.split_comma_lists(config)
  config.analysis.individual_privacy = False  # selection refuses it
  recipes = {}
  for fraction in _fractions():
    variant = copy.deepcopy(config)
    variant.adamix.selection_fraction = fraction
    recipe_lib.validate_config(variant)
    recipes[fraction] = recipe_lib.make_recipe(variant)
  rows = []
  for seed, data in development.seeds(config, _WORKDIR.value):
    for eps in _EPSILONS:
      for fraction, recipe in recipes.items():
        for _ in range(_REPEATS.value):
          run = recipe.train_dp("adamix", eps, seed, data)
          rows.append({"seed": seed, "epsilon": eps, "fraction": fraction,
                       "dev_error": recipe.test_error(run.params, data),
                       "selection_t": run.meta.get("selection_t", 1.0),
                       "epsilon_spent": run.ledger.epsilon()})
          if not fraction:
            path = [float(t) for t in config.adamix.selection_path]
            start = recipe.path_start(data)
            rows[-1]["path"] = path
            rows[-1]["path_dev_errors"] = [
                float(linear.error_rate(c, data.test_x, data.test_y))
                for c in selection_lib.path_candidates(
                    start, {k: np.asarray(v) for k, v in run.params.items()},
                    path)]
          print(json.dumps(rows[-1]), flush=True)
  development.write_outputs(
      _OUT.value, "selection", "experiments.private_selection", config, rows,
      "Private model selection on development splits",
      [f"AdaMix's development error (%), mean ± standard error over seeds "
       f"{list(config.seeds)} x {_REPEATS.value} repeats; (t) is the mean "
       "chosen point of w_0 + t (w - w_0). The development test set is a "
       "quarter of each seed's private set; the test split is not read.",
       "", *_table(rows), *_path_table(rows)])


if __name__ == "__main__":
  development.run(PROG, main)
