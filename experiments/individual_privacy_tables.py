r"""Markdown tables of an 'analysis' stage summary (for the results note).

  adamix-train --workdir W --stages analysis
  python experiments/individual_privacy_tables.py W/analysis/summary.json

Prints two tables, each a mean over the seeds of the summary: individual
epsilons per (method, epsilon), and test error by isolation quintile. The
numbers are functions of the private data (data owner only): here the
"private" examples are public benchmark images, which is why they can be
printed at all.
"""

from __future__ import annotations

import collections
import json
import sys

import numpy as np

from adamix_jax.analysis import report

LABELS = report.METHOD_LABELS
ORDER = tuple(LABELS)


def _order(method: str) -> int:
  """Known methods in table order, any other after them (by name)."""
  return ORDER.index(method) if method in ORDER else len(ORDER)


def _label(method: str) -> str:
  return LABELS.get(method, method)


def _mean(values) -> float:
  values = [v for v in values if v is not None]
  return float(np.mean(values)) if values else float("nan")


def epsilon_table(summary: dict) -> str:
  groups = collections.defaultdict(list)
  for run in summary["runs"]:
    groups[(run["method"], run["epsilon"])].append(run)
  lines = [
      "| method | epsilon | seeds | p10 | median | p90 | at run's epsilon | "
      "clipped every step | pairs clipped | Spearman, nearest public | "
      "Spearman, kNN private | train error at / below run's epsilon |",
      "|" + "---|" * 12]
  for (method, eps), runs in sorted(
      groups.items(), key=lambda kv: (_order(kv[0][0]), kv[0][0],
                                      kv[0][1])):
    def get(key, runs=runs):
      return _mean(r[key] for r in runs)

    def rho(measure, runs=runs):
      return _mean(r["spearman_with_isolation"][measure] for r in runs)

    lines.append(
        f"| {_label(method)} | {eps:g} | {len(runs)} | "
        f"{get('individual_epsilon_p10'):.2f} | "
        f"{get('individual_epsilon_median'):.2f} | "
        f"{get('individual_epsilon_p90'):.2f} | "
        f"{100 * get('fraction_at_worst_case'):.0f}% | "
        f"{100 * get('fraction_clipped_every_step'):.0f}% | "
        f"{100 * get('fraction_of_pairs_clipped'):.0f}% | "
        f"{rho('nearest_public'):+.2f} | {rho('knn_private'):+.2f} | "
        f"{100 * get('train_error_at_worst_case'):.1f}% / "
        f"{100 * get('train_error_below_worst_case'):.1f}% |")
  return "\n".join(lines)


def error_table(summary: dict) -> str:
  curves = summary["test_error_by_isolation_quantile"]
  measures = list(curves)
  head = ["method", "epsilon"] + [
      f"{m.replace('_', ' ')}: Q{q + 1}" for m in measures for q in range(5)]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  keys = [(c["method"], c["epsilon"]) for c in curves[measures[0]]]
  for key in sorted(keys, key=lambda k: (k[1] or 0, _order(k[0]), k[0])):
    cells = [_label(key[0]), "-" if key[1] is None else f"{key[1]:g}"]
    for measure in measures:
      curve = next(c for c in curves[measure]
                   if (c["method"], c["epsilon"]) == key)
      cells += [f"{100 * e:.1f}" for e in curve["error_mean"]]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv) -> int:
  if len(argv) != 2:
    print(__doc__)
    return 2
  with open(argv[1]) as f:
    summary = json.load(f)
  print(epsilon_table(summary))
  print()
  print(error_table(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
