r"""Cost of recording every private example's clipping ratio inside the step.

  python experiments/benchmarks/individual_recording.py --json OUT.json

For each problem (N private examples, d features, c classes, subspace), the
linear head's jitted private step with and without individual privacy
recording (``LinearHeadProgram(..., individual=...)``: all N norms from the
step's closed forms, rounded up and scatter-added into the (N, L + 1)
counts, in the same jitted program). After a warm-up that compiles every
padded batch size, blocks of ``--steps`` steps are timed alternately for
the two variants (so both see the same machine load); per step: the median
over blocks of the wall time and of the process CPU time.

Synthetic unit-norm features of the stated shapes (cost depends on shapes
only), AdaMix settings (public threshold and mixing), q = 0.1. The 1-minute
load average is stored with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from adamix_jax import io
from adamix_jax.adamix import settings
from adamix_jax.models import linear
from adamix_jax.privacy import individual
from adamix_jax.privacy import randomness
from adamix_jax.privacy import sampler as sampler_lib
from adamix_jax.train import linear_head

Q = 0.1
PROBLEMS = (
    # name, N, d, c, public per class, subspace kind, rank
    ("digits_default_shape", 1198, 64, 10, 5, "none", 0),
    ("fashion_mnist_default_shape", 1000, 1280, 10, 5, "none", 0),
    ("5000x1280x10_gradients_k50_dual", 5000, 1280, 10, 10, "gradients", 50),
)


def _data(n, d, c, seed):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, c, n)
  centers = rng.normal(size=(c, d))
  x = centers[y] + 2.0 * rng.normal(size=(n, d))
  return linear.normalize_features(x), y


def _program(problem, record: bool):
  _, n, d, c, per_class, kind, rank = problem
  x, y = _data(n, d, c, 0)
  px, py = _data(per_class * c, d, c, 1)
  config = settings.StepConfig(
      noise_multiplier=1.0, expected_batch_size=Q * n, learning_rate=2.0,
      adaptive_threshold=True, public_weight=len(py) / (len(py) + n))
  recorder = individual.IndividualRecorder(n) if record else None
  return linear_head.LinearHeadProgram(
      x, y, px, py, linear.zeros(d, c), config, steps=10_000,
      sampling_rate=Q, subspace=settings.SubspaceSpec(kind, rank),
      individual=recorder)


def measure(problem, steps: int, blocks: int) -> dict:
  coins = randomness.MechanismCoins.insecure_from_seed(0)
  sampler = sampler_lib.PoissonSampler(problem[1], Q, coins.sampler_seed)
  batches = [sampler.batch(t) for t in range(steps)]
  variants = {}
  for record in (False, True):
    program = _program(problem, record)
    state = program.init(coins)
    for t, batch in enumerate(batches):  # compiles every padded size
      state, _ = program.step(t, state, batch)
    jax.block_until_ready(state)
    variants[record] = [program, state, [], []]
  for _ in range(blocks):
    for record, entry in variants.items():
      program, state, walls, cpus = entry
      wall, cpu = time.perf_counter(), time.process_time()
      for t, batch in enumerate(batches):
        state, _ = program.step(t, state, batch)
      jax.block_until_ready(state)
      walls.append((time.perf_counter() - wall) / steps * 1e3)
      cpus.append((time.process_time() - cpu) / steps * 1e3)
      entry[1] = state
  out = {"problem": problem[0], "N": problem[1], "d": problem[2],
         "c": problem[3], "subspace": problem[5],
         "representation": variants[False][0].representation}
  for record, (_, _, walls, cpus) in variants.items():
    name = "recorded" if record else "plain"
    out[f"{name}_step_ms"] = round(statistics.median(walls), 4)
    out[f"{name}_step_cpu_ms"] = round(statistics.median(cpus), 4)
  out["overhead_wall"] = round(out["recorded_step_ms"] /
                               out["plain_step_ms"] - 1, 3)
  out["overhead_cpu"] = round(out["recorded_step_cpu_ms"] /
                              out["plain_step_cpu_ms"] - 1, 3)
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--blocks", type=int, default=7)
  parser.add_argument("--problems", default="",
                      help="comma-separated names (default: all)")
  parser.add_argument("--json", default="")
  args = parser.parse_args(argv)
  chosen = [p for p in PROBLEMS
            if not args.problems or p[0] in args.problems.split(",")]
  results = {"load_average_1min": os.getloadavg()[0],
             "cpu_count": os.cpu_count(), "problems": []}
  for problem in chosen:
    results["problems"].append(measure(problem, args.steps, args.blocks))
    print(json.dumps(results["problems"][-1]), flush=True)
  results["load_average_1min_after"] = os.getloadavg()[0]
  if args.json:
    io.save_json(args.json, results)
  return 0


if __name__ == "__main__":
  sys.exit(main())
