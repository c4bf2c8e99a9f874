"""The paper-style table: errors per method and their increase over the paragon."""

from __future__ import annotations

import collections
import datetime
import json
import platform
from typing import Iterable, Sequence

import numpy as np

from adamix_jax.privacy import randomness

COLUMNS = (("paragon", "Paragon"), ("public_only", "Public-only"),
           ("dp_sgd", "DP-SGD"), ("adamix", "AdaMix"))


def mean_errors(records: Iterable[dict]) -> dict[tuple[str, float | None], tuple[float, float, int]]:
  """(method, epsilon) -> (mean test error, std over seeds, number of seeds)."""
  grouped = collections.defaultdict(list)
  for r in records:
    grouped[(r["method"], r["epsilon"])].append(r["test_error"])
  return {k: (float(np.mean(v)), float(np.std(v)), len(v))
          for k, v in grouped.items()}


def error_increase(error: float, paragon: float) -> float:
  """(error - paragon) / paragon, in percent."""
  return 100.0 * (error - paragon) / paragon if paragon > 0 else float("inf")


def markdown_table(records: Sequence[dict], epsilons: Sequence[float]) -> str:
  """One row per epsilon: test error (%) and error increase vs the paragon."""
  means = mean_errors(records)
  present = [(m, title) for m, title in COLUMNS
             if any(k[0] == m for k in means)]
  paragon = means.get(("paragon", None), (None,))[0]
  head = "| epsilon | " + " | ".join(
      f"{title} err % (increase)" if m != "paragon" else f"{title} err %"
      for m, title in present) + " |"
  lines = [head, "|" + "---|" * (len(present) + 1)]
  for eps in epsilons:
    cells = []
    for method, _ in present:
      key = (method, None if method in ("paragon", "public_only") else float(eps))
      if key not in means:
        cells.append("n/a")
        continue
      mean, std, n = means[key]
      cell = f"{100 * mean:.2f} ± {100 * std:.2f}"
      if method != "paragon" and paragon is not None:
        cell += f" (+{error_increase(mean, paragon):.0f}%)"
      cells.append(cell)
    lines.append(f"| {eps:g} | " + " | ".join(cells) + " |")
  seeds = sorted({r["seed"] for r in records})
  lines.append("")
  lines.append(f"Mean ± std over seeds {seeds}. Increase = (error - paragon "
               "error) / paragon error. Public-only and paragon do not depend "
               "on epsilon.")
  return "\n".join(lines)


def provenance(config, command: str) -> str:
  """Header of results.md: what made these numbers."""
  config_json = json.dumps(config.to_dict(), sort_keys=True, default=str)
  warning = []
  if config.get("insecure_reproducible_noise", False):
    warning = [f"**WARNING, {randomness.INSECURE_NOTICE}** "
               "(config.insecure_reproducible_noise = True: anyone with the "
               "code and the seed can rebuild the noise; for debugging only).",
               ""]
  return "\n".join([
      f"# AdaMix results: {config.dataset}",
      "",
      *warning,
      f"- command: `{command}`" if command else "- command: (library call)",
      f"- seeds: {list(config.seeds)}; epsilons: {list(config.epsilons)}; "
      f"delta: {config.delta}",
      f"- written: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}"
      f" on {platform.machine()} / Python {platform.python_version()}",
      f"- config: `{config_json}`",
      ""])
