"""Update rules shared by every AdaMix step form (linear head, any model).

After the mechanism has released the noisy private mean, the step is
post-processing: mix in the exact public gradient, scale by lr / C_t, pull
towards the public start, keep a tail average of the iterates. Each rule is
written once here.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def mixing_weights(public_weight: jax.Array | float,
                   num_public: int) -> tuple[Any, Any]:
  """(weight of the private mean, weight of the exact public mean gradient).

  (1 - alpha) g_private + alpha g_public; with no public examples the
  private mean gets weight 1.
  """
  if num_public == 0:
    return 1.0, 0.0
  return 1.0 - public_weight, public_weight


def step_sizes(learning_rate: jax.Array, lr_scale: jax.Array,
               threshold: jax.Array, normalize_by_threshold: bool
               ) -> tuple[jax.Array, jax.Array]:
  """(learning rate, step size of the gradient): lr / C_t when normalised,
  so that a shrinking threshold does not shrink the step."""
  learning_rate = learning_rate * lr_scale
  if normalize_by_threshold:
    return learning_rate, learning_rate / threshold
  return learning_rate, learning_rate


def running_mean(average: PyTree, value: PyTree, count: jax.Array,
                 active: jax.Array) -> PyTree:
  """The tail average after one more iterate (``count`` includes it), when
  ``active``; unchanged otherwise."""
  denominator = jnp.maximum(count, 1)

  def update(a, v):
    return jnp.where(active, a + (v - a) / denominator.astype(a.dtype), a)

  return jax.tree_util.tree_map(update, average, value)
