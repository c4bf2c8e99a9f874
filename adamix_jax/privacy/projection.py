"""AdaMix's projected per-example gradients by forward-mode products.

AdaMix clips each example's gradient in a k-dimensional public subspace: it
needs the coefficients c_ij = <g_i, v_j> of example i's gradient on the
basis vectors v_1..v_k (the columns of V, P x k, orthonormal). The
reference computes every g_i (``vmap(grad)``, B x P floats) and then
``flatten(g_i) @ V``. But c_ij is the directional derivative of example i's
loss along v_j:

  c_ij = d/de loss_i(w + e v_j) at e = 0 = jvp(loss_i, w; v_j),

so k forward-mode (Jacobian-vector) products of the vector of B
per-example losses give the whole B x k matrix, for any model, with no
per-example gradient in memory. ``jax.linearize`` runs the forward pass
once and keeps its residuals; the tangent map is then applied to the basis
vectors ``chunk_size`` at a time (``lax.map`` over chunks, ``vmap`` within
one), so the tangent activations held at once are chunk_size x one
forward's, not k x; ``examples_per_pass`` does the same over slices of the
batch (each example's coefficients depend on it alone).

Cost: each tangent is about one forward pass more (two for a layer whose
input is itself a tangent: conv(dx, W) + conv(x, dW)), so the k products cost
~ k forward passes. That is cheap against vmap for small k; for the full
ghost-capture alternative (cost independent of k up to a B x P x k
contraction) see ``ghost.GhostContributions.project``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from adamix_jax.privacy import clipping
from adamix_jax.privacy import per_example

PyTree = Any
ExampleLoss = Callable[[PyTree, PyTree], jax.Array]


def stacked_basis(params: PyTree, basis: jax.Array | PyTree) -> PyTree:
  """A basis as a pytree like params with a LEADING axis k on every leaf.

  Args:
    params: the parameters (for the ``ravel_pytree`` order and shapes).
    basis: (P, k) with columns in ``ravel_pytree(params)`` order (as
      ``adamix.transform.gradient_basis`` returns), or already stacked.
  """
  if not isinstance(basis, (jax.Array, np.ndarray)):
    return basis
  _, unravel = ravel_pytree(params)
  return jax.vmap(unravel, in_axes=1)(jnp.asarray(basis))


def _columns_as_tangents(params: PyTree, columns: jax.Array) -> PyTree:
  """(P, c) columns (ravel_pytree order) -> pytree with leaves (c, *shape)."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  blocks, offset = [], 0
  for leaf in leaves:
    size = int(np.size(leaf))
    block = jnp.transpose(columns[offset:offset + size])  # (c, size)
    blocks.append(jnp.reshape(block, (columns.shape[1],) + jnp.shape(leaf))
                  .astype(jnp.result_type(leaf)))
    offset += size
  return jax.tree_util.tree_unflatten(treedef, blocks)


def jvp_coefficients(loss_fn: ExampleLoss,
                     params: PyTree,
                     batch: PyTree,
                     basis: jax.Array | PyTree,
                     *,
                     chunk_size: Optional[int] = 8,
                     examples_per_pass: Optional[int] = None) -> jax.Array:
  """(B, k) coefficients c_ij = <grad loss_fn(params, example_i), v_j>.

  Equals ``vmap(grad(loss_fn))`` flattened and multiplied by V, without
  forming a per-example gradient.

  Args:
    loss_fn: per-example loss ``loss_fn(params, example) -> scalar`` (e.g.
      ``train.full_model.classification_loss(model)``).
    params: model parameters.
    batch: examples with a leading axis B.
    basis: (P, k) (``ravel_pytree`` order) or a pytree like params whose
      leaves have a leading axis k.
    chunk_size: basis vectors pushed forward at once (tangent memory is
      chunk_size x one forward's activations); None: all k at once. For
      the CIFAR CNN at B = 256 on a quiet 2-core CPU, 8 vectors with 32
      examples per pass were fastest (4-16 vectors within 20 %; 1 vector
      1.5-1.8x slower): experiments/benchmarks/FULL_MODEL_SPEED.md.
    examples_per_pass: linearise and push forward this many examples at a
      time (``lax.map`` over slices of the batch; must divide B): the
      residuals and tangents held at once shrink by B / examples_per_pass.
      Exact, since each example's coefficients depend on it alone. None:
      the whole batch at once.

  Returns:
    (B, k) float array.
  """
  if not isinstance(basis, (jax.Array, np.ndarray)):
    basis = jax.vmap(lambda t: ravel_pytree(t)[0])(basis).T  # (P, k)
  basis = jnp.asarray(basis)
  return per_example.map_example_slices(
      lambda part: _coefficients(loss_fn, params, part, basis, chunk_size),
      batch, examples_per_pass)


def _coefficients(loss_fn, params, batch, basis, chunk_size):
  losses = lambda p: jax.vmap(loss_fn, in_axes=(None, 0))(p, batch)
  _, push_forward = jax.linearize(losses, params)
  push_chunk = jax.vmap(push_forward)  # (c, tangents) -> (c, B)
  num_vectors = basis.shape[1]
  if chunk_size is None or chunk_size >= num_vectors:
    return push_chunk(_columns_as_tangents(params, basis)).T
  num_chunks = -(-num_vectors // chunk_size)
  padded = num_chunks * chunk_size
  if padded > num_vectors:
    # Zero directions pad k to a multiple of the chunk: coefficient 0, dropped.
    basis = jnp.pad(basis, ((0, 0), (0, padded - num_vectors)))

  def one_chunk(index):
    # The chunk's columns are cut out of V here, so the tangents of only one
    # chunk exist at a time (no k x P copy of the basis).
    columns = jax.lax.dynamic_slice_in_dim(basis, index * chunk_size,
                                           chunk_size, axis=1)
    return push_chunk(_columns_as_tangents(params, columns))

  per_chunk = jax.lax.map(one_chunk, jnp.arange(num_chunks))  # (n, c, B)
  return jnp.reshape(per_chunk, (padded, -1))[:num_vectors].T


def jvp_clipped_projection_sum(loss_fn: ExampleLoss,
                               params: PyTree,
                               batch: PyTree,
                               basis: jax.Array | PyTree,
                               clip_norm: jax.Array | float,
                               mask: Optional[jax.Array] = None,
                               *,
                               chunk_size: Optional[int] = 8,
                               examples_per_pass: Optional[int] = None
                               ) -> tuple[jax.Array, clipping.ClipStats]:
  """sum_i clip_C(V^T g_i): AdaMix's k-dimensional clipped sum (sensitivity C).

  Project THEN clip, as the vmap backend with a basis: the
  clipping acts on the k coefficients, so the released k-vector moves by at
  most C when one example is added or removed. Non-finite rows are zeroed
  and counted, padding rows contribute 0 (``privacy.mechanism``).
  """
  coefficients = jvp_coefficients(loss_fn, params, batch, basis,
                                  chunk_size=chunk_size,
                                  examples_per_pass=examples_per_pass)
  return per_example.clipped_sum(coefficients, clip_norm, mask)
