r"""CV time of the non-private heads' weight-decay search: sklearn vs jax.

  python experiments/benchmarks/cv_solver_speed.py --json /tmp/cv_solver.json
  python experiments/benchmarks/cv_solver_speed.py --quick   # digits only

Times ``public_init.select_weight_decay`` (stratified 5-fold CV over the
default 7-decay path, warm-started from the largest decay) with
``solver="sklearn"`` (float64 L-BFGS, one fold after another) and
``solver="jax"`` (optax L-BFGS in float32, folds vmapped, one jitted call per
decay), side by side in one process, on

* digits: sklearn.datasets.load_digits, 1797 x 64 unit-norm features, the
  first 1257 as the CV set (the repository's digits train split size);
* synthetic: 5000 x 1280, 10 classes (500 per class, like Fashion-MNIST
  features at 500/class): Gaussian classes around random means, unit norm.

For jax, the first call (``jax_first``: includes jit compilation) and the
median of ``--repeats`` later calls (``jax``) are reported; sklearn is the
median of ``--repeats`` calls. Wall time and process CPU time (all threads
of this process, ``time.process_time``) are reported, plus the selected
decay and the largest per-decay CV-error gap between the two solvers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np
from sklearn import datasets

from adamix_jax.adamix import public_init


def digits():
  x, y = datasets.load_digits(return_X_y=True)
  x = x / np.linalg.norm(x, axis=1, keepdims=True)
  return x[:1257], y[:1257], 10


def synthetic(n_per_class=500, dim=1280, classes=10, seed=0):
  rng = np.random.default_rng(seed)
  means = rng.normal(size=(classes, dim)) / np.sqrt(dim)
  y = np.repeat(np.arange(classes), n_per_class)
  x = 0.08 * means[y] + rng.normal(size=(len(y), dim)) / np.sqrt(dim)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  perm = rng.permutation(len(y))
  return x[perm], y[perm], classes


def timed(fn):
  wall, cpu = time.perf_counter(), time.process_time()
  out = fn()
  return out, time.perf_counter() - wall, time.process_time() - cpu


def bench(name, x, y, c, repeats):
  rows = {}
  def run(solver):
    return lambda: public_init.select_weight_decay(x, y, c, folds=5, seed=0,
                                                   solver=solver)
  cv_jax, w, p = timed(run("jax"))
  rows["jax_first"] = dict(wall_s=w, cpu_s=p, weight_decay=cv_jax.weight_decay)
  for solver in ("sklearn", "jax"):
    times = [timed(run(solver)) for _ in range(repeats)]
    cv = times[-1][0]
    rows[solver] = dict(wall_s=float(np.median([t[1] for t in times])),
                        cpu_s=float(np.median([t[2] for t in times])),
                        weight_decay=cv.weight_decay,
                        cv_errors={str(k): v for k, v in cv.cv_errors.items()})
  gap = max(abs(rows["sklearn"]["cv_errors"][k] - rows["jax"]["cv_errors"][k])
            for k in rows["sklearn"]["cv_errors"])
  return dict(problem=name, n=int(len(y)), dim=int(x.shape[1]), classes=c,
              max_cv_error_gap=gap, **rows)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", default=None)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--repeats", type=int, default=1)
  args = parser.parse_args()
  problems = [("digits 1257x64", digits())]
  if not args.quick:
    problems.append(("synthetic 5000x1280", synthetic()))
  results = [bench(name, *data, args.repeats) for name, data in problems]
  header = (f"{'problem':<22}{'solver':<11}{'wall s':>9}{'cpu s':>9}"
            f"{'decay':>10}{'max |dErr|':>12}")
  print(f"backend={jax.default_backend()} cpus={os.cpu_count()} "
        f"{platform.processor() or platform.machine()}")
  print(header)
  for r in results:
    for solver in ("sklearn", "jax_first", "jax"):
      s = r[solver]
      print(f"{r['problem']:<22}{solver:<11}{s['wall_s']:>9.2f}"
            f"{s['cpu_s']:>9.2f}{s['weight_decay']:>10.0e}"
            + (f"{r['max_cv_error_gap']:>12.4f}" if solver == "jax" else ""))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(backend=jax.default_backend(), cpus=os.cpu_count(),
                     jax_tol=public_init.JAX_TOL,
                     jax_max_iter=public_init.JAX_MAX_ITER,
                     results=results), f, indent=1)


if __name__ == "__main__":
  main()
