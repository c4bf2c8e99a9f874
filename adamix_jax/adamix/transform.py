"""AdaMix for any model, as an optax transformation.

``adamix(config, key, ...)`` is a ``GradientTransformationExtraArgs`` in the
spirit of optax's GaLore (a projector refreshed inside ``update``) and
jax_privacy's ``AugmentedGradientTransformation`` (project, clip, noise, map
back). Its state holds the public gradient basis V (P x k, orthonormal
columns), the last threshold and the noise key; every ``update``:

1. every ``refresh_every`` updates (the first included), recomputes V from
   the PUBLIC per-example gradients at the current parameters (their top-k
   right singular vectors);
2. sets the threshold C_t (``threshold``: a quantile of the public
   per-example gradient norms measured in V, or the fixed clip norm);
3. releases the private batch through ``privacy.mechanism.privatize``: each
   example's coefficients V^T g_i clipped to C_t, summed, N(0, (sigma
   C_t)^2 I_k) added once, divided by q*N; then maps back, g = V c (without
   a subspace: plain DP-SGD on the full gradient);
4. mixes in the exact mean public gradient (``rules.mixing_weights``),
   divides by C_t (``normalize_by_threshold``) and adds the pull
   lambda (w - w_0). Chain it with any optax optimiser.

``update`` takes, as ``updates``, either per-example gradients (a pytree
with a leading batch axis) or a function ``basis -> Contributions`` (any
backend of ``privacy.mechanism``: ghost norms, JVP projections, microbatched
or shard-mapped; the basis is None without a subspace), and the extra
arguments ``mask=`` (1 real, 0 padding) and ``public_grads=`` (per-example
gradients of the public examples at ``params``; None or empty: no public
data).

Example::

  tx = optax.chain(adamix(config, key=coins.noise_key(), rank=16,
                          anchor=w0), optax.sgd(0.5))
  state = tx.init(params)
  updates, state = tx.update(per_example_grads, state, params, mask=mask,
                             public_grads=public_per_example_grads)
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from adamix_jax.adamix import rules
from adamix_jax.adamix import settings as settings_lib
from adamix_jax.adamix import threshold as threshold_lib
from adamix_jax.privacy import mechanism
from adamix_jax.privacy import per_example
from adamix_jax.privacy import transform as privacy_transform

PyTree = Any
ContributionsFn = Callable[[Optional[jax.Array]], Any]


class AdaMixState(NamedTuple):
  """State of ``adamix``: the public subspace, the threshold, the key."""

  basis: Optional[jax.Array]  # (P, k) orthonormal columns, or None
  threshold: jax.Array  # C_t of the last update
  num_clipped: jax.Array  # of the last update
  batch_size: jax.Array  # real examples of the last update
  num_nonfinite: jax.Array  # cumulative
  count: jax.Array  # updates so far
  noise_key: jax.Array


def flatten(tree: PyTree) -> jax.Array:
  return ravel_pytree(tree)[0]


def gradient_basis(flat_grads: jax.Array, rank: int,
                   rel_tol: float = 1e-6) -> jax.Array:
  """Top-``rank`` right singular vectors of ``flat_grads`` (n x P): (P, k).

  Columns are orthonormal; directions with a singular value below
  ``rel_tol`` times the largest carry no public signal and are zeroed (their
  coefficient is then 0 for every example, and their noise maps to 0), so
  ||V c|| <= ||c|| always.
  """
  rank = min(rank, *flat_grads.shape)
  _, s, vt = jnp.linalg.svd(flat_grads, full_matrices=False)
  keep = s[:rank] > rel_tol * jnp.maximum(s[0], 1e-30)
  return vt[:rank].T * keep[None, :].astype(vt.dtype)


def projector(basis: Optional[jax.Array]
              ) -> Optional[per_example.PerExampleTransform]:
  """g -> V^T flatten(g): the per-example map applied BEFORE clipping."""
  if basis is None:
    return None
  return lambda g: flatten(g) @ basis


def adamix(config: settings_lib.StepConfig, *, key: jax.Array,
           rank: int = 0, refresh_every: int = 10,
           anchor: Optional[PyTree] = None
           ) -> optax.GradientTransformationExtraArgs:
  """The AdaMix private gradient for any model (see the module doc).

  Args:
    config: sigma, q*N, the threshold rule, mixing, pull (``learning_rate``
      must stay 1.0: the chained optimiser sets the step).
    key: the noise key, from the run's secret coins
      (``MechanismCoins.noise_key()``); split every update.
    rank: k > 0 projects private gradients onto the top-k public gradient
      directions; 0: no projection.
    refresh_every: recompute the basis every m updates.
    anchor: w_0, the pull target (needed when ``config.pull > 0``).
  """
  if config.learning_rate != 1.0:
    raise ValueError("adamix(): set the learning rate on the chained optax "
                     "optimiser and leave StepConfig.learning_rate at 1.0.")
  if rank < 0 or refresh_every <= 0:
    raise ValueError(f"need rank >= 0 and refresh_every > 0, got {rank}, "
                     f"{refresh_every}.")
  if config.pull > 0 and anchor is None:
    raise ValueError("config.pull > 0 needs the anchor w_0 (anchor=...).")
  structure, numbers = config.structure(), config.numbers()

  def init_fn(params):
    size = flatten(params).shape[0]
    basis = (jnp.zeros((size, min(rank, size)), jnp.float32) if rank
             else None)
    zero = jnp.zeros((), jnp.int32)
    return AdaMixState(basis=basis, threshold=numbers.clip_norm,
                       num_clipped=zero, batch_size=zero, num_nonfinite=zero,
                       count=zero, noise_key=key)

  def update_fn(updates: Union[PyTree, ContributionsFn], state: AdaMixState,
                params: PyTree = None, *, mask: jax.Array,
                public_grads: Optional[PyTree] = None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("adamix().update needs params (the current model).")
    flat_params, unravel = ravel_pytree(params)
    flat_public = None
    if public_grads is not None:
      flat_public = jax.vmap(flatten)(public_grads)
      if flat_public.shape[0] == 0:
        flat_public = None
    basis = state.basis
    if basis is not None and flat_public is not None:
      basis = jax.lax.cond(state.count % refresh_every == 0,
                           lambda: gradient_basis(flat_public, rank),
                           lambda: state.basis)
    use_basis = basis if flat_public is not None else None
    public_norms = None
    if flat_public is not None:
      coords = flat_public if use_basis is None else flat_public @ use_basis
      public_norms = jnp.linalg.norm(coords, axis=1)
    threshold = threshold_lib.public_threshold(
        public_norms, adaptive=structure.adaptive_threshold,
        quantile=numbers.threshold_quantile, clip_norm=numbers.clip_norm)

    if callable(updates):
      contributions = updates(use_basis)
    else:
      contributions = per_example.PerExampleGradients.create(
          updates, projector(use_basis))
      mask = privacy_transform.check_mask(mask,
                                          contributions.row_norms.shape[0])
    noise_key, next_key = jax.random.split(state.noise_key)
    noisy, stats = mechanism.privatize(
        contributions, threshold, mask, noise_key,
        noise_multiplier=numbers.noise_multiplier,
        normalizer=numbers.expected_batch_size)
    flat_grad = flatten(noisy) if use_basis is None else use_basis @ noisy
    private_weight, public_weight = rules.mixing_weights(
        numbers.public_weight, 0 if flat_public is None else 1)
    flat_grad = private_weight * flat_grad
    if flat_public is not None:
      flat_grad += public_weight * jnp.mean(flat_public, axis=0)
    _, step_size = rules.step_sizes(1.0, 1.0, threshold,
                                    structure.normalize_by_threshold)
    flat_grad = step_size * flat_grad
    if anchor is not None:
      flat_grad += numbers.pull * (flat_params - flatten(anchor))
    new_state = AdaMixState(
        basis=state.basis if basis is None else basis, threshold=threshold,
        num_clipped=stats.num_clipped, batch_size=stats.num_examples,
        num_nonfinite=state.num_nonfinite + stats.num_nonfinite,
        count=state.count + 1, noise_key=next_key)
    return unravel(flat_grad.astype(flat_params.dtype)), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def find_state(opt_state: PyTree) -> AdaMixState:
  """The ``AdaMixState`` inside an optax chain's state."""
  found = [s for s in jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda s: isinstance(s, AdaMixState))
           if isinstance(s, AdaMixState)]
  if len(found) != 1:
    raise ValueError(f"expected one adamix() state in the optimiser state, "
                     f"found {len(found)}: chain adamix(...) with an "
                     "optimiser (optax.chain(adamix(...), optax.sgd(lr))).")
  return found[0]
