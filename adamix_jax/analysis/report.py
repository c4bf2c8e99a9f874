"""The per-example table, the two figures and the numbers behind them.

* ``per_example_table``: one CSV row per (method, epsilon, seed, private
  example): index, label, both isolation measures, individual epsilon (and
  its RDP value before the cap, and the run's worst case), correct under the
  final model.
* ``plot_epsilon_vs_isolation``: individual epsilon against isolation, DP-SGD
  and AdaMix in two colours (the seeds pooled); one column per epsilon, one
  row per measure.
* ``error_by_isolation`` and ``plot_error_by_isolation``: test error per
  quintile of the TEST examples' isolation, for paragon, public-only, DP-SGD
  and AdaMix (quintiles per seed, then the mean over seeds).
* ``summarize``: the numbers of both figures, JSON-ready.

Every file is written atomically (``adamix_jax.io``). For the data owner
only: individual epsilons are functions of the private data and must not be
published (see ``privacy.individual``).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io as std_io
import math
from typing import Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on a training machine
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from scipy import stats  # pylint: disable=g-import-not-at-top,wrong-import-position

from adamix_jax import io  # pylint: disable=g-import-not-at-top,wrong-import-position
from adamix_jax.analysis import isolation as isolation_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

TABLE_COLUMNS = ("method", "epsilon", "seed", "index", "label",
                 "isolation_nearest_public", "isolation_knn_private",
                 "individual_epsilon", "individual_epsilon_rdp",
                 "worst_case_epsilon", "correct_under_final_model")
METHOD_LABELS = {"paragon": "paragon", "public_only": "public-only",
                 "dp_sgd": "DP-SGD", "pillar": "PILLAR",
                 "dp_prototypes": "DP prototypes", "adamix": "AdaMix"}
# One colour per method (a method left to matplotlib's cycle took DP-SGD's
# blue).
METHOD_COLORS = {"paragon": "black", "public_only": "tab:gray",
                 "dp_sgd": "tab:blue", "pillar": "tab:green",
                 "dp_prototypes": "tab:purple", "adamix": "tab:orange"}
NOT_RELEASABLE = "data owner only, NOT releasable"


@dataclasses.dataclass(frozen=True)
class RunAnalysis:
  """One private run's per-example results (all arrays (N,)).

  index: position of each example in the seed's private set.
  """

  method: str
  epsilon: float
  seed: int
  index: np.ndarray
  label: np.ndarray
  isolation: isolation_lib.IsolationMeasures
  individual_epsilon: np.ndarray
  individual_epsilon_rdp: np.ndarray
  worst_case_epsilon: float
  correct: np.ndarray

  def __post_init__(self):
    n = len(self.index)
    for name in ("label", "individual_epsilon", "individual_epsilon_rdp",
                 "correct"):
      if len(getattr(self, name)) != n:
        raise ValueError(f"RunAnalysis.{name} has {len(getattr(self, name))} "
                         f"entries, expected {n}.")
    for name, values in self.isolation.as_dict().items():
      if len(values) != n:
        raise ValueError(f"isolation {name} has {len(values)} entries, "
                         f"expected {n}.")


@dataclasses.dataclass(frozen=True)
class TestSet:
  """One seed's test examples: their isolation and who gets them right.

  correct: (method, epsilon) -> (M,) bool; epsilon None for paragon and
  public-only.
  """

  seed: int
  isolation: isolation_lib.IsolationMeasures
  correct: Mapping[tuple[str, Optional[float]], np.ndarray]


def _format(value) -> str:
  if isinstance(value, (bool, np.bool_)):
    return str(int(value))
  if isinstance(value, (float, np.floating)):
    return "inf" if math.isinf(value) else repr(float(value))
  return str(value)


def per_example_table(runs: Sequence[RunAnalysis]) -> str:
  """The CSV text (``TABLE_COLUMNS``): one row per run and private example."""
  out = std_io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(TABLE_COLUMNS)
  for run in runs:
    measures = run.isolation
    for i in range(len(run.index)):
      writer.writerow([_format(v) for v in (
          run.method, float(run.epsilon), int(run.seed), int(run.index[i]),
          int(run.label[i]), float(measures.nearest_public[i]),
          float(measures.knn_private[i]), float(run.individual_epsilon[i]),
          float(run.individual_epsilon_rdp[i]),
          float(run.worst_case_epsilon), bool(run.correct[i]))])
  return out.getvalue()


def write_per_example_table(path: str, runs: Sequence[RunAnalysis]) -> int:
  """Writes the CSV atomically; returns the number of example rows."""
  io.save_text(path, per_example_table(runs))
  return sum(len(run.index) for run in runs)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
  """Spearman rank correlation over the finite pairs (NaN if undefined)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  keep = np.isfinite(x) & np.isfinite(y)
  if keep.sum() < 3 or np.ptp(x[keep]) == 0 or np.ptp(y[keep]) == 0:
    return float("nan")
  return float(stats.spearmanr(x[keep], y[keep]).statistic)


def _finite_for_plot(values: np.ndarray) -> tuple[np.ndarray, int]:
  """inf -> 5% beyond the largest finite value (drawn at the right edge)."""
  values = np.asarray(values, np.float64)
  infinite = ~np.isfinite(values)
  if not infinite.any():
    return values, 0
  finite = values[~infinite]
  edge = 1.05 * finite.max() if finite.size else 1.0
  return np.where(infinite, edge, values), int(infinite.sum())


def _save_figure(fig, path: str) -> None:
  buffer = std_io.BytesIO()
  fig.savefig(buffer, format="png", dpi=110)
  plt.close(fig)
  io.save_bytes(path, buffer.getvalue())


def _mean_spearman(runs: Sequence[RunAnalysis], measure: str) -> float:
  values = [spearman(r.isolation.as_dict()[measure], r.individual_epsilon)
            for r in runs]
  values = [v for v in values if not math.isnan(v)]
  return float(np.mean(values)) if values else float("nan")


def plot_epsilon_vs_isolation(runs: Sequence[RunAnalysis], path: str,
                              title: str = "") -> None:
  """Individual epsilon against isolation: columns epsilon, rows measure.

  The seeds of one (method, epsilon) are drawn together; the legend gives
  their pooled median, the share at the worst case and the mean over seeds
  of the Spearman correlation.
  """
  epsilons = sorted({float(r.epsilon) for r in runs})
  measures = isolation_lib.MEASURES
  groups = collections.defaultdict(list)
  for run in runs:
    groups[(float(run.epsilon), run.method)].append(run)
  fig, axes = plt.subplots(len(measures), max(len(epsilons), 1),
                           figsize=(4.4 * max(len(epsilons), 1),
                                    3.6 * len(measures)), squeeze=False)
  for col, eps in enumerate(epsilons):
    for row, measure in enumerate(measures):
      ax = axes[row, col]
      worst = None
      for (group_eps, method), members in sorted(groups.items()):
        if group_eps != eps:
          continue
        x, off_scale = _finite_for_plot(np.concatenate(
            [r.isolation.as_dict()[measure] for r in members]))
        y = np.concatenate([r.individual_epsilon for r in members])
        at_worst = np.mean(np.concatenate(
            [r.individual_epsilon >= r.worst_case_epsilon for r in members]))
        label = (f"{METHOD_LABELS.get(method, method)}: median "
                 f"{np.median(y):.2f}, {100 * at_worst:.0f}% at worst, "
                 f"Spearman {_mean_spearman(members, measure):+.2f}")
        if off_scale:
          label += f", {off_scale} at inf"
        ax.scatter(x, y, s=4, alpha=0.35, color=METHOD_COLORS.get(method),
                   label=label, edgecolors="none")
        worst = max(r.worst_case_epsilon for r in members)
      if worst is not None:
        ax.axhline(worst, color="red", linestyle="--", linewidth=1,
                   label=f"run's epsilon {worst:.2f}")
        ax.set_ylim(0, 1.45 * worst)  # room for the legend above the points
      ax.set_xlabel(isolation_lib.MEASURE_LABELS[measure], fontsize=8)
      ax.set_ylabel("individual epsilon")
      ax.set_title(f"epsilon = {eps:g}")
      ax.legend(fontsize=6.5, loc="upper left", markerscale=3)
  fig.suptitle(title or f"Individual epsilon vs isolation ({NOT_RELEASABLE})",
               fontsize=10)
  fig.tight_layout()
  _save_figure(fig, path)


@dataclasses.dataclass(frozen=True)
class ErrorCurve:
  """Test error per isolation quantile over seeds (bin 0: least isolated).

  error: (S, bins) per seed; count: (S, bins) examples per bin; mean, std:
  (bins,) over the seeds.
  """

  seeds: tuple[int, ...]
  error: np.ndarray
  count: np.ndarray

  @property
  def mean(self) -> np.ndarray:
    return np.mean(self.error, axis=0)

  @property
  def std(self) -> np.ndarray:
    return np.std(self.error, axis=0)


def error_by_isolation(test_sets: Sequence[TestSet], num_bins: int = 5
                       ) -> dict[str, dict[tuple[str, Optional[float]],
                                           ErrorCurve]]:
  """{measure: {(method, epsilon): ErrorCurve}} over the seeds' test sets.

  Each seed's quantiles come from its own test isolation (its public and
  private sets differ), shared by every method of that seed.
  """
  curves: dict = {}
  for measure in isolation_lib.MEASURES:
    per_key = collections.defaultdict(list)
    for test in test_sets:
      values = test.isolation.as_dict()[measure]
      bins = isolation_lib.quantile_bins(values, num_bins)
      for key, correct in test.correct.items():
        curve = isolation_lib.error_by_isolation_quantile(values, correct,
                                                          num_bins, bins)
        per_key[key].append((test.seed, curve))
    curves[measure] = {
        key: ErrorCurve(seeds=tuple(s for s, _ in items),
                        error=np.stack([c.error for _, c in items]),
                        count=np.stack([c.count for _, c in items]))
        for key, items in per_key.items()}
  return curves


def _order(key: tuple[str, Optional[float]]) -> tuple:
  method, eps = key
  methods = list(METHOD_LABELS)
  return (methods.index(method) if method in methods else len(methods),
          -1.0 if eps is None else eps)


def plot_error_by_isolation(curves: Mapping, path: str, num_bins: int = 5,
                            title: str = "") -> None:
  """Test error by quantile of test isolation; columns epsilon, rows measure.

  ``curves``: ``error_by_isolation``'s result. Paragon and public-only (no
  epsilon, dotted) are drawn in every column; error bars: std over seeds.
  """
  keys = {key for measure in curves.values() for key in measure}
  epsilons = sorted({e for (_, e) in keys if e is not None}) or [None]
  measures = list(curves)
  fig, axes = plt.subplots(len(measures), len(epsilons),
                           figsize=(4.4 * len(epsilons), 3.6 * len(measures)),
                           squeeze=False)
  positions = np.arange(1, num_bins + 1)
  for row, measure in enumerate(measures):
    for col, eps in enumerate(epsilons):
      ax = axes[row, col]
      for key in sorted(curves[measure], key=_order):
        method, method_eps = key
        if method_eps is not None and method_eps != eps:
          continue
        curve = curves[measure][key]
        ax.errorbar(positions, 100 * curve.mean,
                    yerr=100 * curve.std if len(curve.seeds) > 1 else None,
                    marker="o", markersize=4, capsize=2,
                    color=METHOD_COLORS.get(method),
                    linestyle="-" if method_eps is not None else ":",
                    label=METHOD_LABELS.get(method, method))
      ax.set_xticks(positions)
      ax.set_xlabel("quantile of test isolation (1 = least isolated)\n"
                    f"{isolation_lib.MEASURE_LABELS[measure]}", fontsize=8)
      ax.set_ylabel("test error (%)")
      ax.set_title("" if eps is None else f"epsilon = {eps:g}")
      ax.legend(fontsize=7)
  fig.suptitle(title or "Test error by isolation quantile", fontsize=10)
  fig.tight_layout()
  _save_figure(fig, path)


def _none_if_nan(value: float) -> Optional[float]:
  return None if math.isnan(value) else float(value)


def summarize(runs: Sequence[RunAnalysis],
              curves: Optional[Mapping] = None,
              recording: Optional[Mapping[tuple[str, float, int], dict]] = None
              ) -> dict:
  """The numbers behind the figures (JSON-ready).

  Per run: the run's epsilon, individual epsilon quantiles (10th, median,
  90th, mean), the share charged the full run's epsilon, Spearman
  correlations of individual epsilon with each isolation measure, and the
  private training error of the examples at the run's epsilon and of the
  others; ``recording``: (method, epsilon, seed) -> statistics of the
  run's ratio counts, merged in. ``curves``: ``error_by_isolation``'s
  result (mean, std and per-seed errors per quantile).
  """
  out: dict = {"note": "Individual epsilons depend on the private data: "
                       "for the data owner, NOT releasable.", "runs": []}
  for run in runs:
    eps = np.asarray(run.individual_epsilon, np.float64)
    at_worst = eps >= run.worst_case_epsilon
    correct = np.asarray(run.correct, bool)
    entry = {
        "method": run.method, "epsilon": float(run.epsilon),
        "seed": int(run.seed), "private_examples": int(len(eps)),
        "worst_case_epsilon": float(run.worst_case_epsilon),
        "individual_epsilon_p10": float(np.quantile(eps, 0.1)),
        "individual_epsilon_median": float(np.median(eps)),
        "individual_epsilon_p90": float(np.quantile(eps, 0.9)),
        "individual_epsilon_mean": float(eps.mean()),
        "fraction_at_worst_case": float(np.mean(at_worst)),
        "spearman_with_isolation": {
            name: _none_if_nan(spearman(values, eps))
            for name, values in run.isolation.as_dict().items()},
        "train_error_at_worst_case": (
            float(1 - correct[at_worst].mean()) if at_worst.any() else None),
        "train_error_below_worst_case": (
            float(1 - correct[~at_worst].mean()) if (~at_worst).any()
            else None)}
    if recording is not None:
      entry.update(recording.get((run.method, float(run.epsilon),
                                  int(run.seed)), {}))
    out["runs"].append(entry)
  if curves is not None:
    out["test_error_by_isolation_quantile"] = {
        measure: [{"method": method, "epsilon": eps,
                   "seeds": list(curve.seeds),
                   "error_mean": [float(e) for e in curve.mean],
                   "error_std": [float(e) for e in curve.std],
                   "error_per_seed": curve.error.tolist(),
                   "count_per_seed": curve.count.tolist()}
                  for (method, eps), curve in sorted(by_key.items(),
                                                     key=lambda kv: _order(
                                                         kv[0]))]
        for measure, by_key in curves.items()}
  return out
