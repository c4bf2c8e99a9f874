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
parameter space as well (docs/design.md, invariant 1: "clip after projection").

Speed (``gradients`` kind). The public feature Gram X~p X~p^T never changes:
pass it as ``public_gram`` (it is kept on the Subspace). The top-k directions
can come from a full ``eigh`` of K (``method="eigh"``) or from a few steps of
warm-started block subspace iteration followed by Rayleigh-Ritz
(``method="iterative"``): with Ritz pairs (U, L) of K on the iterated block,
M = U L^{-1/2} gives B^T B = L^{-1/2} U^T K U L^{-1/2} = I exactly, whatever
the block, so the isometry (and the bound above) holds for either method.
The closed forms accept a precomputed ``kernel`` x~_i . X~p^T (rows of a
private-public kernel that the caller caches, since features never change).
"""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import jax.scipy.linalg

from adamix_jax.adamix.settings import GRADIENT_METHODS
from adamix_jax.adamix.settings import SUBSPACE_KINDS


@flax.struct.dataclass
class Subspace:
  """A public subspace. Arrays unused by ``kind`` are None."""

  kind: str = flax.struct.field(pytree_node=False)
  feature_basis: Optional[jax.Array] = None  # (d+1, k)
  public_x: Optional[jax.Array] = None  # (n, d+1)
  public_e: Optional[jax.Array] = None  # (n, c)
  mixing: Optional[jax.Array] = None  # (n, k) = U_k L_k^{-1/2}
  # Cached X~p X~p^T (public features only); None: recomputed when needed.
  public_gram: Optional[jax.Array] = None  # (n, n)
  # Ritz vectors of the last block (descending), the next warm start.
  ritz_vectors: Optional[jax.Array] = None  # (n, k + oversample)


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


def public_feature_gram(public_x_aug: jax.Array) -> jax.Array:
  """X~p X~p^T: the public feature Gram, (n, n). Constant: compute it once."""
  return public_x_aug @ public_x_aug.T


def public_gradient_gram(public_x_aug: jax.Array, public_e: jax.Array,
                         public_gram: Optional[jax.Array] = None) -> jax.Array:
  """K = (X~p X~p^T) * (Ep Ep^T): Gram of the public per-example gradients."""
  if public_gram is None:
    public_gram = public_feature_gram(public_x_aug)
  return public_gram * (public_e @ public_e.T)


def _orthonormalize(v: jax.Array, passes: int = 2) -> jax.Array:
  """An orthonormal basis of span(v) (n, p) by shifted Cholesky QR.

  Columns are first scaled to unit norm; each pass is V <- V L^{-T} with
  L L^T = V^T V + s I (a tiny shift s keeps the factorization defined when
  V is rank-deficient); the second pass removes the first's rounding. Only
  p x p factorizations (no n x p LAPACK QR, which is slow on loaded
  multi-threaded CPUs); the span, all the subspace iteration needs, is kept
  (zero columns stay zero).
  """
  norms = jnp.linalg.norm(v, axis=0)
  v = v / jnp.where(norms > 0, norms, 1.0)[None, :]
  eye = jnp.eye(v.shape[1], dtype=v.dtype)
  for _ in range(passes):
    gram = v.T @ v
    gram = 0.5 * (gram + gram.T)
    shift = 1e-6 * jnp.trace(gram) / v.shape[1] + 1e-30
    lower = jnp.linalg.cholesky(gram + shift * eye)
    inverse = jax.scipy.linalg.solve_triangular(lower, eye, lower=True)
    v = v @ inverse.T
  return v


def _mixing_from_eigenpairs(eigvals, eigvecs, rel_tol):
  # Directions with ~zero singular value carry no public signal: give them a
  # zero column (their coefficient is then 0 for every example).
  keep = eigvals > rel_tol * jnp.maximum(eigvals[0], 1e-30)
  inv_sqrt = jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, eigvals, 1.0)), 0.0)
  return eigvecs * inv_sqrt[None, :]


def top_eigenpairs_iterative(gram: jax.Array, block: int, iterations: int,
                             init: Optional[jax.Array] = None,
                             key: Optional[jax.Array] = None
                             ) -> tuple[jax.Array, jax.Array]:
  """Top-``block`` eigenpairs of a PSD ``gram`` by block subspace iteration.

  ``iterations`` products gram @ V (each followed by orthonormalization),
  then Rayleigh-Ritz: eigh of the small V^T gram V. Warm start from ``init``
  (n, block), e.g. the previous Ritz vectors; its zero (or missing) columns
  are replaced by Gaussian ones from ``key`` (public randomness).

  Returns:
    (eigenvalues descending (block,), Ritz vectors (n, block)).
  """
  n = gram.shape[0]
  if key is None:
    key = jax.random.key(0)
  fresh = jax.random.normal(key, (n, block), gram.dtype)
  if init is None:
    v = fresh
  else:
    norms = jnp.linalg.norm(init, axis=0)
    v = jnp.where((norms > 0.5)[None, :], init, fresh)
  v = _orthonormalize(v)
  for _ in range(iterations):
    v = _orthonormalize(gram @ v)
  gv = gram @ v
  small = v.T @ gv
  small = 0.5 * (small + small.T)
  theta, y = jnp.linalg.eigh(small)  # ascending
  theta, y = theta[::-1], y[:, ::-1]
  return theta, v @ y


def from_public_gradients(public_x_aug: jax.Array, public_e: jax.Array,
                          rank: int, rel_tol: float = 1e-6, *,
                          public_gram: Optional[jax.Array] = None,
                          method: str = "eigh",
                          previous: Optional[Subspace] = None,
                          iterations: int = 2,
                          oversample: int = 10,
                          key: Optional[jax.Array] = None) -> Subspace:
  """Top-``rank`` singular directions of the public per-example gradients.

  Args:
    public_x_aug: (n, d+1) public augmented features.
    public_e: (n, c) public residuals at the current parameters.
    rank: k (capped at n).
    rel_tol: directions with eigenvalue below rel_tol * the largest get a
      zero mixing column.
    public_gram: cached X~p X~p^T (n, n); computed here when None. Kept on
      the returned Subspace either way.
    method: "eigh" (full eigendecomposition of the n x n K) or "iterative"
      (``iterations`` steps of block subspace iteration with block
      rank + oversample, warm-started from ``previous``, then Rayleigh-Ritz).
    previous: the last subspace (its ``ritz_vectors`` start the iteration);
      None: a Gaussian start from ``key``.
    iterations: products K @ V before Rayleigh-Ritz ("iterative" only).
    oversample: extra block columns, improving convergence of the top rank
      ("eigh" keeps rank + oversample eigenvectors as ``ritz_vectors``).
    key: PRNG key for the Gaussian start (public randomness; default key 0).

  Returns:
    A ``gradients`` Subspace; B_l = X~p^T diag(M_:l) Ep are orthonormal in
    parameter space (B^T B = I on the kept directions) for both methods.
  """
  if method not in GRADIENT_METHODS:
    raise ValueError(f"method must be one of {GRADIENT_METHODS}, got "
                     f"{method!r}.")
  n = public_x_aug.shape[0]
  rank = min(rank, n)
  if public_gram is None:
    public_gram = public_feature_gram(public_x_aug)
  gram = public_gradient_gram(public_x_aug, public_e, public_gram)
  block = min(n, rank + max(oversample, 0))
  if method == "eigh":
    eigvals, eigvecs = jnp.linalg.eigh(gram)  # ascending
    eigvals, eigvecs = eigvals[::-1], eigvecs[:, ::-1]
    ritz = eigvecs[:, :block]  # exact: a warm start for "iterative"
    eigvals, eigvecs = eigvals[:rank], eigvecs[:, :rank]
  else:
    init = None
    if (previous is not None and previous.ritz_vectors is not None and
        previous.ritz_vectors.shape == (n, block)):
      init = previous.ritz_vectors
    eigvals, ritz = top_eigenpairs_iterative(gram, block, iterations, init, key)
    eigvals, eigvecs = eigvals[:rank], ritz[:, :rank]
  return Subspace(kind="gradients", public_x=public_x_aug, public_e=public_e,
                  mixing=_mixing_from_eigenpairs(eigvals, eigvecs, rel_tol),
                  public_gram=public_gram, ritz_vectors=ritz)


def parameter_basis(subspace: Subspace) -> jax.Array:
  """The basis as explicit (d+1, c) matrices, (k, d+1, c): for tests and
  diagnostics only (it materialises k parameter-sized arrays)."""
  if subspace.kind == "none":
    raise ValueError("the identity subspace has no finite basis to list.")
  if subspace.kind == "features":
    raise ValueError("a features subspace acts as V^T G; use feature_basis.")
  return jnp.einsum("nd,nl,nc->ldc", subspace.public_x, subspace.mixing,
                    subspace.public_e)


def map_back(subspace: Subspace, coefficients: jax.Array) -> jax.Array:
  """Coefficients -> a (d+1, c) gradient matrix in parameter space."""
  if subspace.kind == "none":
    return coefficients
  if subspace.kind == "features":
    return subspace.feature_basis @ coefficients
  weights = subspace.mixing @ coefficients  # (n,)
  return subspace.public_x.T @ (weights[:, None] * subspace.public_e)


# --- closed forms over a batch of examples (x_aug (B, d+1), e (B, c)) -------
#
# ``kernel``: optional precomputed x_aug @ subspace.public_x.T (B, n), used by
# the ``gradients`` kind instead of the B x n x (d+1) product (the features
# never change, so a caller can cache the kernel of every example once).


def gradient_coefficients(subspace: Subspace, x_aug: jax.Array, e: jax.Array,
                          kernel: Optional[jax.Array] = None) -> jax.Array:
  """Coefficients of each G_i in a ``gradients`` subspace: (B, k)."""
  if kernel is None:
    kernel = x_aug @ subspace.public_x.T
  inner = kernel * (e @ subspace.public_e.T)  # (B, n)
  return inner @ subspace.mixing  # (B, k)


def closed_form_norms(subspace: Subspace, x_aug: jax.Array,
                      e: jax.Array, kernel: Optional[jax.Array] = None
                      ) -> jax.Array:
  """Norm of each example's gradient coefficients: (B,)."""
  e_norms = jnp.linalg.norm(e, axis=1)
  if subspace.kind == "none":
    return jnp.linalg.norm(x_aug, axis=1) * e_norms
  if subspace.kind == "features":
    return jnp.linalg.norm(x_aug @ subspace.feature_basis, axis=1) * e_norms
  return jnp.linalg.norm(gradient_coefficients(subspace, x_aug, e, kernel),
                         axis=1)


def closed_form_weighted_sum(subspace: Subspace, x_aug: jax.Array,
                             e: jax.Array, weights: jax.Array,
                             kernel: Optional[jax.Array] = None) -> jax.Array:
  """sum_i weights_i * coefficients_i, without per-example outer products."""
  if subspace.kind == "none":
    return x_aug.T @ (weights[:, None] * e)
  if subspace.kind == "features":
    return (x_aug @ subspace.feature_basis).T @ (weights[:, None] * e)
  return weights @ gradient_coefficients(subspace, x_aug, e, kernel)


def map_back_weights(subspace: Subspace, coefficients: jax.Array) -> jax.Array:
  """``gradients`` kind: map_back(c) = X~p^T (w[:, None] * Ep); returns that
  (n, c) factor w[:, None] * Ep, so a caller can add other X~p^T terms (the
  public gradient) and do ONE (d+1) x n x c product."""
  return (subspace.mixing @ coefficients)[:, None] * subspace.public_e


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


# --- the mechanism's backends for a linear head ------------------------------
#
# Both keep the contract of ``privacy.mechanism.Contributions``: ``norms``
# may hold NaN/inf (a NaN feature row), and a row whose norm is not finite is
# zeroed before it enters any sum, so its weight 0 really gives 0.


@flax.struct.dataclass
class OuterProducts:
  """Closed-form contributions G_i = x~_i e_i^T in a "none" or "features"
  subspace (coefficients (d+1, c) or (k, c) per example, never formed)."""

  subspace: Subspace
  x_aug: jax.Array  # (B, d+1)
  e: jax.Array  # (B, c)
  row_norms: jax.Array  # (B,)

  @classmethod
  def create(cls, subspace: Subspace, x_aug: jax.Array,
             e: jax.Array) -> "OuterProducts":
    return cls(subspace=subspace, x_aug=x_aug, e=e,
               row_norms=closed_form_norms(subspace, x_aug, e))

  def norms(self) -> jax.Array:
    return self.row_norms

  def weighted_sum(self, weights: jax.Array) -> jax.Array:
    finite = jnp.isfinite(self.row_norms)
    e = jnp.where(finite[:, None], self.e, 0.0)
    weighted = lambda x: closed_form_weighted_sum(self.subspace, x, e,
                                                  weights)
    # x_aug (B x (d+1)) is only rewritten when some row needs it.
    return jax.lax.cond(
        jnp.all(finite), weighted,
        lambda x: weighted(jnp.where(finite[:, None], x, 0.0)), self.x_aug)


@flax.struct.dataclass
class Coefficients:
  """Explicit per-example coefficient rows (B, k): a "gradients" subspace,
  where one (B, k) matrix serves the norms and the weighted sum."""

  rows: jax.Array  # (B, k)
  row_norms: jax.Array  # (B,)

  @classmethod
  def create(cls, rows: jax.Array) -> "Coefficients":
    return cls(rows=rows, row_norms=jnp.linalg.norm(rows, axis=1))

  def norms(self) -> jax.Array:
    return self.row_norms

  def weighted_sum(self, weights: jax.Array) -> jax.Array:
    finite = jnp.isfinite(self.row_norms)
    return weights @ jnp.where(finite[:, None], self.rows, 0.0)


def closed_form_contributions(subspace: Subspace, x_aug: Optional[jax.Array],
                              e: jax.Array,
                              kernel: Optional[jax.Array] = None):
  """The closed-form backend of a batch (x_aug (B, d+1) or, for a
  "gradients" subspace, the kernel rows x~_i . X~p^T instead)."""
  if subspace.kind == "gradients":
    return Coefficients.create(gradient_coefficients(subspace, x_aug, e,
                                                     kernel))
  return OuterProducts.create(subspace, x_aug, e)
