r"""Empirical privacy audit (one training run) of AdaMix on digits.

  python experiments/audit.py --epsilons 1 8 --json /tmp/audit.json

For each epsilon: audits the configured AdaMix mechanism and the same
mechanism with its noise multiplier forced to 0 (broken on purpose), and
prints epsilon, mechanism, m, r, v, the certified lower bound and the
theoretical epsilon. A correct mechanism's bound is at most its epsilon with
probability >= 1 - beta; the broken one's is not bounded by anything. The
audit parameters are ``adamix_jax.audit.run.AuditConfig``'s defaults (fixed
in advance; see README "Privacy audit"). Exits 1 if a correct mechanism's
bound exceeds its epsilon (a privacy bug, or the beta-probability fluke).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

# pylint: disable=g-import-not-at-top
from adamix_jax.audit import run as audit_run
from adamix_jax.experiment import stages
# pylint: enable=g-import-not-at-top


def parse_args(argv=None) -> argparse.Namespace:
  defaults = audit_run.AuditConfig()
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 8.0])
  parser.add_argument("--mechanisms", nargs="+",
                      default=list(audit_run.MECHANISMS),
                      choices=audit_run.MECHANISMS)
  parser.add_argument("--data-seed", type=int, default=0,
                      help="public/private split seed of the digits config")
  parser.add_argument("--canary-seed", type=int, default=defaults.canary_seed)
  parser.add_argument("--train-seed", type=int, default=defaults.train_seed)
  parser.add_argument("--num-canaries", type=int,
                      default=defaults.num_canaries)
  parser.add_argument("--num-positive", type=int,
                      default=defaults.num_positive)
  parser.add_argument("--num-negative", type=int,
                      default=defaults.num_negative)
  parser.add_argument("--beta", type=float, default=defaults.beta)
  parser.add_argument("--reference", default=defaults.reference,
                      choices=audit_run.REFERENCES)
  parser.add_argument("--workdir", default=None,
                      help="digits features/public_init (default: a temp dir)")
  parser.add_argument("--json", default=None,
                      help="write the results, command, seeds and config here")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  audit_config = audit_run.AuditConfig(
      num_canaries=args.num_canaries, num_positive=args.num_positive,
      num_negative=args.num_negative, beta=args.beta,
      canary_seed=args.canary_seed, train_seed=args.train_seed,
      reference=args.reference)
  config = audit_run.digits_config(args.data_seed, progress=True)
  with tempfile.TemporaryDirectory() as tmp:
    workdir = args.workdir or tmp
    audit_run.prepare(config, workdir)
    data = stages.load_seed(config, stages.Workdir(workdir), args.data_seed)
    results = []
    start = time.time()
    for epsilon in args.epsilons:
      for mechanism in args.mechanisms:
        results.append(audit_run.audit(
            config, data, epsilon, audit_config, mechanism,
            progress=lambda line: print(line, flush=True)))
  print()
  print(audit_run.format_table(results))
  failed = [r for r in results if r.mechanism == "adamix" and not r.consistent]
  for r in results:
    if r.mechanism != "adamix" and r.lower_bound > r.epsilon:
      print(f"broken mechanism ({r.mechanism}) configured at epsilon "
            f"{r.epsilon:g} certified epsilon >= {r.lower_bound:.3f}: the "
            "audit detects it.")
  for r in failed:
    print(f"VIOLATION: adamix at epsilon {r.epsilon:g} certified epsilon >= "
          f"{r.lower_bound:.3f}.")
  if args.json:
    record = {"command": shlex.join([sys.executable] + sys.argv),
              "audit_config": dataclasses.asdict(audit_config),
              "data_seed": args.data_seed,
              "digits_config": config.to_dict(),
              "seconds": round(time.time() - start, 3),
              "results": [r.as_dict() for r in results]}
    with open(args.json, "w") as f:
      json.dump(record, f, indent=1, default=str)
    print(f"wrote {args.json}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
