"""The one Gaussian mechanism: the only code in a step that touches private rows.

Every private step in adamix-jax (DP-SGD and AdaMix, linear heads and full
models, one device or a mesh, the optax transformations, the audit) releases
its private batch through ``privatize``:

  per-example contributions (already projected, if the step projects)
    -> each clipped to C (``clip_scales``: invariant 1)
    -> summed over the batch (padding rows and non-finite rows contribute 0)
    -> N(0, (sigma C)^2 I) added ONCE to that sum (``noise``: invariant 2)
    -> divided by the fixed normaliser q*N (never the realised batch size).

The threshold C and any projection are computed by the caller from public
data only (invariant 3); mapping the noisy coefficients back to parameter
space is post-processing.

A *backend* says how a batch's contributions are represented; it implements
the two-method ``Contributions`` protocol:

* ``norms() -> (B,)``: each example's L2 norm (NaN/inf allowed: such rows
  are zeroed and counted);
* ``weighted_sum(weights (B,)) -> pytree``: sum_i w_i c_i, where a row with
  weight 0 contributes exactly 0 even when it holds NaN/inf.

Backends: materialised per-example gradients (``per_example``), the closed
forms of a linear head (``adamix.linear_step``), ghost norms and the
JVP projection for any Flax model (``ghost``, ``projection``). Two wrappers
change how a batch is walked, never what is released: ``Microbatched`` (a
``lax.scan`` over slices, so peak memory is one slice's) and ``ShardMapped``
(each device clips and sums its own rows inside ``jax.shard_map``; a
``psum`` forms the global sum, and the noise is then added once, outside).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from adamix_jax.privacy import clipping
from adamix_jax.privacy import noise

PyTree = Any


@runtime_checkable
class Contributions(Protocol):
  """A private batch's per-example contributions, as the mechanism sees them."""

  def norms(self) -> jax.Array:
    ...

  def weighted_sum(self, weights: jax.Array) -> PyTree:
    ...


@dataclasses.dataclass(frozen=True)
class Microbatched:
  """Contributions produced slice by slice: ``make(batch_slice)`` for each
  slice of ``slice_size`` rows of ``batch`` (a pytree with leading axis B;
  the last slice is padded with masked zero rows).

  Peak memory is one slice's contributions; the released sum is the same.
  """

  make: Callable[[PyTree], Contributions]
  batch: PyTree
  slice_size: int


@dataclasses.dataclass(frozen=True)
class ShardMapped:
  """Contributions computed where their rows live, on a 1-D ``mesh``.

  ``make(local_batch, replicated)`` builds the contributions of one
  device's rows (possibly ``Microbatched``); ``batch`` and the mask are
  sharded along ``axis_name``; ``replicated`` (e.g. the parameters and a
  projection basis) is passed to every device whole. ``make`` must not
  close over other arrays.
  ``check_vma=False`` is REQUIRED: with jax 0.10's default, ``jax.grad``
  with respect to replicated params inside ``shard_map`` psums the
  cotangent over devices, so every "per-example" gradient would silently
  become a sum of one example per device (tests/test_multidevice*.py).
  """

  make: Callable[[PyTree, PyTree], Any]
  batch: PyTree
  replicated: PyTree
  mesh: jax.sharding.Mesh
  axis_name: str = "data"


def _zero_stats() -> clipping.ClipStats:
  zero = jnp.zeros((), jnp.int32)
  return clipping.ClipStats(zero, zero, zero, jnp.zeros((), jnp.float32))


def _add_stats(a: clipping.ClipStats, b: clipping.ClipStats
               ) -> clipping.ClipStats:
  """Counts add; ``mean_norm`` holds a SUM of norms until ``_finish``."""
  return clipping.ClipStats(*(x + y for x, y in zip(a, b)))


def _finish(stats: clipping.ClipStats) -> clipping.ClipStats:
  return stats._replace(mean_norm=stats.mean_norm /
                        jnp.maximum(stats.num_examples, 1))


def _clip_and_sum(contributions: Contributions, clip_norm: jax.Array,
                  mask: jax.Array) -> tuple[PyTree, clipping.ClipStats]:
  """One backend's clipped sum; stats carry the sum of norms (see _finish)."""
  norms = contributions.norms()
  scales, stats = clipping.clip_scales(norms, clip_norm, mask)
  total = contributions.weighted_sum(scales)
  return total, stats._replace(mean_norm=stats.mean_norm *
                               stats.num_examples)


def _split(tree: PyTree, slice_size: int) -> PyTree:
  """(B, ...) leaves -> (S, slice_size, ...), zero rows appended as needed
  (the mask's appended rows are 0: they contribute exactly nothing)."""
  def split(x):
    pad = (-x.shape[0]) % slice_size
    if pad:
      x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)])
    return jnp.reshape(x, (x.shape[0] // slice_size, slice_size) +
                       x.shape[1:])
  return jax.tree_util.tree_map(split, tree)


def _raw_clipped_sum(contributions, clip_norm, mask):
  if isinstance(contributions, Microbatched):
    return _microbatched_sum(contributions, clip_norm, mask)
  if isinstance(contributions, ShardMapped):
    return _shard_mapped_sum(contributions, clip_norm, mask)
  return _clip_and_sum(contributions, clip_norm, mask)


def _microbatched_sum(contributions: Microbatched, clip_norm, mask):
  slices = _split(contributions.batch, contributions.slice_size)
  masks = _split(mask, contributions.slice_size)

  def body(carry, xs):
    total, stats = carry
    part, part_stats = _raw_clipped_sum(contributions.make(xs[0]), clip_norm,
                                        xs[1])
    return (jax.tree_util.tree_map(jnp.add, total, part),
            _add_stats(stats, part_stats)), None

  # The first slice starts the carry (its structure and dtypes).
  first = jax.tree_util.tree_map(lambda x: x[0], (slices, masks))
  init = _raw_clipped_sum(contributions.make(first[0]), clip_norm, first[1])
  rest = jax.tree_util.tree_map(lambda x: x[1:], (slices, masks))
  (total, stats), _ = jax.lax.scan(body, init, rest)
  return total, stats


def _shard_mapped_sum(contributions: ShardMapped, clip_norm, mask):
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  axis = contributions.axis_name

  def local(batch, mask, replicated, clip_norm):
    total, stats = _raw_clipped_sum(contributions.make(batch, replicated),
                                    clip_norm, mask)
    psum = functools.partial(jax.lax.psum, axis_name=axis)
    return psum(total), clipping.ClipStats(*(psum(s) for s in stats))

  return jax.shard_map(local, mesh=contributions.mesh,
                       in_specs=(P(axis), P(axis), P(), P()),
                       out_specs=(P(), P()), check_vma=False)(
                           contributions.batch, mask,
                           contributions.replicated,
                           jnp.asarray(clip_norm, jnp.float32))


def clipped_sum(contributions, clip_norm: jax.Array | float,
                mask: jax.Array) -> tuple[PyTree, clipping.ClipStats]:
  """sum_i clip_C(c_i) over the real rows: L2 sensitivity C (invariant 1).

  Args:
    contributions: a ``Contributions`` backend, or a ``Microbatched`` /
      ``ShardMapped`` wrapper of one.
    clip_norm: the threshold C (public; a float or a traced scalar).
    mask: (B,) 1 for real rows, 0 for padding.

  Returns:
    (the clipped sum, ClipStats over the real rows).
  """
  total, stats = _raw_clipped_sum(contributions, clip_norm, mask)
  return total, _finish(stats)


def privatize(contributions, clip_norm: jax.Array | float,
              mask: jax.Array, key: jax.Array, *,
              noise_multiplier: jax.Array | float,
              normalizer: jax.Array | float
              ) -> tuple[PyTree, clipping.ClipStats]:
  """The released mean: (clipped sum + N(0, (sigma C)^2 I)) / normalizer.

  The noise is drawn once, here, on the global sum (invariant 2), with a
  standard deviation proportional to the same C that bounded each row, and
  the divisor is the fixed expected batch size q*N (or N for full batch):
  dividing by the realised batch size would leak it.

  Args:
    contributions: see ``clipped_sum``.
    clip_norm: C, computed from public data only.
    mask: (B,) 1 real, 0 padding.
    key: the step's noise key (from the run's secret coins).
    noise_multiplier: sigma, calibrated by the accountant for the run.
    normalizer: q*N, fixed for the run.

  Returns:
    (noisy mean, ClipStats).
  """
  total, stats = clipped_sum(contributions, clip_norm, mask)
  noisy = noise.add_gaussian_noise(total, key,
                                   noise_multiplier * jnp.asarray(clip_norm))
  return jax.tree_util.tree_map(lambda g: g / normalizer, noisy), stats
