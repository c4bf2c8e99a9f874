"""results.md: the paper-style error table, the privacy of every run, and
what made them.

``markdown_table`` is the paper's table (test error per method and epsilon,
and its increase over the paragon); ``privacy_table`` has one row per
private run (epsilon spent, sigma, steps, q, set sizes); ``provenance`` is
the header (command, data, seeds, the config fields that differ from
``configs/base.py``); ``results_markdown`` puts them together, with the
whole config at the end.
"""

from __future__ import annotations

import collections
import datetime
import json
import platform
from typing import Iterable, Optional, Sequence

import numpy as np

from adamix_jax.privacy import randomness

COLUMNS = (("paragon", "Paragon"), ("public_only", "Public-only"),
           ("dp_sgd", "DP-SGD"), ("pillar", "PILLAR"),
           ("dp_prototypes", "DP prototypes"), ("adamix", "AdaMix"),
           ("zero_noise", "AdaMix, no noise (not private)"))
REFERENCE_METHODS = ("paragon", "public_only", "zero_noise")
# Not part of the experiment (the workdir does not save it either).
UNSHOWN_FIELDS = ("progress",)


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
  """One row per epsilon: test error (%) and error increase vs the paragon.

  The increase (and its explanation under the table) is shown only when the
  paragon ran (and has a non-zero error).
  """
  means = mean_errors(records)
  present = [(m, title) for m, title in COLUMNS
             if any(k[0] == m for k in means)]
  paragon = means.get(("paragon", None), (None,))[0]
  with_increase = paragon is not None and paragon > 0

  def title(method, name):
    if method == "paragon" or not with_increase:
      return f"{name} err %"
    return f"{name} err % (increase)"

  head = "| epsilon | " + " | ".join(title(m, t) for m, t in present) + " |"
  lines = [head, "|" + "---|" * (len(present) + 1)]
  for eps in epsilons:
    cells = []
    for method, _ in present:
      key = (method, None if method in REFERENCE_METHODS else float(eps))
      if key not in means:
        cells.append("n/a")
        continue
      mean, std, _ = means[key]
      cell = f"{100 * mean:.2f} ± {100 * std:.2f}"
      if method != "paragon" and with_increase:
        cell += f" ({error_increase(mean, paragon):+.0f}%)"
      cells.append(cell)
    lines.append(f"| {eps:g} | " + " | ".join(cells) + " |")
  seeds = sorted({r["seed"] for r in records})
  notes = [f"Mean ± std over seeds {seeds}."]
  if with_increase and len(present) > 1:
    notes.append("Increase = (error - paragon error) / paragon error.")
  references = [t for m, t in present if m in REFERENCE_METHODS]
  if references:
    notes.append(" and ".join(references) + (" does" if len(references) == 1
                                             else " do") +
                 " not depend on epsilon.")
  lines += ["", " ".join(notes)]
  return "\n".join(lines)


def _fmt(value, spec: str) -> str:
  return "n/a" if value is None else format(value, spec)


def privacy_table(records: Sequence[dict]) -> str:
  """One row per private run: its budget, what it spent and how.

  Epsilon spent is the PLD accountant's (the one enforced); the RDP
  accountant's, a cross-check, is an upper bound of it.
  """
  runs = sorted((r for r in records if r.get("epsilon") is not None),
                key=lambda r: ([m for m, _ in COLUMNS].index(r["method"])
                               if r["method"] in dict(COLUMNS) else 99,
                               r["epsilon"], r["seed"]))
  if not runs:
    return "No private runs."
  titles = dict(COLUMNS)
  lines = ["| method | epsilon | seed | epsilon spent | epsilon spent (RDP) "
           "| sigma | steps | q | private examples | public examples |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in runs:
    lines.append(
        f"| {titles.get(r['method'], r['method'])} | {r['epsilon']:g} | "
        f"{r['seed']} | {_fmt(r.get('epsilon_spent'), '.3f')} | "
        f"{_fmt(r.get('epsilon_spent_rdp'), '.3f')} | "
        f"{_fmt(r.get('noise_multiplier'), '.3f')} | "
        f"{_fmt(r.get('steps'), 'd')} | {_fmt(r.get('sampling_rate'), 'g')} | "
        f"{_fmt(r.get('private_examples'), 'd')} | "
        f"{_fmt(r.get('public_examples'), 'd')} |")
  delta = sorted({r["delta"] for r in runs if r.get("delta") is not None})
  lines += ["", f"delta = {', '.join(f'{d:g}' for d in delta)}. Epsilon spent: "
            "the PLD accountant on the run's ledger (the steps that ran), "
            "enforced <= epsilon; RDP: its cross-check (an upper bound). "
            "sigma: noise multiplier; q: Poisson sampling rate; the public "
            "examples are not used by DP-SGD."]
  return "\n".join(lines)


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def short_config(config) -> str:
  """The fields that differ from ``configs/base.py``: ``a.b=1, c='x'``."""
  from adamix_jax.configs import base  # pylint: disable=g-import-not-at-top
  defaults = _flat(base.get_config().to_dict())
  current = _flat(config.to_dict())
  changed = [f"{k}={v!r}" for k, v in sorted(current.items())
             if k not in UNSHOWN_FIELDS and
             (k not in defaults or defaults[k] != v)]
  return ", ".join(changed) if changed else "(all defaults)"


def provenance(config, command: str, records: Sequence[dict] = (),
               label: Optional[str] = None) -> str:
  """Header of results.md: what made these numbers."""
  warning = []
  if config.get("insecure_reproducible_noise", False):
    warning = [f"**WARNING, {randomness.INSECURE_NOTICE}** "
               "(config.insecure_reproducible_noise = True: anyone with the "
               "code and the seed can rebuild the noise; for debugging only).",
               ""]
  sizes = sorted({(r.get("public_examples"), r.get("private_examples"))
                  for r in records if r.get("private_examples") is not None})
  data = []
  if sizes:
    data = ["- data: " + "; ".join(
        f"{pub} public ({config.public_per_class} per class) and {priv} "
        "private training examples" for pub, priv in sizes) + " per seed"]
  return "\n".join([
      f"# AdaMix results: {label or config.dataset}",
      "",
      *warning,
      f"- command: `{command}`" if command else "- command: (library call)",
      *data,
      f"- seeds: {list(config.seeds)}; epsilons: {list(config.epsilons)}; "
      f"delta: {config.delta}",
      f"- config (fields that differ from configs/base.py; all of them at the "
      f"end and in config.json): `{short_config(config)}`",
      f"- written: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}"
      f" on {platform.machine()} / Python {platform.python_version()}",
      ""])


def results_markdown(config, records: Sequence[dict], command: str = "",
                     label: Optional[str] = None) -> str:
  """The whole results.md."""
  full = {k: v for k, v in config.to_dict().items()
          if k not in UNSHOWN_FIELDS}
  parts = [provenance(config, command, records, label),
           "## Test error", "", markdown_table(records, config.epsilons), ""]
  if any(r.get("epsilon") is not None for r in records):
    parts += ["## Privacy of each run", "", privacy_table(records), ""]
  parts += ["<details><summary>The whole config</summary>", "", "```json",
            json.dumps(full, sort_keys=True, indent=1, default=str), "```",
            "", "</details>", ""]
  return "\n".join(parts)
