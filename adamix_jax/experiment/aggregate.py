r"""Every ``results.json`` under a folder -> tables, a CSV and a plot.

  adamix-aggregate --root /tmp/adamix_sweep --out /tmp/adamix_sweep/summary

Writes into ``--out``:

* ``results.md``: a summary table (one row per dataset, error increase over
  the paragon per method and epsilon, and an "average over datasets" row,
  the paper's headline number), then the paper-style table of each dataset
  (``adamix_jax.experiment.report.markdown_table``);
* ``results.csv``: every record (one per dataset, method, epsilon, seed),
  with the ``results.json`` it came from;
* ``privacy_utility.png``: test error vs epsilon, one panel per dataset,
  one line per private method (mean +- std over seeds), the paragon as a
  dashed and the public-only model as a dotted horizontal line.

A "dataset" is a (dataset, public_per_class) pair: the same data with a
different number of public examples is a different row. Works on a sweep
root (``adamix-sweep``) or on any folder of ``adamix-train`` workdirs.
"""

from __future__ import annotations

import collections
import csv
import io as io_lib
import math
import os
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from adamix_jax import io
from adamix_jax.experiment import report

CSV_FIELDS = ("dataset", "public_per_class", "method", "epsilon", "delta",
              "seed", "test_error", "epsilon_spent", "epsilon_spent_rdp",
              "noise_multiplier", "steps", "sampling_rate")
METHOD_TITLES = dict(report.COLUMNS)


def find_results(root: str) -> list[str]:
  """Every results.json under ``root`` (sorted)."""
  found = []
  for directory, _, files in os.walk(root):
    if "results.json" in files:
      found.append(os.path.join(directory, "results.json"))
  return sorted(found)


def collect(root: str) -> list[dict]:
  """All records under ``root``, each with ``source`` (its path from root)."""
  records = []
  for path in find_results(root):
    for record in io.load_json(path):
      record = dict(record)
      record["source"] = os.path.relpath(path, root)
      records.append(record)
  return records


def group_key(record: dict) -> tuple[str, int]:
  return record["dataset"], int(record.get("public_per_class") or 0)


def group_label(key: tuple[str, int], keys: Iterable[tuple[str, int]]) -> str:
  """"digits", or "digits (k=10)" when a dataset appears with several k."""
  dataset, k = key
  ks = {kk for d, kk in keys if d == dataset}
  return dataset if len(ks) == 1 else f"{dataset} (k={k})"


def grouped(records: Sequence[dict]) -> dict[tuple[str, int], list[dict]]:
  groups = collections.defaultdict(list)
  for r in records:
    groups[group_key(r)].append(r)
  return dict(sorted(groups.items()))


def epsilons_of(records: Iterable[dict]) -> list[float]:
  return sorted({float(r["epsilon"]) for r in records
                 if r.get("epsilon") is not None})


def dp_methods_of(records: Iterable[dict]) -> list[str]:
  present = {r["method"] for r in records if r.get("epsilon") is not None}
  ordered = [m for m, _ in report.COLUMNS if m in present]
  return ordered + sorted(present - set(ordered))


def _increase(means, method, epsilon) -> Optional[float]:
  paragon = means.get(("paragon", None))
  value = means.get((method, epsilon))
  if paragon is None or value is None or not paragon[0] > 0:
    return None
  return report.error_increase(value[0], paragon[0])


def summary_table(records: Sequence[dict]) -> str:
  """One row per dataset: paragon error and every method's error increase.

  The last row averages each column's increase over the datasets that have
  it (the paper's "average over datasets" headline).
  """
  groups = grouped(records)
  epsilons = epsilons_of(records)
  dp_methods = dp_methods_of(records)
  columns: list[tuple[str, Optional[float]]] = []
  if any(r["method"] == "public_only" for r in records):
    columns.append(("public_only", None))
  columns += [(m, eps) for eps in epsilons for m in dp_methods]

  def title(method, eps):
    name = METHOD_TITLES.get(method, method)
    return name if eps is None else f"{name} ε={eps:g}"

  lines = ["| dataset | Paragon err % | " +
           " | ".join(title(m, e) for m, e in columns) + " |",
           "|" + "---|" * (len(columns) + 2)]
  per_column = collections.defaultdict(list)
  for key, rs in groups.items():
    means = report.mean_errors(rs)
    paragon = means.get(("paragon", None))
    cells = [f"{100 * paragon[0]:.2f}" if paragon else "n/a"]
    for method, eps in columns:
      increase = _increase(means, method, eps)
      if increase is None:
        value = means.get((method, eps))
        cells.append(f"{100 * value[0]:.2f} err %" if value else "n/a")
      else:
        per_column[(method, eps)].append(increase)
        cells.append(f"{increase:+.0f}%")
    lines.append(f"| {group_label(key, groups)} | " + " | ".join(cells) + " |")
  average = []
  for column in columns:
    values = per_column.get(column, [])
    if not values:
      average.append("n/a")
    else:
      cell = f"{np.mean(values):+.0f}%"
      if len(values) < len(groups):
        cell += f" ({len(values)} of {len(groups)})"
      average.append(cell)
  lines.append("| **average over datasets** | | " + " | ".join(average) + " |")
  lines.append("")
  lines.append("Cells: error increase over the paragon, (error - paragon) / "
               "paragon, of the mean test error over seeds; the last row is "
               "its mean over the datasets.")
  return "\n".join(lines)


def markdown_report(records: Sequence[dict], root: str = "") -> str:
  groups = grouped(records)
  parts = ["# AdaMix sweep results", ""]
  if root:
    parts += [f"- collected from `{root}`: {len(records)} records, "
              f"{len({r['source'] for r in records})} results.json files", ""]
  parts += ["## Error increase over the paragon", "", summary_table(records),
            ""]
  for key, rs in groups.items():
    parts += [f"## {group_label(key, groups)}", "",
              report.markdown_table(rs, epsilons_of(rs)), ""]
  return "\n".join(parts)


def write_csv(records: Sequence[dict], path: str) -> None:
  extra = sorted({k for r in records for k in r} - set(CSV_FIELDS) -
                 {"source"})
  fields = list(CSV_FIELDS) + extra + ["source"]
  text = io_lib.StringIO()
  writer = csv.DictWriter(text, fieldnames=fields)
  writer.writeheader()
  for r in sorted(records, key=lambda r: (
      group_key(r), r["method"], r.get("epsilon") or 0.0, r["seed"])):
    writer.writerow({k: "" if r.get(k) is None else r.get(k)
                     for k in fields})
  io.save_text(path, text.getvalue())


def plot(records: Sequence[dict], path: str) -> None:
  """Privacy-utility curves, one panel per dataset, saved as a PNG.

  One legend for all panels, outside them on the right (lines never run
  through it); the figure grows with the panels so the title fits.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  groups = grouped(records)
  n = max(len(groups), 1)
  cols = min(n, 3)
  rows = math.ceil(n / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols + 1.8, 3.6 * rows
                                                + 0.6),
                           squeeze=False, layout="constrained")
  colors = {"dp_sgd": "tab:red", "adamix": "tab:blue"}
  legend: dict[str, Any] = {}
  for ax, (key, rs) in zip(axes.flat, groups.items()):
    means = report.mean_errors(rs)
    epsilons = epsilons_of(rs)
    for method in dp_methods_of(rs):
      xs = [e for e in epsilons if (method, e) in means]
      ys = [100 * means[(method, e)][0] for e in xs]
      err = [100 * means[(method, e)][1] for e in xs]
      ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3,
                  label=METHOD_TITLES.get(method, method),
                  color=colors.get(method))
    for method, style, color in (("paragon", "--", "black"),
                                 ("public_only", ":", "tab:gray")):
      if (method, None) in means:
        ax.axhline(100 * means[(method, None)][0], linestyle=style,
                   color=color, label=METHOD_TITLES[method])
    if epsilons:
      ax.set_xscale("log")
      ax.set_xticks(epsilons)
      ax.set_xticklabels([f"{e:g}" for e in epsilons])
      ax.minorticks_off()
    seeds = sorted({r["seed"] for r in rs})
    ax.set_title(f"{group_label(key, groups)} ({len(seeds)} seed"
                 f"{'s' if len(seeds) != 1 else ''})", fontsize=10)
    ax.set_xlabel("epsilon")
    ax.set_ylabel("test error (%)")
    ax.grid(True, alpha=0.3)
    for handle, label in zip(*ax.get_legend_handles_labels()):
      legend.setdefault(label, handle)
  for ax in list(axes.flat)[len(groups):]:
    ax.axis("off")
  if legend:
    fig.legend(list(legend.values()), list(legend), loc="outside right upper",
               fontsize=9, frameon=False)
  fig.suptitle("Test error vs epsilon\n(mean ± std over seeds)", fontsize=11)
  png = io_lib.BytesIO()
  fig.savefig(png, format="png", dpi=120)
  plt.close(fig)
  io.save_bytes(path, png.getvalue())


def aggregate(root: str, out: Optional[str] = None) -> dict[str, str]:
  """Writes results.md, results.csv and privacy_utility.png into ``out``.

  Returns their paths. Raises FileNotFoundError if ``root`` holds no
  results.json.
  """
  out = out or os.path.join(root, "summary")
  records = collect(root)
  if not records:
    raise FileNotFoundError(
        f"No results.json under {root}: point --root at a sweep root or a "
        "folder of adamix-train workdirs.")
  os.makedirs(out, exist_ok=True)
  paths = {"markdown": os.path.join(out, "results.md"),
           "csv": os.path.join(out, "results.csv"),
           "plot": os.path.join(out, "privacy_utility.png")}
  io.save_text(paths["markdown"], markdown_report(records, root) + "\n")
  write_csv(records, paths["csv"])
  plot(records, paths["plot"])
  return paths


def main(argv=None) -> None:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog="adamix-aggregate",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--root", required=True,
                      help="folder searched for results.json files")
  parser.add_argument("--out", default=None,
                      help="output folder (default ROOT/summary)")
  args = parser.parse_args(argv)
  paths = aggregate(args.root, args.out)
  records = collect(args.root)
  print(summary_table(records))
  print()
  for name, path in paths.items():
    print(f"wrote {name}: {path}")


def run() -> None:
  """Console entry point ``adamix-aggregate``: bad input is one line on
  stderr and exit code 2 (``launch.cli``)."""
  from adamix_jax.launch import cli  # pylint: disable=g-import-not-at-top
  cli.report_errors("adamix-aggregate", main)


if __name__ == "__main__":
  run()
