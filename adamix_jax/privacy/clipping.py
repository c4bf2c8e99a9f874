"""Per-example clipping: the part of the mechanism that bounds sensitivity.

Invariant 1 (docs/design.md): after clipping, each real example's
contribution has L2 norm <= clip_norm, padding examples contribute exactly
zero, and a non-finite per-example contribution is zeroed (and counted)
instead of poisoning the sum. ``privacy.mechanism`` applies these scales to
every backend.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

PyTree = Any


class ClipStats(NamedTuple):
  """Diagnostics of one clipping call (counts over real, unpadded examples)."""

  num_examples: jax.Array
  num_clipped: jax.Array
  num_nonfinite: jax.Array
  mean_norm: jax.Array


def per_example_global_norms(per_example_grads: PyTree) -> jax.Array:
  """L2 norm of each example's whole gradient (all leaves together): (B,)."""
  leaves = jax.tree_util.tree_leaves(per_example_grads)
  squares = [jnp.sum(jnp.reshape(g, (g.shape[0], -1)).astype(jnp.float32)**2,
                     axis=1) for g in leaves]
  return jnp.sqrt(sum(squares))


def clip_scales(norms: jax.Array, clip_norm: jax.Array | float,
                mask: Optional[jax.Array] = None) -> tuple[jax.Array, ClipStats]:
  """Per-example multipliers min(1, C / norm), zero for padding and non-finite.

  Args:
    norms: (B,) per-example norms, possibly NaN/inf.
    clip_norm: the threshold C (a float or a traced scalar).
    mask: (B,) 1 for real examples, 0 for padding; None means all real.

  Returns:
    (scales, stats). A real example with a non-finite norm gets scale 0.
  """
  if mask is None:
    mask = jnp.ones_like(norms)
  real = mask.astype(bool)
  finite = jnp.isfinite(norms)
  safe_norms = jnp.where(finite, norms, 0.0)
  # tiny floor: a zero gradient gets scale 1 (it contributes 0 either way).
  scales = jnp.minimum(1.0, clip_norm / jnp.maximum(safe_norms, 1e-30))
  scales = jnp.where(real & finite, scales, 0.0)
  num_real = jnp.sum(real)
  stats = ClipStats(
      num_examples=num_real,
      num_clipped=jnp.sum(real & finite & (safe_norms > clip_norm)),
      num_nonfinite=jnp.sum(real & ~finite),
      mean_norm=jnp.sum(jnp.where(real & finite, safe_norms, 0.0)) /
      jnp.maximum(num_real, 1))
  return scales, stats


def zero_nonfinite_rows(per_example_grads: PyTree, norms: jax.Array) -> PyTree:
  """Rows whose norm is NaN/inf replaced by zeros (NaN * 0 is NaN: such rows
  must be replaced, not scaled)."""
  finite = jnp.isfinite(norms)

  def fix(g):
    keep = jnp.reshape(finite, (-1,) + (1,) * (g.ndim - 1))
    return jnp.where(keep, g, jnp.zeros_like(g))

  return jax.tree_util.tree_map(fix, per_example_grads)
