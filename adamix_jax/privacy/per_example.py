"""Per-example gradients of any loss by ``jax.vmap(jax.grad(...))``.

``loss_fn(params, example)`` takes ONE example (a pytree without a batch
axis) and returns a scalar. Microbatching runs the vmap over slices of
``microbatch_size`` examples inside a ``lax.scan`` and accumulates clipped
sums, so peak memory is microbatch_size x num_params, not batch x params.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from adamix_jax.privacy import clipping

PyTree = Any
ExampleLoss = Callable[[PyTree, PyTree], jax.Array]


def per_example_grads(loss_fn: ExampleLoss, params: PyTree,
                      batch: PyTree) -> PyTree:
  """Gradients of ``loss_fn`` for each example; every leaf gets axis 0 = B."""
  return jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))(params, batch)


def _batch_size(batch: PyTree) -> int:
  sizes = {x.shape[0] for x in jax.tree_util.tree_leaves(batch)}
  if len(sizes) != 1:
    raise ValueError(f"All batch leaves need the same leading size, got {sizes}.")
  return sizes.pop()


def clipped_grad_sum(loss_fn: ExampleLoss,
                     params: PyTree,
                     batch: PyTree,
                     clip_norm: jax.Array | float,
                     mask: Optional[jax.Array] = None,
                     *,
                     microbatch_size: Optional[int] = None,
                     pre_clip_transform: Optional[
                         clipping.PerExampleTransform] = None,
                     ) -> tuple[PyTree, clipping.ClipStats]:
  """Sum of clipped per-example gradients, computed microbatch by microbatch.

  Args:
    loss_fn: per-example loss ``loss_fn(params, example) -> scalar``.
    params: model parameters.
    batch: examples with a leading axis B (already padded to a bucket).
    clip_norm: per-example bound C.
    mask: (B,) 1 for real examples, 0 for padding.
    microbatch_size: examples per vmap; must divide B. None: all at once.
    pre_clip_transform: per-example map applied before the norm is taken.

  Returns:
    (sum over examples of clipped gradients, ClipStats summed over the batch).
  """
  size = _batch_size(batch)
  if mask is None:
    mask = jnp.ones((size,), jnp.float32)
  if microbatch_size is None or microbatch_size >= size:
    grads = per_example_grads(loss_fn, params, batch)
    return clipping.clipped_sum(grads, clip_norm, mask, pre_clip_transform)
  if size % microbatch_size:
    raise ValueError(f"microbatch_size={microbatch_size} must divide the padded "
                     f"batch size {size}; pick bucket sizes that are multiples.")
  num_micro = size // microbatch_size
  split = lambda x: jnp.reshape(x, (num_micro, microbatch_size) + x.shape[1:])
  micro_batches = jax.tree_util.tree_map(split, batch)
  micro_masks = split(mask)

  def body(carry, xs):
    total, stats = carry
    micro_batch, micro_mask = xs
    grads = per_example_grads(loss_fn, params, micro_batch)
    part, part_stats = clipping.clipped_sum(grads, clip_norm, micro_mask,
                                            pre_clip_transform)
    total = jax.tree_util.tree_map(jnp.add, total, part)
    stats = clipping.ClipStats(
        num_examples=stats.num_examples + part_stats.num_examples,
        num_clipped=stats.num_clipped + part_stats.num_clipped,
        num_nonfinite=stats.num_nonfinite + part_stats.num_nonfinite,
        mean_norm=stats.mean_norm + part_stats.mean_norm *
        part_stats.num_examples)
    return (total, stats), None

  zero_grads = jax.tree_util.tree_map(
      lambda p: jnp.zeros(jnp.shape(p), jnp.result_type(p)), params)
  if pre_clip_transform is not None:
    zero_grads = pre_clip_transform(zero_grads)
  zero = jnp.zeros((), jnp.int32)
  init = (zero_grads, clipping.ClipStats(zero, zero, zero,
                                         jnp.zeros((), jnp.float32)))
  (total, stats), _ = jax.lax.scan(body, init, (micro_batches, micro_masks))
  stats = stats._replace(
      mean_norm=stats.mean_norm / jnp.maximum(stats.num_examples, 1))
  return total, stats
