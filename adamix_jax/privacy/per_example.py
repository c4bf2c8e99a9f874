"""Per-example gradients of any loss by ``jax.vmap(jax.grad(...))``: the
mechanism's general backend.

``loss_fn(params, example)`` takes ONE example (a pytree without a batch
axis) and returns a scalar. ``PerExampleGradients`` holds them (leading axis
B) for ``privacy.mechanism``; with ``microbatch_size`` they are produced
slice by slice (``mechanism.Microbatched``), so peak memory is
microbatch_size x num_params, not batch x params.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp

from adamix_jax.privacy import clipping
from adamix_jax.privacy import mechanism

PyTree = Any
ExampleLoss = Callable[[PyTree, PyTree], jax.Array]
# Maps ONE example's gradient to a transformed gradient (e.g. a projection).
PerExampleTransform = Callable[[PyTree], PyTree]


def per_example_grads(loss_fn: ExampleLoss, params: PyTree,
                      batch: PyTree) -> PyTree:
  """Gradients of ``loss_fn`` for each example; every leaf gets axis 0 = B."""
  return jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))(params, batch)


@flax.struct.dataclass
class PerExampleGradients:
  """Materialised per-example gradients (any pytree, leading axis B)."""

  grads: PyTree
  row_norms: jax.Array  # (B,)

  @classmethod
  def create(cls, grads: PyTree,
             transform: Optional[PerExampleTransform] = None
             ) -> "PerExampleGradients":
    """``transform`` runs on each example BEFORE its norm is taken, so that
    whatever it does (a projection) cannot carry an example past the bound."""
    if transform is not None:
      grads = jax.vmap(transform)(grads)
    return cls(grads=grads,
               row_norms=clipping.per_example_global_norms(grads))

  def norms(self) -> jax.Array:
    return self.row_norms

  def weighted_sum(self, weights: jax.Array) -> PyTree:
    grads = clipping.zero_nonfinite_rows(self.grads, self.row_norms)
    # sum_i w_i g_i as ONE contraction over the batch axis: XLA:CPU turns
    # scale-then-reduce of vmapped outer-product gradients into a fused
    # reduction that is ~30x slower than this dot.
    return jax.tree_util.tree_map(
        lambda g: jnp.tensordot(weights.astype(g.dtype), g, axes=1), grads)


def _batch_size(batch: PyTree) -> int:
  sizes = {x.shape[0] for x in jax.tree_util.tree_leaves(batch)}
  if len(sizes) != 1:
    raise ValueError(f"All batch leaves need the same leading size, got "
                     f"{sizes}.")
  return sizes.pop()


def map_example_slices(fn: Callable[[PyTree], jax.Array], batch: PyTree,
                       examples_per_pass: Optional[int]) -> jax.Array:
  """``fn(batch)`` for a per-example ``fn`` (rows in, rows out), computed
  ``examples_per_pass`` rows at a time (``lax.map``): what a pass holds at
  once (activations, tangents, cotangents) shrinks by B / examples_per_pass.
  None, or a slice as large as the batch: one call."""
  size = _batch_size(batch)
  if examples_per_pass is None or examples_per_pass >= size:
    return fn(batch)
  if examples_per_pass < 1 or size % examples_per_pass:
    raise ValueError(f"examples_per_pass={examples_per_pass} must divide "
                     f"the batch size {size}.")
  passes = size // examples_per_pass
  slices = jax.tree_util.tree_map(
      lambda x: jnp.reshape(x, (passes, examples_per_pass) + x.shape[1:]),
      batch)
  per_pass = jax.lax.map(fn, slices)  # (passes, examples_per_pass, ...)
  return jnp.reshape(per_pass, (size,) + per_pass.shape[2:])


def vmap_contributions(loss_fn: ExampleLoss, params: PyTree, batch: PyTree,
                       transform: Optional[PerExampleTransform] = None, *,
                       microbatch_size: Optional[int] = None):
  """The vmap backend of a batch: per-example gradients (transformed),
  all at once or ``microbatch_size`` at a time (a batch that is not a
  multiple is padded with masked rows; the trainers pad their buckets to a
  multiple so that nothing is added)."""
  size = _batch_size(batch)
  make = lambda b: PerExampleGradients.create(
      per_example_grads(loss_fn, params, b), transform)
  if microbatch_size is None or microbatch_size >= size:
    return make(batch)
  if microbatch_size <= 0:
    raise ValueError(f"microbatch_size must be > 0, got {microbatch_size}.")
  return mechanism.Microbatched(make=make, batch=batch,
                                slice_size=microbatch_size)


def clipped_grad_sum(loss_fn: ExampleLoss,
                     params: PyTree,
                     batch: PyTree,
                     clip_norm: jax.Array | float,
                     mask: Optional[jax.Array] = None,
                     *,
                     microbatch_size: Optional[int] = None,
                     pre_clip_transform: Optional[PerExampleTransform] = None,
                     ) -> tuple[PyTree, clipping.ClipStats]:
  """sum_i clip_C(transform(grad_i)) over the real rows: sensitivity C.

  Args:
    loss_fn: per-example loss ``loss_fn(params, example) -> scalar``.
    params: model parameters.
    batch: examples with a leading axis B (already padded to a bucket).
    clip_norm: per-example bound C.
    mask: (B,) 1 for real examples, 0 for padding; None: all real.
    microbatch_size: examples per vmap (the batch is padded with masked
      rows to a multiple). None: all at once.
    pre_clip_transform: per-example map applied before the norm is taken.

  Returns:
    (sum over examples of clipped gradients, ClipStats over the batch).
  """
  if mask is None:
    mask = jnp.ones((_batch_size(batch),), jnp.float32)
  contributions = vmap_contributions(loss_fn, params, batch,
                                     pre_clip_transform,
                                     microbatch_size=microbatch_size)
  return mechanism.clipped_sum(contributions, clip_norm, mask)


def clipped_sum(per_example_grads_tree: PyTree,
                clip_norm: jax.Array | float,
                mask: Optional[jax.Array] = None,
                pre_clip_transform: Optional[PerExampleTransform] = None
                ) -> tuple[PyTree, clipping.ClipStats]:
  """Sum over examples of clip(transform(g_i)) of given per-example
  gradients (leading axis B). Sensitivity: clip_norm."""
  contributions = PerExampleGradients.create(per_example_grads_tree,
                                             pre_clip_transform)
  if mask is None:
    mask = jnp.ones(contributions.row_norms.shape, jnp.float32)
  return mechanism.clipped_sum(contributions, clip_norm, mask)
