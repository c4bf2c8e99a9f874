r"""Speed and memory of one full-model DP step, against the non-private step.

  python experiments/benchmarks/full_model_speed.py --json out.json
  python experiments/benchmarks/full_model_speed.py --quick        # smoke run
  python experiments/benchmarks/full_model_speed.py --models cnn --batches 256

Models: ``cnn``, the CIFAR-sized CNN of issue #16 (conv 3x3 32 -> pool ->
conv 3x3 64 -> pool -> dense 128 -> dense 10, 545,098 parameters, 32x32x3
inputs); ``resnet18``, a ResNet-18 with GroupNorm (11.2M parameters) at
224x224, by default only when an accelerator is the default JAX backend.

Methods, each a WHOLE jitted step on the same batch (clipped sum, Gaussian
noise on it, division by the expected batch size, map back, SGD update),
timed side by side in one process: ``--repeats`` interleaved rounds after
``--warmup`` calls, median wall time (``jax.block_until_ready``), with the
process CPU time per step (``cpu_ms_per_step``) and the fastest round:

* ``non_private``: gradient of the mean loss of the batched model + SGD
  (the ratios' denominator); ``non_private_bookkept``: the same update with
  the gradient formed from the ghost capture (inputs x output cotangents),
  a reference for how fast a non-private step can be on this backend;
* ``dp_vmap``: the vmap backend (per-example gradients,
  the project's current DP step); ``dp_vmap_micro32``: microbatches of 32;
  ``dp_vmap_train_step`` / ``dp_ghost_train_step``: the project's own step
  (``train.full_model``: ``adamix()`` inside ``PrivateTrainState``; the same
  work; a check of this script's step skeleton);
* ``dp_ghost``: ``privacy.ghost.ghost_clipped_grad_sum`` (ghost norms,
  book-kept clipped sum, one backward pass);
* ``adamix_vmap_k16``: AdaMix with a rank-16 basis V through the vmap path;
* ``adamix_jvp_k16`` / ``_k64``: coefficients by forward-mode products
  (``privacy.projection.jvp_clipped_projection_sum``, ``--jvp-chunk`` basis
  vectors at a time);
* ``adamix_ghost_k16`` / ``_k64``: coefficients from the ghost capture
  (``privacy.ghost.ghost_clipped_projection_sum``).

The AdaMix rows clip and noise in k dimensions and map back with V (P x k,
orthonormal columns, here random: the public basis refresh, every m steps
on public data, is not part of the step and not timed).

Peak memory: XLA's buffer assignment for the compiled step
(``compiled.memory_analysis()``): ``peak_bytes`` = argument + output +
temp bytes (the arguments include the batch, params and, for AdaMix, V);
``temp_bytes`` the scratch alone. One JSON record per (model, batch,
method) with ``model, batch, method, ms_per_step, ratio_to_nonprivate,
peak_bytes, backend`` and the extra fields above.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from typing import Callable, Optional

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from adamix_jax.adamix import settings
from adamix_jax.adamix import train_state
from adamix_jax.adamix import transform
from adamix_jax.models.cnn import SmallCNN
from adamix_jax.privacy import ghost
from adamix_jax.privacy import mechanism
from adamix_jax.privacy import per_example
from adamix_jax.privacy import projection
from adamix_jax.train import full_model

GIB = 2**30
LEARNING_RATE = 0.1
NOISE_MULTIPLIER = 1.0
CLIP_NORM = 1.0


# --- models ------------------------------------------------------------------


class BasicBlock(nn.Module):
  """ResNet basic block with GroupNorm (per-example: no batch statistics)."""

  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    residual = x
    h = nn.Conv(self.features, (3, 3), self.strides, use_bias=False)(x)
    h = nn.relu(nn.GroupNorm(num_groups=32)(h))
    h = nn.Conv(self.features, (3, 3), use_bias=False)(h)
    h = nn.GroupNorm(num_groups=32)(h)
    if residual.shape != h.shape:
      residual = nn.Conv(self.features, (1, 1), self.strides,
                         use_bias=False)(residual)
      residual = nn.GroupNorm(num_groups=32)(residual)
    return nn.relu(h + residual)


class ResNet18GN(nn.Module):
  """ResNet-18 (2-2-2-2 basic blocks), GroupNorm(32) instead of BatchNorm."""

  num_classes: int = 1000

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(64, (7, 7), 2, padding=((3, 3), (3, 3)), use_bias=False)(x)
    h = nn.relu(nn.GroupNorm(num_groups=32)(h))
    h = nn.max_pool(h, (3, 3), strides=(2, 2), padding="SAME")
    for stage, features in enumerate((64, 128, 256, 512)):
      for block in range(2):
        h = BasicBlock(features, 2 if stage and not block else 1)(h)
    return nn.Dense(self.num_classes)(jnp.mean(h, axis=(1, 2)))


def make_model(name: str, image_size: Optional[int]):
  """(model, input shape, classes) of a benchmark model."""
  if name == "cnn":
    return SmallCNN(num_classes=10, channels=(32, 64), hidden=128), (
        image_size or 32, image_size or 32, 3), 10
  if name == "resnet18":
    return ResNet18GN(num_classes=1000), (image_size or 224,
                                          image_size or 224, 3), 1000
  raise ValueError(f"unknown model {name!r}")


# --- steps -------------------------------------------------------------------


def nonprivate_step(model, params, key, x, y, mask, basis):
  del mask, basis

  def mean_loss(p):
    logits = model.apply({"params": p}, x)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

  grads = jax.grad(mean_loss)(params)
  new = jax.tree_util.tree_map(lambda p, g: p - LEARNING_RATE * g, params,
                               grads)
  return new, key


def nonprivate_bookkept_step(model, params, key, x, y, mask, basis):
  """The same non-private update, the gradient formed like the ghost step's.

  ``ghost.capture(...).weighted_sum(1/B)``: layer inputs contracted with
  output cotangents, no weight-gradient convolutions. A reference only: on
  XLA:CPU it shows how much of the DP rows' ratio to ``non_private`` is the
  slow batched weight-gradient convolution rather than the DP work.
  """
  del mask, basis
  weights = jnp.full((x.shape[0],), 1.0 / x.shape[0], jnp.float32)
  grads = ghost.capture(model, params, (x, y)).weighted_sum(weights)
  new = jax.tree_util.tree_map(lambda p, g: p - LEARNING_RATE * g, params,
                               grads)
  return new, key


def dp_step(contributions: Callable, model, params, key, x, y, mask, basis):
  """A DP step without public data, any backend of the one mechanism.

  ``contributions(params, batch, basis)`` is the backend: per-example
  gradients (no basis) or coefficients V^T g_i (basis); the mechanism clips,
  sums, adds the noise once and divides by the batch size; the step maps
  back by V and takes an SGD step.
  """
  del model
  noise_key, next_key = jax.random.split(key)
  noisy, _ = mechanism.privatize(
      contributions(params, (x, y), basis), CLIP_NORM, mask, noise_key,
      noise_multiplier=NOISE_MULTIPLIER, normalizer=float(x.shape[0]))
  flat_params, unravel = ravel_pytree(params)
  flat_grad = transform.flatten(noisy) if basis is None else basis @ noisy
  grad = unravel(flat_grad.astype(flat_params.dtype))
  new = jax.tree_util.tree_map(lambda p, g: p - LEARNING_RATE * g, params,
                               grad)
  return new, next_key


def project_train_step(clipping: str, model, params, key, x, y, mask, basis):
  """The project's own full-model step (``train.full_model``: the adamix()
  transformation inside ``PrivateTrainState.private_step``, DP-SGD, no
  public data, SGD), as a check of the skeleton above."""
  del basis
  config = settings.StepConfig(noise_multiplier=NOISE_MULTIPLIER,
                               expected_batch_size=float(x.shape[0]),
                               clip_norm=CLIP_NORM,
                               normalize_by_threshold=False)
  tx = optax.chain(transform.adamix(config, key=key),
                   optax.sgd(LEARNING_RATE))
  state = train_state.PrivateTrainState.create(
      apply_fn=model.apply, params=params, tx=tx,
      loss_fn=full_model.classification_loss(model))
  flags = settings.PerformanceFlags(clipping=clipping)
  new = full_model._private_step(flags, None, model, state, x, y, mask,  # pylint: disable=protected-access
                                 None, 0)
  return new.params, transform.find_state(new.opt_state).noise_key


def vmap_sum(model, microbatch=None):
  loss_fn = full_model.classification_loss(model)

  def fn(params, batch, basis):
    return per_example.vmap_contributions(
        loss_fn, params, batch, transform.projector(basis),
        microbatch_size=microbatch)
  return fn


def _examples_per_pass(per_pass, batch):
  """None when the slice is the whole batch or does not divide it."""
  size = batch[0].shape[0]
  if per_pass is not None and (per_pass >= size or size % per_pass):
    return None
  return per_pass


def ghost_sum(model, examples_per_pass=None):
  def fn(params, batch, basis):
    if basis is None:
      return ghost.capture(model, params, batch)
    return per_example.PerExampleGradients.create(
        ghost.projected_coefficients(
            model, params, batch, basis,
            examples_per_pass=_examples_per_pass(examples_per_pass, batch)))
  return fn


def jvp_sum(model, chunk_size, examples_per_pass):
  loss_fn = full_model.classification_loss(model)

  def fn(params, batch, basis):
    return per_example.PerExampleGradients.create(
        projection.jvp_coefficients(
            loss_fn, params, batch, basis, chunk_size=chunk_size,
            examples_per_pass=_examples_per_pass(examples_per_pass, batch)))
  return fn


# --- measurement -------------------------------------------------------------


def memory_figures(compiled) -> dict:
  out = {"peak_bytes": None, "temp_bytes": None}
  try:
    stats = compiled.memory_analysis()
    out["temp_bytes"] = int(stats.temp_size_in_bytes)
    out["peak_bytes"] = int(stats.argument_size_in_bytes +
                            stats.output_size_in_bytes +
                            stats.temp_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    pass
  return out


class Timed:
  """A compiled step threading (params, key) through repeated calls."""

  def __init__(self, method: str, fn: Callable, model, params, x, y, mask,
               basis, extra: Optional[dict] = None):
    self.method, self.extra = method, dict(extra or {})
    start = time.perf_counter()
    self.compiled = jax.jit(functools.partial(fn, model)).lower(
        params, jax.random.key(0), x, y, mask, basis).compile()
    self.extra["compile_s"] = round(time.perf_counter() - start, 2)
    self.memory = memory_figures(self.compiled)
    self.state = (params, jax.random.key(0))
    self.args = (x, y, mask, basis)
    self.wall, self.cpu = [], []

  def run(self, record: bool = True):
    cpu, start = time.process_time(), time.perf_counter()
    self.state = self.compiled(*self.state, *self.args)
    jax.block_until_ready(self.state)
    if record:
      self.wall.append(time.perf_counter() - start)
      self.cpu.append(time.process_time() - cpu)


def benchmark(model_name: str, batch: int, args) -> list[dict]:
  model, shape, classes = make_model(model_name, args.image_size)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch,) + shape), jnp.float32)
  y = jnp.asarray(rng.integers(0, classes, size=batch), jnp.int32)
  mask = jnp.ones((batch,), jnp.float32)
  params = model.init(jax.random.key(1), x[:1])["params"]
  num_params = sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
  vmap_bytes = 4 * batch * num_params
  fits = vmap_bytes <= args.vmap_limit_gib * GIB
  bases = {}
  for k in sorted(set(args.ranks) | {16}):
    gaussian = jax.random.normal(jax.random.key(k), (num_params, k))
    bases[k] = jnp.linalg.qr(gaussian)[0]

  plans = [("non_private", nonprivate_step, None, {}),
           ("non_private_bookkept", nonprivate_bookkept_step, None, {})]
  if fits:
    plans.append(("dp_vmap", functools.partial(dp_step, vmap_sum(model)),
                  None, {}))
    plans.append(("dp_vmap_train_step",
                  functools.partial(project_train_step, "vmap"), None, {}))
  if args.microbatch and batch > args.microbatch and (
      4 * args.microbatch * num_params <= args.vmap_limit_gib * GIB):
    plans.append((f"dp_vmap_micro{args.microbatch}",
                  functools.partial(dp_step, vmap_sum(model, args.microbatch)),
                  None, {"microbatch": args.microbatch}))
  plans.append(("dp_ghost", functools.partial(dp_step, ghost_sum(model)),
                None, {}))
  plans.append(("dp_ghost_train_step",
                functools.partial(project_train_step, "ghost"), None, {}))
  if fits and 16 in args.ranks:
    plans.append(("adamix_vmap_k16",
                  functools.partial(dp_step, vmap_sum(model)), bases[16],
                  {"k": 16}))
  for k in args.ranks:
    plans.append((f"adamix_jvp_k{k}", functools.partial(
        dp_step, jvp_sum(model, args.jvp_chunk, args.jvp_examples)),
                  bases[k], {"k": k, "jvp_chunk": args.jvp_chunk,
                             "jvp_examples_per_pass": args.jvp_examples}))
  for k in args.ranks:
    plans.append((f"adamix_ghost_k{k}", functools.partial(
        dp_step, ghost_sum(model, args.ghost_examples)), bases[k],
                  {"k": k, "ghost_examples_per_pass": args.ghost_examples}))
  if args.methods:
    plans = [p for p in plans
             if p[0].startswith("non_private") or p[0] in args.methods]

  timed = []
  for method, fn, basis, extra in plans:
    print(f"  compiling {model_name} B={batch} {method} ...", flush=True)
    timed.append(Timed(method, fn, model, params, x, y, mask, basis, extra))
  for t in timed:
    for _ in range(args.warmup):
      t.run(record=False)
  load_before = os.getloadavg()[0]
  # Interleaved rounds: a load drift on this shared machine hits all alike.
  for _ in range(args.repeats):
    for t in timed:
      t.run()
  load = 0.5 * (load_before + os.getloadavg()[0])

  base = statistics.median(timed[0].wall)
  records = []
  for t in timed:
    ms = 1000 * statistics.median(t.wall)
    records.append({
        "model": model_name, "batch": batch, "method": t.method,
        "ms_per_step": round(ms, 2),
        "ratio_to_nonprivate": round(ms / (1000 * base), 3),
        "peak_bytes": t.memory["peak_bytes"], "backend": jax.default_backend(),
        "temp_bytes": t.memory["temp_bytes"],
        "ms_min": round(1000 * min(t.wall), 2),
        "cpu_ms_per_step": round(1000 * statistics.median(t.cpu), 2),
        "repeats": len(t.wall), "params": num_params,
        "input_shape": list(shape), "load_avg_1m": round(load, 2),
        "cpus": os.cpu_count(), **t.extra})
  return records


def print_table(records: list[dict]) -> None:
  print(f"\n{'model':9s} {'B':>4s} {'method':22s} {'ms/step':>9s} "
        f"{'x nonpriv':>9s} {'cpu ms':>9s} {'peak MiB':>9s}")
  for r in records:
    peak = r["peak_bytes"]
    peak = f"{peak / 2**20:9.1f}" if peak is not None else f"{'-':>9s}"
    print(f"{r['model']:9s} {r['batch']:4d} {r['method']:22s} "
          f"{r['ms_per_step']:9.1f} {r['ratio_to_nonprivate']:9.2f} "
          f"{r['cpu_ms_per_step']:9.1f} {peak}")


def acceptance(records: list[dict]) -> None:
  """Issue #16's targets, on the CNN at the largest batch measured."""
  rows = {(r["model"], r["batch"], r["method"]): r for r in records}
  batches = sorted({r["batch"] for r in records if r["model"] == "cnn"})
  if not batches:
    return
  b = batches[-1]
  get = lambda m: rows.get(("cnn", b, m))
  ghost_row, vmap_row = get("dp_ghost"), get("dp_vmap")
  jvp_row, adamix_ghost = get("adamix_jvp_k16"), get("adamix_ghost_k16")
  print(f"\nacceptance (cnn, B={b}):")
  if ghost_row:
    print(f"  dp_ghost / non_private = {ghost_row['ratio_to_nonprivate']:.2f}"
          f" (target <= 2.0)")
  if ghost_row and vmap_row:
    print(f"  dp_vmap / dp_ghost = "
          f"{vmap_row['ms_per_step'] / ghost_row['ms_per_step']:.2f} "
          f"(target >= 3)")
  for name, row in (("adamix_jvp_k16", jvp_row),
                    ("adamix_ghost_k16", adamix_ghost)):
    if row:
      line = (f"  {name} / non_private = {row['ratio_to_nonprivate']:.2f} "
              f"(target <= 3)")
      if vmap_row and row["peak_bytes"] and vmap_row["peak_bytes"]:
        line += (f"; peak / dp_vmap peak = "
                 f"{row['peak_bytes'] / vmap_row['peak_bytes']:.3f} "
                 f"(target <= 0.25)")
      print(line)
  bookkept = get("non_private_bookkept")
  if bookkept:
    print(f"  (reference) non_private_bookkept / non_private = "
          f"{bookkept['ratio_to_nonprivate']:.2f}; against it dp_ghost is "
          + (f"{ghost_row['ms_per_step'] / bookkept['ms_per_step']:.2f}x"
             if ghost_row else "-") + ", adamix_jvp_k16 "
          + (f"{jvp_row['ms_per_step'] / bookkept['ms_per_step']:.2f}x"
             if jvp_row else "-"))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", help="write the records to this path")
  parser.add_argument("--models", nargs="+", default=None,
                      help="cnn and/or resnet18 (default: cnn, plus "
                      "resnet18 when an accelerator is present)")
  parser.add_argument("--batches", nargs="+", type=int, default=[64, 256])
  parser.add_argument("--ranks", nargs="+", type=int, default=[16, 64],
                      help="AdaMix basis sizes k")
  parser.add_argument("--methods", nargs="+", default=None,
                      help="only these methods (the non_private rows always run)")
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--microbatch", type=int, default=32)
  parser.add_argument("--jvp-chunk", type=int, default=8,
                      help="basis vectors per forward-mode pass")
  parser.add_argument("--jvp-examples", type=int, default=32,
                      help="examples per forward-mode pass (0: all)")
  parser.add_argument("--ghost-examples", type=int, default=64,
                      help="examples per ghost capture in the AdaMix-ghost "
                           "rows (0: all)")
  parser.add_argument("--image-size", type=int, default=None,
                      help="override the model's input size")
  parser.add_argument("--vmap-limit-gib", type=float, default=8.0,
                      help="skip vmap paths whose B x P gradients exceed this")
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: cnn, B=64, k=16, 2 repeats")
  args = parser.parse_args(argv)
  args.jvp_examples = args.jvp_examples or None
  args.ghost_examples = args.ghost_examples or None
  accelerator = jax.default_backend() != "cpu"
  if args.quick:
    args.models = args.models or ["cnn"]
    args.batches, args.ranks, args.repeats, args.warmup = [64], [16], 2, 1
  if args.models is None:
    args.models = ["cnn"] + (["resnet18"] if accelerator else [])
  print(f"backend={jax.default_backend()} devices={jax.devices()} "
        f"cpus={os.cpu_count()} load(1m)={os.getloadavg()[0]:.2f} "
        f"jax={jax.__version__}", flush=True)
  records = []
  for model_name in args.models:
    for batch in args.batches:
      new = benchmark(model_name, batch, args)
      print_table(new)
      records.extend(new)
  print_table(records)
  acceptance(records)
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(records, f, indent=1)
    print(f"\nwrote {len(records)} records to {args.json}")


if __name__ == "__main__":
  main()
