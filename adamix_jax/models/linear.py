"""The linear classification head on (frozen) features.

Parameters are a Flax-style dict ``{"kernel": (d, c), "bias": (c,)}``. The
closed-form DP code works on the *augmented* view: features x~ = [x, 1] and
one matrix W~ = [kernel; bias] of shape (d + 1, c), so that an example's
gradient is the outer product x~ (softmax(x~ W~) - y)^T.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Params = dict


def zeros(dim: int, num_classes: int) -> Params:
  return {"kernel": jnp.zeros((dim, num_classes), jnp.float32),
          "bias": jnp.zeros((num_classes,), jnp.float32)}


def augment(x: jax.Array) -> jax.Array:
  """Appends the constant-1 bias feature: (..., d) -> (..., d + 1)."""
  return jnp.concatenate([x, jnp.ones(x.shape[:-1] + (1,), x.dtype)], axis=-1)


def stack(params: Params) -> jax.Array:
  """{"kernel", "bias"} -> W~ of shape (d + 1, c)."""
  return jnp.concatenate([params["kernel"], params["bias"][None, :]], axis=0)


def unstack(matrix: jax.Array) -> Params:
  return {"kernel": matrix[:-1], "bias": matrix[-1]}


def logits(params: Params, x: jax.Array) -> jax.Array:
  return x @ params["kernel"] + params["bias"]


def residuals(matrix: jax.Array, x_aug: jax.Array, y: jax.Array,
              base_logits: jax.Array | None = None) -> jax.Array:
  """E = softmax(b + x~ W~) - onehot(y): the per-example gradient's class
  factor; ``base_logits`` b (fixed logits of a frozen start, e.g. the public
  model's) default to 0."""
  logits = x_aug @ matrix
  if base_logits is not None:
    logits = logits + base_logits
  return jax.nn.softmax(logits) - jax.nn.one_hot(y, matrix.shape[1])


def error_count(params: Params, x: np.ndarray, y: np.ndarray) -> int:
  """The number of misclassified rows (an integer: private selection's
  counts have sensitivity 1)."""
  predictions = np.asarray(jnp.argmax(logits(params, jnp.asarray(x)), axis=-1))
  return int(np.sum(predictions != np.asarray(y)))


def error_rate(params: Params, x: np.ndarray, y: np.ndarray) -> float:
  return error_count(params, x, y) / len(y)
