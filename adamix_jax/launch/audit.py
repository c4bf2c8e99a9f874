r"""Empirical privacy audit of AdaMix on digits (``adamix-audit``).

  adamix-audit --epsilons 1 2 --mechanisms correct,no_noise,half_noise,no_clip \
      --json out.json
  python experiments/audit.py ...        # the same command (a shim)

For each epsilon and each mechanism, one audited private run; writes one
record per (epsilon, mechanism) with ``epsilon``, ``mechanism`` and
``lower_bound`` (plus the canaries, confidence, error rates, seconds) and
prints a table. ``--audit whitebox`` (default): M Dirac gradient canaries
observed in every released update, Clopper-Pearson bound
(``adamix_jax.audit.whitebox``). ``--audit blackbox``: the weak one-run audit
of the final head with 200 feature canaries (``adamix_jax.audit.run``).

Mechanisms: ``correct`` (as configured) and, broken on purpose,
``no_noise`` (sigma = 0), ``half_noise`` (sigma / 2), ``no_clip`` (no
clipping; white-box only) and ``noise_x<f>`` (sigma times f, white-box
only: the power curve). Exits 1 if ``correct`` certifies above its
epsilon (a privacy bug, or the beta-probability fluke).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
import tempfile
import time

from adamix_jax.audit import rates
from adamix_jax.audit import run as blackbox
from adamix_jax.audit import whitebox
from adamix_jax.experiment import stages

AUDITS = ("whitebox", "blackbox")


def _known(name: str) -> bool:
  try:
    whitebox.noise_factor(name)
  except ValueError:
    return False
  return True


def _mechanism_list(text: str) -> list[str]:
  names = [name for name in text.split(",") if name]
  unknown = [name for name in names if not _known(name)]
  if unknown or not names:
    raise argparse.ArgumentTypeError(
        f"unknown mechanism(s) {unknown}; choose from "
        f"{','.join(whitebox.MECHANISMS)} or noise_x<f> (sigma times f)")
  return names


def parse_args(argv=None) -> argparse.Namespace:
  white, black = whitebox.WhiteBoxConfig(), blackbox.AuditConfig()
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--audit", default="whitebox", choices=AUDITS)
  parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 2.0])
  parser.add_argument("--mechanisms", type=_mechanism_list, nargs="+",
                      default=None,
                      help="comma-separated, from " +
                      ",".join(whitebox.MECHANISMS) + " and noise_x<f> "
                      "(sigma times f, white-box only; default: the four "
                      "(black-box: no no_clip))")
  parser.add_argument("--data-seed", type=int, default=0,
                      help="public/private split seed of the digits config")
  parser.add_argument("--canary-seed", type=int, default=0)
  parser.add_argument("--train-seed", type=int, default=0)
  parser.add_argument("--beta", type=float, default=0.05)
  parser.add_argument("--num-canaries", type=int, default=None,
                      help=f"white-box default {white.num_canaries}, "
                      f"black-box {black.num_canaries}")
  parser.add_argument("--canary-norm", type=float, default=white.canary_norm,
                      help="white-box: each canary's gradient norm G")
  parser.add_argument("--no-one-run", action="store_true",
                      help="white-box: skip the one-run cross-check bound")
  parser.add_argument("--num-positive", type=int, default=black.num_positive,
                      help="black-box: 'in' guesses")
  parser.add_argument("--num-negative", type=int, default=black.num_negative,
                      help="black-box: 'out' guesses")
  parser.add_argument("--reference", default=black.reference,
                      choices=blackbox.REFERENCES, help="black-box")
  parser.add_argument("--path", default=None,
                      choices=("closed_form", "vmap"),
                      help="the linear head's backend (config.train.path); "
                      "default: the digits config's")
  parser.add_argument("--workdir", default=None,
                      help="digits features/public_init (default: a temp dir)")
  parser.add_argument("--json", default=None,
                      help="write the records, command and config here")
  args = parser.parse_args(argv)
  if args.mechanisms is None:
    args.mechanisms = list(whitebox.MECHANISMS if args.audit == "whitebox"
                           else blackbox.MECHANISMS)
  else:
    args.mechanisms = [m for group in args.mechanisms for m in group]
  if args.audit == "blackbox":
    refused = [m for m in args.mechanisms if m not in blackbox.MECHANISMS]
    if refused:
      parser.error(f"the black-box audit runs {blackbox.MECHANISMS}, not "
                   f"{refused}")
  return args


def _audit_config(args):
  if args.audit == "whitebox":
    return whitebox.WhiteBoxConfig(
        num_canaries=args.num_canaries or whitebox.WhiteBoxConfig.num_canaries,
        canary_norm=args.canary_norm, beta=args.beta,
        canary_seed=args.canary_seed, train_seed=args.train_seed)
  return blackbox.AuditConfig(
      num_canaries=args.num_canaries or blackbox.AuditConfig.num_canaries,
      num_positive=args.num_positive, num_negative=args.num_negative,
      beta=args.beta, canary_seed=args.canary_seed,
      train_seed=args.train_seed, reference=args.reference)


def format_table(records: list[dict]) -> str:
  """A plain-text table of white-box records."""
  header = ("epsilon", "mechanism", "eps as run", "lower bound", "ceiling",
            "one-run bound", "out > tau", "in <= tau", "test", "seconds")
  rows = [header]
  for r in records:
    one_run = r.get("one_run_bound")
    rows.append((
        f"{r['epsilon']:g}", r["mechanism"],
        "inf" if math.isinf(r["epsilon_as_run"]) else
        f"{r['epsilon_as_run']:.3g}",
        f"{r['lower_bound']:.3f}", f"{r['max_certifiable']:.2f}",
        "-" if one_run is None else f"{one_run:.3f}",
        f"{r['false_positives']}/{r['num_out']}",
        f"{r['false_negatives']}/{r['num_in']}", r["direction"],
        f"{r['seconds']:.0f}"))
  widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
  lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths))
           for row in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def _finite_or_none(tree):
  if isinstance(tree, dict):
    return {k: _finite_or_none(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [_finite_or_none(v) for v in tree]
  if isinstance(tree, float) and not math.isfinite(tree):
    return None
  return tree


def main(argv=None) -> int:
  args = parse_args(argv)
  audit_config = _audit_config(args)
  config = blackbox.digits_config(args.data_seed, progress=False)
  say = lambda line: print(line, flush=True)
  start = time.time()
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    workdir = args.workdir or tmp
    blackbox.prepare(config, workdir)
    data = stages.load_seed(config, stages.Workdir(workdir), args.data_seed)
    if args.path:  # after prepare: the backend is not part of the features
      config.train.path = args.path
    for epsilon in args.epsilons:
      for mechanism in args.mechanisms:
        if args.audit == "whitebox":
          results.append(whitebox.audit(config, data, epsilon, mechanism,
                                        audit_config, progress=say,
                                        one_run=not args.no_one_run))
        else:
          results.append(blackbox.audit(config, data, epsilon, audit_config,
                                        mechanism, progress=say))
  records = [r.as_dict() for r in results]
  print()
  if args.audit == "whitebox":
    print(format_table(records))
  else:
    print(blackbox.format_table(results))
  failed = [r for r in results if r.mechanism == "correct" and
            not r.consistent]
  for r in results:
    if r.mechanism != "correct":
      caught = "caught" if r.lower_bound > r.epsilon else "NOT caught"
      print(f"{r.mechanism} configured at epsilon {r.epsilon:g}: certified "
            f"epsilon >= {r.lower_bound:.3f}: {caught}.")
  for r in failed:
    certified = max(r.lower_bound, getattr(r, "one_run_bound", None) or 0.0)
    print(f"VIOLATION: correct at epsilon {r.epsilon:g} certified epsilon >= "
          f"{certified:.3f}.")
  if args.json:
    given = sys.argv[1:] if argv is None else list(argv)
    record = {"command": "adamix-audit " + shlex.join(given),
              "argv": [sys.argv[0]] + given,
              "audit": args.audit,
              "audit_config": dataclasses.asdict(audit_config),
              "selection_level": rates.SELECTION_LEVEL,
              "training_coins": "MechanismCoins.insecure_from_seed("
                                f"{args.train_seed})",
              "data_seed": args.data_seed,
              "digits_config": config.to_dict(),
              "seconds": round(time.time() - start, 3),
              "records": records}
    with open(args.json, "w") as f:
      # Standard JSON: an unbounded epsilon (no noise, no clipping) is null.
      json.dump(_finite_or_none(record), f, indent=1, default=str,
                allow_nan=False)
    print(f"wrote {args.json}")
  return 1 if failed else 0


def run() -> None:
  """Console entry point ``adamix-audit``."""
  sys.exit(main())


if __name__ == "__main__":
  run()
