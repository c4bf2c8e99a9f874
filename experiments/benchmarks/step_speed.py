r"""Speed of one private step on a linear head, against the non-private floor.

  python experiments/benchmarks/step_speed.py --json /tmp/step_speed.json
  python experiments/benchmarks/step_speed.py --quick          # small grid

For each (feature dim d, classes c, batch B), with a public set of
``--public-per-class`` examples per class (n = 5c) and a private set of
``--private-multiple`` x B examples on the device, it times (after warm-up,
``--repeats`` interleaved rounds, median, ``jax.block_until_ready``):

* ``non_private``: the floor, a jitted forward + backward + SGD update on the
  gathered batch;
* ``dp_sgd`` via ``vmap`` (explicit per-example gradients) and via the
  ``closed_form`` (norms ||x|| ||e|| and one X^T diag(s) E product);
* ``adamix_w``: the default linear-head AdaMix (the noise-aware rules'
  AdaMix-W: a correction in the full whitened public geometry, w_0's logits
  fixed, a fixed C, the public gradient mixed in, no subspace);
* ``adamix`` (the paper's form: public-gradient subspace of rank k, adaptive threshold, public
  gradient mixed in) with the basis recomputed every step and every 10 steps
  (10 steps including one refresh, divided by 10), using the cached public
  Gram, the cached private-public kernel and the warm-started iterative
  basis: ``closed_form`` is the dual form, what ``train_private_head`` runs
  by default on one device (``representation="auto"``);
  ``closed_form_matrix`` the same update with the (d+1) x c matrix as the
  state (what runs data parallel); ``closed_form_uncached`` the matrix form
  without any cache and with a full ``eigh`` per refresh (the pre-speed-up
  code path); ``vmap`` when its per-example gradients fit under
  ``--vmap-limit-gib`` (B (d+1) c 4 bytes, plus B n c 4 for the projections),
  timed per step and amortised as step + refresh / 10.

Then, unless ``--no-e2e``, the end-to-end digits run (``python -m
launch.main`` on experiments/configs/digits.py into a temporary workdir).

Peak memory is XLA's buffer assignment for the compiled step
(``memory_analysis()``): ``peak_bytes`` (arguments, including the on-device
private set, + outputs + scratch) and ``temp_bytes`` (scratch alone);
``xla_gflop`` is XLA's flop count of the compiled step (``cost_analysis()``;
the dual form's with its in-step refresh when it refreshes every step), a
load-independent figure. The timings depend on the machine's load: the
1-minute load average is printed and stored with each record, with the
process CPU time per step (``cpu_ms_per_step``) and the fastest repeat
(``ms_min``). On a GPU/TPU host the same command runs on the default JAX
backend.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional

# LAPACK (the small eigh / Cholesky of the basis refresh) runs on OpenBLAS,
# whose worker threads spin: on a loaded or small shared CPU one 110 x 110
# eigh then takes ~200 ms instead of ~0.5 ms. One thread is the right choice
# for these tiny factorizations (XLA's own matmuls are unaffected). Set the
# variable before running to override.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import optax

from adamix_jax.adamix import linear_step as step_lib
from adamix_jax.adamix import noise_aware
from adamix_jax.adamix import settings
from adamix_jax.models import linear
from adamix_jax.train import linear_head

GIB = 2**30
MIB = 2**20
LEARNING_RATE = 0.1
NUM_INDEX_SETS = 8


def _load() -> float:
  return os.getloadavg()[0]


def _memory(jitted, *args) -> dict:
  """XLA's buffer-assignment and cost figures for ``jitted(*args)``.

  ``peak_bytes``/``temp_bytes`` from ``memory_analysis()``, ``xla_gflop``
  (flops of one call, load-independent) from ``cost_analysis()``; None
  where the backend does not report them.
  """
  out = {"peak_bytes": None, "temp_bytes": None, "xla_gflop": None}
  try:
    compiled = jitted.lower(*args).compile()
  except Exception:  # pylint: disable=broad-except
    return out
  try:
    stats = compiled.memory_analysis()
    peak = getattr(stats, "peak_memory_in_bytes", None)
    if peak is None:
      peak = (stats.argument_size_in_bytes + stats.output_size_in_bytes +
              stats.temp_size_in_bytes - stats.alias_size_in_bytes)
    out.update(peak_bytes=int(peak), temp_bytes=int(stats.temp_size_in_bytes))
  except Exception:  # pylint: disable=broad-except
    pass
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0]
    out["xla_gflop"] = round(float(cost["flops"]) / 1e9, 3)
  except Exception:  # pylint: disable=broad-except
    pass
  return out


@dataclasses.dataclass
class Problem:
  dim: int
  classes: int
  batch: int
  private_x_aug: jax.Array
  private_y: jax.Array
  public: step_lib.PublicData  # with the cached Gram
  public_plain: step_lib.PublicData  # without it
  anchor: dict
  indices: list
  mask: jax.Array


def make_problem(dim: int, classes: int, batch: int, public_per_class: int,
                 private_multiple: int, seed: int = 0) -> Problem:
  """Unit-norm features around class means; a random start near the anchor."""
  rng = np.random.default_rng(seed)
  num_private = private_multiple * batch
  means = rng.normal(size=(classes, dim)).astype(np.float32)

  def sample(labels):
    x = means[labels] + 2.0 * rng.normal(size=(len(labels), dim)).astype(
        np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)

  private_y = rng.integers(0, classes, num_private)
  public_y = np.repeat(np.arange(classes), public_per_class)
  public_x_aug = linear.augment(jnp.asarray(sample(public_y)))
  anchor = {"kernel": jnp.asarray(0.5 * means.T / np.sqrt(dim), jnp.float32),
            "bias": jnp.zeros((classes,), jnp.float32)}
  public_y_dev = jnp.asarray(public_y, jnp.int32)
  return Problem(
      dim=dim, classes=classes, batch=batch,
      private_x_aug=linear.augment(jnp.asarray(sample(private_y))),
      private_y=jnp.asarray(private_y, jnp.int32),
      public=step_lib.make_public_data(public_x_aug, public_y_dev),
      public_plain=step_lib.PublicData(x_aug=public_x_aug, y=public_y_dev),
      anchor=anchor,
      indices=[jnp.asarray(rng.choice(num_private, batch, replace=False),
                           jnp.int32) for _ in range(NUM_INDEX_SETS)],
      mask=jnp.ones((batch,), jnp.float32))


@dataclasses.dataclass
class Method:
  """A timed unit: ``run()`` does ``steps`` steps and blocks on the result."""

  method: str
  path: str
  run: Callable[[], None]
  steps: int = 1
  refresh_every: Optional[int] = None
  memory: Optional[dict] = None
  extra: dict = dataclasses.field(default_factory=dict)
  times: list = dataclasses.field(default_factory=list)
  # ms per step = combine(median unit times) (amortised vmap refresh).
  combine: Optional[Callable[[], float]] = None


def _nonprivate_method(p: Problem) -> Method:
  def update(matrix, x_all, y_all, idx):
    x, y = x_all[idx], y_all[idx]
    loss = lambda m: jnp.mean(
        optax.softmax_cross_entropy_with_integer_labels(x @ m, y))
    return matrix - LEARNING_RATE * jax.grad(loss)(matrix)

  jitted = jax.jit(update, donate_argnums=(0,))
  box = {"matrix": jnp.array(linear.stack(p.anchor), copy=True), "t": 0}
  memory = _memory(jitted, box["matrix"], p.private_x_aug, p.private_y,
                   p.indices[0])

  def run():
    box["t"] += 1
    box["matrix"] = jitted(box["matrix"], p.private_x_aug, p.private_y,
                           p.indices[box["t"] % NUM_INDEX_SETS])
    jax.block_until_ready(box["matrix"])

  return Method("non_private", "sgd", run, memory=memory)


_LR = jnp.ones((1 << 16,), jnp.float32)  # lr multiplier 1 at every step
_private_step = jax.jit(step_lib.private_step, static_argnums=(0, 1, 2),
                        donate_argnums=(4,))
_build = jax.jit(linear_head.initial_subspace, static_argnums=(0,))


class _StepRunner:
  """Threads a donated state through the jitted ``linear_step.private_step``
  (the step ``train_private_head`` runs), matrix or dual representation."""

  def __init__(self, config: settings.StepConfig,
               flags: settings.PerformanceFlags, p: Problem,
               public: step_lib.PublicData, spec: settings.SubspaceSpec,
               kernel=None, dual: bool = False,
               private: Optional[step_lib.PrivateData] = None,
               anchor=None):
    """``private`` and ``anchor`` replace the problem's (a head trained in
    a public feature map: its own features, base logits and zero start)."""
    self.config, self.flags, self.p, self.public = config, flags, p, public
    self.spec = spec
    self.structure, self.numbers = config.structure(), config.numbers()
    self.cache = None
    anchor = p.anchor if anchor is None else anchor
    if dual:
      self.cache = step_lib.dual_cache(anchor, public, p.private_x_aug,
                                       private_kernel=kernel)
      self.state = step_lib.init_dual_state(self.cache, jax.random.key(0))
      matrix = linear.stack(anchor)
      kernel = None
    else:
      self.state = step_lib.init_matrix_state(anchor, jax.random.key(0))
      matrix = self.state.matrix
    self.private = private or step_lib.PrivateData(
        x_aug=p.private_x_aug, y=p.private_y, kernel=kernel)
    self.subspace = _build(spec, matrix, public, None)
    self.t = 0
    # Device scalars made once: per-call host->device transfers would be
    # timed as part of the step (the floor has none).
    self.average_from = jnp.int32(0)

  def args(self, refresh: bool):
    p = self.p
    return (self.structure, self.flags, self.spec if refresh else None,
            self.numbers, self.state, self.subspace, self.public,
            self.private, p.indices[self.t % NUM_INDEX_SETS], p.mask,
            self.average_from, _LR, self.cache)

  def step(self, refresh: bool = False):
    self.t += 1
    self.state, metrics, self.subspace = _private_step(*self.args(refresh))
    return metrics

  def block(self):
    jax.block_until_ready(self.state)

  def memory(self, refresh: bool):
    return _memory(_private_step, *self.args(refresh))


def _runs(runner: _StepRunner, steps: int, refresh_every: Optional[int]):
  """``steps`` steps, the subspace refreshed in the first of every group."""
  def run():
    for t in range(steps):
      runner.step(refresh=refresh_every is not None and t == 0)
    runner.block()
  return run


def _dp_sgd_method(p: Problem, path: str, microbatch: Optional[int]) -> Method:
  config = settings.StepConfig(
      noise_multiplier=1.0, expected_batch_size=float(p.batch),
      learning_rate=LEARNING_RATE, clip_norm=1.0)
  flags = settings.PerformanceFlags(
      path=path, microbatch_size=microbatch if path == "vmap" else None)
  empty = step_lib.PublicData(x_aug=p.public.x_aug[:0], y=p.public.y[:0])
  runner = _StepRunner(config, flags, p, empty, settings.SubspaceSpec())
  return Method("dp_sgd", path, _runs(runner, 1, None),
                memory=runner.memory(False))


def _adamix_config(p: Problem) -> settings.StepConfig:
  num_public = p.public.y.shape[0]
  num_private = p.private_y.shape[0]
  return settings.StepConfig(
      noise_multiplier=1.0, expected_batch_size=float(p.batch),
      learning_rate=LEARNING_RATE, adaptive_threshold=True,
      threshold_quantile=0.5,
      public_weight=num_public / (num_public + num_private))


def _adamix_w_method(p: Problem) -> Method:
  """The default linear-head AdaMix (AdaMix-W, adamix/noise_aware.py): a
  correction V from 0 in the whitened public geometry z = x~ M (here the
  full space, M (d+1) x (d+1), the low-noise case), w_0's logits a fixed
  part of every logit, a fixed C, no subspace, the exact public gradient
  mixed in. Timed on the same batch B (its runs are full batch: B = N)."""
  feature_map = jnp.asarray(noise_aware.public_geometry(  # sigma_1 small:
      np.asarray(p.public.x_aug), 1e-3, int(p.private_y.shape[0]),
      p.classes, noise_aware.Rules()).feature_map)  # the full space
  anchor = linear.stack(p.anchor)
  public = step_lib.make_public_data(
      p.public.x_aug @ feature_map, p.public.y, cache_gram=False,
      base_logits=p.public.x_aug @ anchor)
  private = step_lib.PrivateData(x_aug=p.private_x_aug @ feature_map,
                                 y=p.private_y,
                                 base_logits=p.private_x_aug @ anchor)
  num_public, num_private = p.public.y.shape[0], p.private_y.shape[0]
  config = settings.StepConfig(
      noise_multiplier=1.0, expected_batch_size=float(p.batch),
      learning_rate=LEARNING_RATE, clip_norm=0.5,
      normalize_by_threshold=False,
      public_weight=num_public / (num_public + num_private))
  runner = _StepRunner(config, settings.PerformanceFlags(path="closed_form"),
                       p, public, settings.SubspaceSpec(), private=private,
                       anchor=jnp.zeros((feature_map.shape[1], p.classes),
                                        jnp.float32))
  return Method("adamix_w", "closed_form", _runs(runner, 1, None),
                memory=runner.memory(False),
                extra={"geometry": f"whitened, {feature_map.shape[1]} dims",
                       "public_examples": int(num_public)})


def _adamix_methods(p: Problem, args, vmap_fits: bool) -> list[Method]:
  methods = [_adamix_w_method(p)]
  rank = min(args.rank, p.public.y.shape[0])
  spec = settings.SubspaceSpec(
      "gradients", rank, 1, method="iterative", iterations=args.iterations,
      oversample=args.oversample)
  kernel = linear_head.private_public_kernel(p.private_x_aug, p.public.x_aug)
  extra = {"rank": rank, "public_examples": int(p.public.y.shape[0]),
           "basis": f"iterative({args.iterations} it, +{args.oversample})",
           "private_kernel_cached": True, "public_gram_cached": True}
  closed = settings.PerformanceFlags(path="closed_form")
  for dual, path in ((False, "closed_form_matrix"), (True, "closed_form")):
    for refresh in (1, 10):
      # The dual form is what train_private_head runs by default on one
      # device (state W~_0 + a D + X~p^T S); both refresh in-step.
      runner = _StepRunner(_adamix_config(p), closed, p, p.public, spec,
                           kernel=kernel, dual=dual)
      methods.append(Method(
          "adamix", path, _runs(runner, refresh, refresh), steps=refresh,
          refresh_every=refresh,
          # Cost figures of the compiled step as it runs most often: with
          # the in-step refresh when it refreshes every step.
          memory=runner.memory(refresh == 1),
          extra=dict(extra, representation="dual" if dual else "matrix",
                     basis_refresh="in-step")))

  if args.baseline:
    # Before the speed-up: no Gram / kernel caches, a full eigh per refresh.
    eigh_spec = dataclasses.replace(spec, method="eigh")
    runner = _StepRunner(_adamix_config(p), closed, p, p.public_plain,
                         eigh_spec)
    methods.append(Method(
        "adamix", "closed_form_uncached", _runs(runner, 10, 10), steps=10,
        refresh_every=10, memory=runner.memory(False),
        extra={"rank": rank, "public_examples": int(p.public.y.shape[0]),
               "basis": "eigh", "private_kernel_cached": False,
               "public_gram_cached": False}))

  if vmap_fits:
    vmap = settings.PerformanceFlags(path="vmap",
                                     microbatch_size=args.microbatch)
    runner = _StepRunner(_adamix_config(p), vmap, p, p.public, spec)
    refresher = _StepRunner(_adamix_config(p), vmap, p, p.public, spec)
    step_m = Method("adamix", "vmap", _runs(runner, 1, None),
                    refresh_every=None, memory=runner.memory(False),
                    extra=dict(extra, private_kernel_cached=False,
                               microbatch_size=args.microbatch))
    refresh_m = Method("adamix_step_with_refresh", "vmap",
                       _runs(refresher, 1, 1), extra=dict(extra))
    amortised = Method(
        "adamix", "vmap", lambda: None, refresh_every=10,
        memory=step_m.memory,
        extra=dict(step_m.extra, timing="0.9 step + 0.1 step with refresh"),
        combine=lambda s=step_m, r=refresh_m: (
            0.9 * statistics.median(s.times) +
            0.1 * statistics.median(r.times)))
    methods += [step_m, refresh_m, amortised]
  return methods


def benchmark_config(dim: int, classes: int, batch: int, args) -> list[dict]:
  p = make_problem(dim, classes, batch, args.public_per_class,
                   args.private_multiple)
  n = p.public.y.shape[0]
  limit = args.vmap_limit_gib * GIB
  per_example_rows = batch if args.microbatch is None else min(
      batch, args.microbatch)
  dp_vmap_bytes = per_example_rows * (dim + 1) * classes * 4
  adamix_vmap_bytes = dp_vmap_bytes + per_example_rows * n * classes * 4
  methods = [_nonprivate_method(p), _dp_sgd_method(p, "closed_form", None)]
  skipped = []
  if dp_vmap_bytes <= limit:
    methods.append(_dp_sgd_method(p, "vmap", args.microbatch))
  else:
    skipped.append(("dp_sgd", "vmap", dp_vmap_bytes))
  methods += _adamix_methods(p, args, adamix_vmap_bytes <= limit)
  if adamix_vmap_bytes > limit:
    skipped.append(("adamix", "vmap", adamix_vmap_bytes))
  for method, path, need in skipped:
    print(f"  skip {method}/{path} at d={dim} c={classes} B={batch}: per-example "
          f"gradients need ~{need / GIB:.1f} GiB > --vmap-limit-gib="
          f"{args.vmap_limit_gib:g}", flush=True)

  timed = [m for m in methods if m.combine is None]

  def time_once(m):
    cpu, start = time.process_time(), time.perf_counter()
    m.run()
    m.times.append((time.perf_counter() - start) / m.steps)
    m.extra.setdefault("_cpu", []).append((time.process_time() - cpu) / m.steps)

  load_before = _load()
  # The closed forms and the floor: warm-up (compiles), then interleaved
  # rounds, so that load drifts hit all alike. The vmap paths (gigabytes of
  # per-example gradients) only afterwards, so that their allocations do not
  # disturb the others; a slow one is timed --slow-repeats times.
  fast = [m for m in timed if m.path != "vmap"]
  for m in fast:
    m.run()
    m.run()
  for _ in range(args.repeats):
    for m in fast:
      time_once(m)
  for m in (m for m in timed if m.path == "vmap"):
    m.run()
    start = time.perf_counter()
    m.run()
    repeats = (args.slow_repeats if time.perf_counter() - start >
               args.slow_seconds else args.repeats)
    for _ in range(repeats):
      time_once(m)
  load = 0.5 * (load_before + _load())

  floor = statistics.median(methods[0].times)
  records = []
  for m in methods:
    seconds = m.combine() if m.combine else statistics.median(m.times)
    extra = {k: v for k, v in m.extra.items() if not k.startswith("_")}
    record = {
        "d": dim, "classes": classes, "batch": batch, "method": m.method,
        "path": m.path, "ms_per_step": 1e3 * seconds,
        "examples_per_s": batch / seconds,
        "ratio_to_nonprivate": seconds / floor,
        "refresh_every": m.refresh_every,
        "repeats": len(m.times) if m.combine is None else None,
        "ms_min": None if m.combine else 1e3 * min(m.times),
        "cpu_ms_per_step": (None if m.combine else
                            1e3 * statistics.median(m.extra["_cpu"])),
        "xla_gflop": (m.memory or {}).get("xla_gflop"),
        "peak_bytes": (m.memory or {}).get("peak_bytes"),
        "temp_bytes": (m.memory or {}).get("temp_bytes"),
        "load_avg_1m": round(load, 2), "backend": jax.default_backend(),
        **extra}
    records.append(record)
  for method, path, need in skipped:
    records.append({
        "d": dim, "classes": classes, "batch": batch, "method": method,
        "path": path, "ms_per_step": None, "examples_per_s": None,
        "ratio_to_nonprivate": None, "skipped": "does not fit in memory",
        "estimated_bytes": need, "limit_bytes": limit})
  return records


def end_to_end_digits() -> list[dict]:
  """Wall time of ``adamix-train`` on the digits config (all stages)."""
  with tempfile.TemporaryDirectory() as workdir:
    command = [sys.executable, "-m", "adamix_jax.launch.main", "--config",
               "digits", "--workdir", workdir, "--config.progress=False"]
    load_before = _load()
    start = time.perf_counter()
    done = subprocess.run(command, cwd=_ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
      print(done.stdout[-2000:], done.stderr[-4000:])
      return [{"d": 64, "classes": 10, "batch": None, "method": "end_to_end",
               "path": "launch.main digits", "ms_per_step": None,
               "examples_per_s": None, "ratio_to_nonprivate": None,
               "error": f"exit code {done.returncode}"}]
    metas = [json.load(open(f)) for f in glob.glob(
        os.path.join(workdir, "private", "*", "*", "*", "meta.json"))]
    steps = sum(m.get("steps", 0) for m in metas)
    examples = sum(m.get("steps", 0) * m.get("sampling_rate", 0) *
                   m.get("private_examples", 0) for m in metas)
    batch = (examples / steps) if steps else None
  return [{"d": 64, "classes": 10,
           "batch": None if batch is None else round(batch, 1),
           "method": "end_to_end", "path": "adamix-train digits (all stages)",
           "ms_per_step": 1e3 * wall / steps if steps else None,
           "examples_per_s": examples / wall if steps else None,
           "ratio_to_nonprivate": None, "wall_s": wall, "private_runs":
           len(metas), "private_steps": steps,
           "load_avg_1m": round(0.5 * (load_before + _load()), 2),
           "note": "whole run (features, CV, compile, accounting) / steps"}]


def _fmt(value, spec):
  return "-" if value is None else format(value, spec)


def print_table(records: list[dict]) -> None:
  header = (f"{'d':>5} {'c':>4} {'B':>5}  {'method':<12} {'path':<21} "
            f"{'refresh':>7} {'ms/step':>9} {'ex/s':>9} {'x floor':>8} "
            f"{'cpu ms':>8} {'GFLOP':>7} {'peak MiB':>9} {'temp MiB':>9}")
  print(header)
  print("-" * len(header))
  for r in records:
    peak = None if r.get("peak_bytes") is None else r["peak_bytes"] / MIB
    temp = None if r.get("temp_bytes") is None else r["temp_bytes"] / MIB
    note = ""
    if r.get("skipped"):
      note = f"  skipped: {r['skipped']} (~{r['estimated_bytes'] / GIB:.1f} GiB)"
    print(f"{_fmt(r['d'], '>5')} {r['classes']:>4} {_fmt(r['batch'], '>5')}  "
          f"{r['method']:<12} {r['path'][:21]:<21} "
          f"{_fmt(r.get('refresh_every'), '>7')} "
          f"{_fmt(r['ms_per_step'], '>9.2f')} "
          f"{_fmt(r['examples_per_s'], '>9.0f')} "
          f"{_fmt(r['ratio_to_nonprivate'], '>8.2f')} "
          f"{_fmt(r.get('cpu_ms_per_step'), '>8.2f')} "
          f"{_fmt(r.get('xla_gflop'), '>7.2f')} "
          f"{_fmt(peak, '>9.1f')} {_fmt(temp, '>9.1f')}{note}")


def acceptance(records: list[dict], dim=2048, classes=200, batch=1024) -> None:
  def find(method, path, refresh=None):
    for r in records:
      if (r["d"], r["classes"], r["batch"], r["method"], r["path"]) == (
          dim, classes, batch, method, path) and (
              refresh is None or r.get("refresh_every") == refresh):
        return r
    return None

  floor = find("non_private", "sgd")
  if floor is None:
    return
  print(f"\nAcceptance at d={dim}, c={classes}, B={batch}:")
  checks = [("dp_sgd closed_form", find("dp_sgd", "closed_form"), 1.3)]
  for path in ("closed_form", "closed_form_matrix"):
    checks += [(f"adamix {path}, refresh 1", find("adamix", path, 1), 4.0),
               (f"adamix {path}, refresh 10", find("adamix", path, 10), 2.0)]
  for name, r, bound in checks:
    if r is not None:
      ratio = r["ratio_to_nonprivate"]
      print(f"  {name}: {ratio:.2f}x non-private (<= {bound}x: "
            f"{'yes' if ratio <= bound else 'NO'})")
  slow = find("adamix", "vmap", 10) or find("adamix", "vmap")
  for path in ("closed_form", "closed_form_matrix"):
    fast = find("adamix", path, 10)
    if fast is None or slow is None:
      continue
    if slow.get("skipped"):
      print("  adamix vmap does not fit in memory (skipped).")
      break
    speedup = slow["ms_per_step"] / fast["ms_per_step"]
    print(f"  adamix {path} vs vmap (refresh 10): {speedup:.0f}x faster "
          f"(>= 20x: {'yes' if speedup >= 20 else 'NO'})")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", help="write the records to this path")
  parser.add_argument("--quick", action="store_true",
                      help="small grid (d=512, c in {10, 200}, B=256), no e2e")
  parser.add_argument("--dims", type=int, nargs="+", default=None)
  parser.add_argument("--classes", type=int, nargs="+", default=None)
  parser.add_argument("--batches", type=int, nargs="+", default=None)
  parser.add_argument("--public-per-class", type=int, default=5)
  parser.add_argument("--private-multiple", type=int, default=8,
                      help="private set size N = this x B")
  parser.add_argument("--rank", type=int, default=100,
                      help="AdaMix subspace rank k (capped at n)")
  parser.add_argument("--iterations", type=int, default=2)
  parser.add_argument("--oversample", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--slow-seconds", type=float, default=2.0,
                      help="units slower than this get --slow-repeats")
  parser.add_argument("--slow-repeats", type=int, default=2)
  parser.add_argument("--vmap-limit-gib", type=float, default=8.0)
  parser.add_argument("--microbatch", type=int, default=None,
                      help="microbatch size of the vmap paths")
  parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                      help="skip the uncached eigh AdaMix path")
  parser.add_argument("--e2e", dest="e2e", action="store_true", default=None)
  parser.add_argument("--no-e2e", dest="e2e", action="store_false")
  args = parser.parse_args(argv)
  dims = args.dims or ([512] if args.quick else [512, 2048])
  classes = args.classes or [10, 200]
  batches = args.batches or ([256] if args.quick else [256, 1024])
  e2e = (not args.quick) if args.e2e is None else args.e2e

  print(f"backend={jax.default_backend()} devices={jax.devices()} "
        f"cpus={os.cpu_count()} load(1m)={_load():.2f} "
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}",
        flush=True)
  records = []
  rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  for dim in dims:
    for c in classes:
      for b in batches:
        print(f"d={dim} c={c} B={b} ...", flush=True)
        records += benchmark_config(dim, c, b, args)
  if e2e:
    print("end-to-end digits run ...", flush=True)
    records += end_to_end_digits()
  rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  print()
  print_table(records)
  print(f"\nload(1m) now {_load():.2f}; process max RSS grew by "
        f"{(rss1 - rss0) / 1024:.0f} MiB during the benchmarks")
  acceptance(records)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(records, f, indent=1)
    print(f"\nwrote {len(records)} records to {args.json}")


if __name__ == "__main__":
  main()
