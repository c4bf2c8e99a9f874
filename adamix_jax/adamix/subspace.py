"""Public subspaces for private linear-head gradients, and their closed forms.

A linear head's per-example gradient is the outer product G_i = x~_i e_i^T
(x~ = [x, 1], e = softmax - onehot). Private gradients are expressed by
*coefficients* in a subspace computed from PUBLIC data only, clipped there,
noised there (so noise has the subspace's dimension, not (d+1)*c), and
mapped back. Three kinds:

* ``none``: the identity; coefficients are G_i itself, shape (d+1, c).
* ``features``: G_i -> V^T G_i with V (d+1, k) the top-k right singular
  vectors of the public features: coefficients (k, c), noise dim k*c.
* ``gradients``: the top-k singular directions of the public per-example
  gradients {G_j}. With the public Gram K = (X~p X~p^T) * (Ep Ep^T) = U L U^T,
  basis vector l is B_l = sum_j M_jl G_j with M = U_k L_k^{-1/2}, so the
  coefficients of G_i are ((x~_i X~p^T) * (e_i Ep^T)) M: never a (d+1)*c
  vector per example.

Every coefficient map is an orthogonal projection followed by an isometry,
so clipping coefficients to C bounds each example's contribution by C in
parameter space as well (DESIGN.md invariant 1, "clip after projection").
"""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

SUBSPACE_KINDS = ("none", "features", "gradients")


@flax.struct.dataclass
class Subspace:
  """A public subspace. Arrays unused by ``kind`` are None."""

  kind: str = flax.struct.field(pytree_node=False)
  feature_basis: Optional[jax.Array] = None  # (d+1, k)
  public_x: Optional[jax.Array] = None  # (n, d+1)
  public_e: Optional[jax.Array] = None  # (n, c)
  mixing: Optional[jax.Array] = None  # (n, k) = U_k L_k^{-1/2}


def identity() -> Subspace:
  return Subspace(kind="none")


def from_public_features(public_x_aug: jax.Array, rank: int) -> Subspace:
  """Top-``rank`` right singular vectors of the public (augmented) features."""
  rank = min(rank, *public_x_aug.shape)
  _, _, vt = jnp.linalg.svd(public_x_aug, full_matrices=False)
  return Subspace(kind="features", feature_basis=vt[:rank].T)


def from_basis_vectors(basis: jax.Array) -> Subspace:
  """A ``features`` subspace spanned by given (d+1)-vectors (columns).

  Used with no public images: the span of a zero-shot head's class
  embeddings is public (it comes from class names only).
  """
  q, _ = jnp.linalg.qr(basis)
  return Subspace(kind="features", feature_basis=q)


def from_public_gradients(public_x_aug: jax.Array, public_e: jax.Array,
                          rank: int, rel_tol: float = 1e-6) -> Subspace:
  """Top-``rank`` singular directions of the public per-example gradients."""
  rank = min(rank, public_x_aug.shape[0])
  gram = (public_x_aug @ public_x_aug.T) * (public_e @ public_e.T)
  eigvals, eigvecs = jnp.linalg.eigh(gram)  # ascending
  eigvals, eigvecs = eigvals[::-1][:rank], eigvecs[:, ::-1][:, :rank]
  # Directions with ~zero singular value carry no public signal: give them a
  # zero column (their coefficient is then 0 for every example).
  keep = eigvals > rel_tol * jnp.maximum(eigvals[0], 1e-30)
  inv_sqrt = jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, eigvals, 1.0)), 0.0)
  return Subspace(kind="gradients", public_x=public_x_aug, public_e=public_e,
                  mixing=eigvecs * inv_sqrt[None, :])


def coefficient_shape(subspace: Subspace, dim_aug: int,
                      num_classes: int) -> tuple[int, ...]:
  if subspace.kind == "none":
    return (dim_aug, num_classes)
  if subspace.kind == "features":
    return (subspace.feature_basis.shape[1], num_classes)
  return (subspace.mixing.shape[1],)


def map_back(subspace: Subspace, coefficients: jax.Array) -> jax.Array:
  """Coefficients -> a (d+1, c) gradient matrix in parameter space."""
  if subspace.kind == "none":
    return coefficients
  if subspace.kind == "features":
    return subspace.feature_basis @ coefficients
  weights = subspace.mixing @ coefficients  # (n,)
  return subspace.public_x.T @ (weights[:, None] * subspace.public_e)


# --- closed forms over a batch of examples (x_aug (B, d+1), e (B, c)) -------


def _gradient_coefficients(subspace: Subspace, x_aug, e):
  inner = (x_aug @ subspace.public_x.T) * (e @ subspace.public_e.T)  # (B, n)
  return inner @ subspace.mixing  # (B, k)


def closed_form_norms(subspace: Subspace, x_aug: jax.Array,
                      e: jax.Array) -> jax.Array:
  """Norm of each example's gradient coefficients: (B,)."""
  e_norms = jnp.linalg.norm(e, axis=1)
  if subspace.kind == "none":
    return jnp.linalg.norm(x_aug, axis=1) * e_norms
  if subspace.kind == "features":
    return jnp.linalg.norm(x_aug @ subspace.feature_basis, axis=1) * e_norms
  return jnp.linalg.norm(_gradient_coefficients(subspace, x_aug, e), axis=1)


def closed_form_weighted_sum(subspace: Subspace, x_aug: jax.Array,
                             e: jax.Array, weights: jax.Array) -> jax.Array:
  """sum_i weights_i * coefficients_i, without per-example outer products."""
  if subspace.kind == "none":
    return x_aug.T @ (weights[:, None] * e)
  if subspace.kind == "features":
    return (x_aug @ subspace.feature_basis).T @ (weights[:, None] * e)
  return weights @ _gradient_coefficients(subspace, x_aug, e)


# --- the same maps on one explicit gradient matrix (the vmap path) ----------


def coefficients_of(subspace: Subspace, gradient: jax.Array) -> jax.Array:
  """Coefficients of ONE explicit (d+1, c) gradient matrix."""
  if subspace.kind == "none":
    return gradient
  if subspace.kind == "features":
    return subspace.feature_basis.T @ gradient
  # <G, B_l> with B_l = X~p^T diag(M_:l) Ep: sum_j M_jl x~_j^T G e_j.
  per_public = jnp.einsum("nd,dc,nc->n", subspace.public_x, gradient,
                          subspace.public_e)
  return per_public @ subspace.mixing
