"""The 'analysis' stage: who pays for privacy, on a finished workdir.

  adamix-train --workdir W                       # the usual run first
  adamix-train --workdir W --stages analysis     # then this, for the owner

For every DP run (method, epsilon, seed) it reads the clipping-ratio counts
that the run recorded while it trained (``individual_counts.npz``, next to
its ``ledger.json``: ``config.analysis.individual_privacy``) and turns them
into individual epsilons (``privacy.individual``: each example's own
RDP composition, capped by the run's epsilon). It measures the isolation of
every private and test example from features only (``isolation``), and
writes under ``W/analysis/``:

  individual_privacy.csv     one row per (method, epsilon, seed, private
                             example): index, label, isolation (both
                             measures), individual epsilon, correct under
                             the final model
  epsilon_vs_isolation.png   individual epsilon against isolation, DP-SGD
                             and AdaMix
  error_by_isolation.png     test error by isolation quintile: paragon,
                             public-only, DP-SGD, AdaMix
  summary.json               the numbers behind both figures

Nothing is re-run: the runs' sampler and noise came from secret coins that
were deleted with their checkpoints, so a re-run would be another run.

NOT RELEASABLE: individual epsilons (and the counts) are functions of the
private data. This is an analysis for the data owner; the figure to publish
is the run's worst-case epsilon (``accounting.json``).
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import jax.numpy as jnp
import numpy as np

from adamix_jax import io
from adamix_jax.analysis import isolation as isolation_lib
from adamix_jax.analysis import report as report_lib
from adamix_jax.experiment import recipe as recipe_lib
from adamix_jax.experiment import stages as stages_lib
from adamix_jax.experiment import workdir as workdir_lib
from adamix_jax.models import linear
from adamix_jax.privacy import accounting
from adamix_jax.privacy import individual

logger = logging.getLogger(__name__)

OUTPUT_DIR = "analysis"
TABLE = "individual_privacy.csv"
EPSILON_FIGURE = "epsilon_vs_isolation.png"
ERROR_FIGURE = "error_by_isolation.png"
SUMMARY = "summary.json"
NUM_BINS = 5  # quintiles


def correct_under(params: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """(M,) bool: the linear head's argmax is the label (as ``error_rate``)."""
  predictions = np.asarray(jnp.argmax(linear.logits(params, jnp.asarray(x)),
                                      axis=-1))
  return predictions == np.asarray(y)


def recording_statistics(recorder: individual.IndividualRecorder) -> dict:
  """How often the run's examples were clipped (from its level counts)."""
  counts = recorder.counts
  total = max(int(counts.sum()), 1)
  top = counts[:, recorder.levels]
  return {
      "steps": recorder.steps, "levels": recorder.levels,
      # Of all (example, step) pairs: the share at r = 1 (clipped, or within
      # the 1e-5 slack of C_t), and the mean ratio at its grid level.
      "fraction_of_pairs_clipped": float(top.sum() / total),
      "fraction_clipped_every_step": float(np.mean(top == recorder.steps)),
      "mean_ratio": float((counts @ individual.level_ratios(
          recorder.levels)).sum() / total)}


class _WorstCase:
  """The PLD epsilon of each distinct ledger, computed once (the seeds of
  one epsilon share sigma, q and T)."""

  def __init__(self):
    self._cache: dict[str, float] = {}

  def __call__(self, ledger: accounting.PrivacyLedger) -> float:
    key = io.dump_json_string(ledger.to_dict())
    if key not in self._cache:
      self._cache[key] = ledger.epsilon("pld")
    return self._cache[key]


def _load_counts(path: str) -> Optional[individual.IndividualRecorder]:
  if not os.path.exists(path):
    return None
  return individual.IndividualRecorder.from_arrays(
      workdir_lib.load_npz_output(path, "private"))


def run_analysis(config, workdir: workdir_lib.Workdir) -> dict:
  """The stage (see the module docstring); returns the summary."""
  if recipe_lib.model_kind(config) != "linear":
    raise ValueError(
        "the 'analysis' stage covers linear heads (individual accounting "
        "needs the closed-form per-example norms); config.model.kind is "
        f"{recipe_lib.model_kind(config)!r}.")
  recipe = recipe_lib.make_recipe(config)
  features = stages_lib.load_features(workdir)
  worst_case = _WorstCase()
  runs, test_sets, recording, without_counts = [], [], {}, []
  for seed in config.seeds:
    data = stages_lib.load_seed(config, workdir, seed, features)
    private_isolation = isolation_lib.private_isolation(
        data.private_x, data.private_y, data.public_x, data.public_y)
    test_isolation = isolation_lib.isolation_of_test_examples(
        data.test_x, data.test_y, data.private_x, data.public_x,
        data.public_y)
    correct = {}
    if "public_only" in config.methods:
      correct[("public_only", None)] = correct_under(
          data.public_params, data.test_x, data.test_y)
    for method, epsilon, out, params in stages_lib.trained_runs(
        config, workdir, recipe, seed, data):
      correct[(method, epsilon)] = correct_under(params, data.test_x,
                                                 data.test_y)
      if method not in stages_lib.DP_METHODS or method == "dp_prototypes":
        # DP prototypes: one release; with the unit-norm features every
        # x~ has norm sqrt(2), the bound (ratio 1), so each individual
        # epsilon is the run's: nothing is recorded.
        continue
      recorder = _load_counts(os.path.join(out, stages_lib.INDIVIDUAL_COUNTS))
      if recorder is None:
        without_counts.append(out)
        continue
      ledger = accounting.PrivacyLedger.load(os.path.join(out, "ledger.json"))
      result = individual.individual_epsilons(
          recorder, ledger, worst_case_epsilon=worst_case(ledger))
      runs.append(report_lib.RunAnalysis(
          method=method, epsilon=float(epsilon), seed=seed,
          index=np.arange(len(data.private_y)), label=data.private_y,
          isolation=private_isolation, individual_epsilon=result.epsilon,
          individual_epsilon_rdp=result.epsilon_rdp,
          worst_case_epsilon=result.worst_case,
          correct=correct_under(params, data.private_x, data.private_y)))
      recording[(method, float(epsilon), seed)] = {
          **recording_statistics(recorder),
          "worst_case_epsilon_rdp": result.worst_case_rdp}
    test_sets.append(report_lib.TestSet(seed=seed, isolation=test_isolation,
                                        correct=correct))
  if without_counts:
    logger.warning(
        "%d run(s) recorded no individual privacy counts (e.g. %s): they are "
        "left out of the table and the epsilon figure. Record them with "
        "config.analysis.individual_privacy=True (a new run).",
        len(without_counts), without_counts[0])

  directory = workdir.path(OUTPUT_DIR)
  name = config.get("dataset_label") or config.dataset
  report_lib.write_per_example_table(os.path.join(directory, TABLE), runs)
  if runs:
    report_lib.plot_epsilon_vs_isolation(
        runs, os.path.join(directory, EPSILON_FIGURE),
        title=f"{name}: individual epsilon vs isolation, seeds "
        f"{list(config.seeds)} ({report_lib.NOT_RELEASABLE})")
  curves = report_lib.error_by_isolation(test_sets, NUM_BINS)
  report_lib.plot_error_by_isolation(
      curves, os.path.join(directory, ERROR_FIGURE), NUM_BINS,
      title=f"{name}: test error by isolation quintile, mean over seeds "
      f"{list(config.seeds)}")
  summary = report_lib.summarize(runs, curves, recording)
  summary["runs_without_counts"] = without_counts
  summary["isolation_measures"] = dict(isolation_lib.MEASURE_LABELS)
  io.save_json(os.path.join(directory, SUMMARY), summary)
  return summary
