"""DP aggregation as composable optax transformations.

``dp_aggregate`` turns per-example gradients into a privatised mean
gradient through ``privacy.mechanism.privatize``: clip each example (after
an optional per-example transform), sum, add N(0, (sigma * C)^2 I) ONCE to
that sum with a key carried in the state, divide by a fixed normaliser (the
*expected* batch size q*N for Poisson-sampled DP-SGD, or N for full-batch
noisy GD). Dividing by the realised batch size would leak it; dividing by a
fixed number does not. The key must come from secret coins
(``MechanismCoins.fresh().noise_key()``), never from a published seed.

Example (chain with any optax optimiser)::

  tx = optax.chain(
      dp_aggregate(clip_norm=1.0, noise_multiplier=1.1,
                   normalizer=q * n, key=MechanismCoins.fresh().noise_key()),
      optax.sgd(0.1))
  state = tx.init(params)
  grads = per_example_grads(loss_fn, params, batch)   # leading axis B
  updates, state = tx.update(grads, state, params, mask=mask)
  params = optax.apply_updates(params, updates)

Sharp edges:
  * ``updates`` must be PER-EXAMPLE gradients (leading batch axis), not a
    mean: a mean has already mixed the examples and cannot be clipped.
  * Pass ``mask`` for padded batches; padding then contributes exactly zero.
  * Under ``jit`` with a data-sharded batch the sum is global, and the noise,
    drawn from the replicated key in the state, is added once.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from adamix_jax.privacy import clipping
from adamix_jax.privacy import mechanism
from adamix_jax.privacy import per_example

PyTree = Any


class DPAggregateState(NamedTuple):
  """State of ``dp_aggregate``: the noise key and running diagnostics."""

  noise_key: jax.Array
  steps: jax.Array
  num_nonfinite: jax.Array  # real examples zeroed for NaN/inf, cumulative


def _check(clip_norm, noise_multiplier, normalizer):
  # `not x > 0` also rejects NaN.
  if not clip_norm > 0:
    raise ValueError(f"clip_norm must be > 0, got {clip_norm}.")
  if not noise_multiplier >= 0:
    raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}.")
  if not normalizer > 0:
    raise ValueError(f"normalizer (expected batch size) must be > 0, got "
                     f"{normalizer}.")


def check_mask(mask: Optional[jax.Array], batch_size: int) -> jax.Array:
  """The (B,) padding mask (all ones when None), its shape checked: a mask
  of another length would silently pair rows with the wrong weights."""
  if mask is None:
    return jnp.ones((batch_size,), jnp.float32)
  if jnp.shape(mask) != (batch_size,):
    raise ValueError(
        f"mask has shape {jnp.shape(mask)} but the batch has {batch_size} "
        "rows: pass one entry per row (1 real, 0 padding), e.g. the "
        "PoissonSampler batch's .mask.")
  return mask


def dp_aggregate(clip_norm: float,
                 noise_multiplier: float,
                 normalizer: float,
                 key: jax.Array,
                 pre_clip_transform: Optional[
                     per_example.PerExampleTransform] = None,
                 ) -> optax.GradientTransformationExtraArgs:
  """Per-example gradients -> clipped, noised, normalised mean gradient.

  Args:
    clip_norm: per-example L2 bound C.
    noise_multiplier: sigma; the noise std on the sum is sigma * C.
    normalizer: fixed divisor: expected batch size q*N (DP-SGD) or N (full
      batch).
    key: PRNG key from the run's secret coins; split every step, carried in
      the state.
    pre_clip_transform: optional per-example map applied before clipping.

  Returns:
    An optax ``GradientTransformationExtraArgs``; ``update`` accepts
    ``mask=`` (1 real, 0 padding).
  """
  _check(clip_norm, noise_multiplier, normalizer)

  def init_fn(params):
    del params
    return DPAggregateState(noise_key=key, steps=jnp.zeros((), jnp.int32),
                            num_nonfinite=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None, *, mask=None, **extra_args):
    del params, extra_args
    contributions = per_example.PerExampleGradients.create(updates,
                                                           pre_clip_transform)
    mask = check_mask(mask, contributions.row_norms.shape[0])
    noise_key, next_key = jax.random.split(state.noise_key)
    mean, stats = mechanism.privatize(contributions, clip_norm, mask,
                                      noise_key,
                                      noise_multiplier=noise_multiplier,
                                      normalizer=normalizer)
    return mean, DPAggregateState(
        noise_key=next_key, steps=state.steps + 1,
        num_nonfinite=state.num_nonfinite + stats.num_nonfinite)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def private_gradient(loss_fn: per_example.ExampleLoss,
                     params: PyTree,
                     batch: PyTree,
                     mask: Optional[jax.Array],
                     key: jax.Array,
                     *,
                     clip_norm: jax.Array | float,
                     noise_multiplier: float,
                     normalizer: float,
                     microbatch_size: Optional[int] = None,
                     pre_clip_transform: Optional[
                         per_example.PerExampleTransform] = None,
                     ) -> tuple[PyTree, clipping.ClipStats]:
  """One DP-SGD gradient from a loss: the functional form of dp_aggregate.

  Unlike ``dp_aggregate`` it never holds all B per-example gradients at
  once: with ``microbatch_size`` peak memory is microbatch x params.

  Returns:
    (the privatised mean gradient, like ``params``; ClipStats of the batch).
  """
  contributions = per_example.vmap_contributions(
      loss_fn, params, batch, pre_clip_transform,
      microbatch_size=microbatch_size)
  mask = check_mask(mask, jax.tree_util.tree_leaves(batch)[0].shape[0])
  return mechanism.privatize(contributions, clip_norm, mask, key,
                             noise_multiplier=noise_multiplier,
                             normalizer=normalizer)
