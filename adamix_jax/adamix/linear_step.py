"""The private step on a linear head: DP-SGD and AdaMix from one function.

One step, given parameters W~_t (augmented, (d+1, c)), the public set and a
Poisson-sampled private batch:

1. public residuals at W~_t give the threshold C_t (``threshold``: a
   quantile of the public per-example gradient norms in the subspace, or
   the fixed clip norm) and, every m steps, a refreshed "gradients"
   subspace (public data only);
2. the private batch's contributions (closed-form or vmap backend, in the
   subspace) go through ``privacy.mechanism.privatize``: clipped to C_t,
   summed, N(0, (sigma C_t)^2) added once, divided by q*N;
3. the released coefficients are mapped back, mixed with the exact public
   gradient, and the step lr / C_t is taken; the pull towards W~_0 and the
   tail average follow (``rules``).

Two representations of W~_t run the same step (tests hold them equal):

* ``matrix``: the state is W~_t itself;
* ``dual`` (a "gradients" subspace only): every update lies in the row
  space of the public features, so W~_t = W~_0 + a_t D + X~p^T S_t with
  D = W~_start - W~_0, S_t (n, c) and a scalar a_t. Logits never need W~_t:
  the private batch's are L0[idx] + a_t LD[idx] + K[idx] S_t with
  K = X~ X~p^T, L0 = X~ W~_0, LD = X~ D computed once (features and the
  public start only), which skips the two (d+1) x c sized products a step.

Everything but the private batch is public or post-processing of earlier
noisy releases (invariant 3). The numbers of the step (sigma, q*N, lr, ...)
are traced data (``settings.StepNumbers``): one compilation serves every
epsilon.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax

from adamix_jax.adamix import rules
from adamix_jax.adamix import settings as settings_lib
from adamix_jax.adamix import subspace as subspace_lib
from adamix_jax.adamix import threshold as threshold_lib
from adamix_jax.models import linear
from adamix_jax.privacy import mechanism
from adamix_jax.privacy import per_example


@flax.struct.dataclass
class PublicData:
  """The public set on device (augmented features); may be empty.

  ``gram``: optional cached X~p X~p^T (see ``make_public_data``). When it is
  set, a ``gradients`` subspace used with this PublicData must have been
  built from the same ``x_aug``: the step then uses ``gram`` as the
  public-public kernel and maps the private and public gradients back in one
  product.
  """

  x_aug: jax.Array  # (n, d+1)
  y: jax.Array  # (n,)
  gram: Optional[jax.Array] = None  # (n, n) = x_aug @ x_aug.T
  # Fixed logits added to x_aug @ W (the frozen public model's, when the
  # trained head is a correction in a public feature map): (n, c) or None.
  base_logits: Optional[jax.Array] = None

  @property
  def size(self) -> int:
    return self.y.shape[0]


def make_public_data(x_aug: jax.Array, y: jax.Array,
                     cache_gram: bool = True,
                     base_logits: Optional[jax.Array] = None) -> PublicData:
  """PublicData with its feature Gram cached (public data only)."""
  gram = None
  if cache_gram and y.shape[0] > 0:
    gram = subspace_lib.public_feature_gram(x_aug)
  return PublicData(x_aug=x_aug, y=y, gram=gram, base_logits=base_logits)


@flax.struct.dataclass
class PrivateData:
  """The private set on device: the step gathers its batch rows here.

  ``kernel``: optional cached X~ X~p^T (N, n) for a "gradients" subspace
  (features only; the step reads back only the sampled rows).
  """

  x_aug: jax.Array  # (N, d+1)
  y: jax.Array  # (N,)
  kernel: Optional[jax.Array] = None
  base_logits: Optional[jax.Array] = None  # (N, c), see PublicData


class StepMetrics(NamedTuple):
  threshold: jax.Array
  batch_size: jax.Array
  num_clipped: jax.Array
  num_nonfinite: jax.Array
  # Audit runs only (``tap``): the released auditor coordinates.
  canary_release: Optional[jax.Array] = None


# --- the two representations ---------------------------------------------------


@flax.struct.dataclass
class MatrixState:
  """The matrix representation: W~_t and its tail average."""

  matrix: jax.Array  # W~_t, (d+1, c)
  anchor: jax.Array  # W~_0, the pull target
  average: jax.Array  # running mean of the tail iterates
  averaged_steps: jax.Array
  key: jax.Array  # the noise key (from the run's secret coins)
  step: jax.Array


def _matrix(params) -> jax.Array:
  return linear.stack(params) if isinstance(params, dict) else params


def init_matrix_state(anchor_params, key: jax.Array,
                      init_params=None) -> MatrixState:
  """The matrix state at ``init_params`` (default the anchor); each is a
  {"kernel", "bias"} dict or an augmented (D, c) matrix."""
  anchor = _matrix(anchor_params)
  # A copy: the state is donated to the jitted step, anchor and start too.
  start = jnp.array(anchor if init_params is None else _matrix(init_params),
                    copy=True)
  return MatrixState(matrix=start, anchor=anchor,
                     average=jnp.zeros_like(start),
                     averaged_steps=jnp.zeros((), jnp.int32), key=key,
                     step=jnp.zeros((), jnp.int32))


@flax.struct.dataclass
class DualCache:
  """Constants of the dual form (features and the public start only)."""

  anchor: jax.Array  # W~_0, (d+1, c)
  offset: jax.Array  # D = W~_start - W~_0, (d+1, c)
  private_kernel: jax.Array  # X~ X~p^T, (N, n)
  private_anchor_logits: jax.Array  # X~ W~_0, (N, c)
  private_offset_logits: jax.Array  # X~ D, (N, c)
  public_anchor_logits: jax.Array  # X~p W~_0, (n, c)
  public_offset_logits: jax.Array  # X~p D, (n, c)


@flax.struct.dataclass
class DualState:
  """W~_t = W~_0 + decay D + X~p^T coef; the tail average likewise (with
  ``average_weight`` the weight of W~_0, 0 before the first averaged step)."""

  coef: jax.Array  # S_t, (n, c)
  decay: jax.Array  # a_t
  average_coef: jax.Array
  average_decay: jax.Array
  average_weight: jax.Array
  averaged_steps: jax.Array
  key: jax.Array
  step: jax.Array


def dual_cache(anchor_params: dict, public: PublicData,
               private_x_aug: jax.Array,
               init_params: Optional[dict] = None,
               private_kernel: Optional[jax.Array] = None) -> DualCache:
  """The dual form's constants: functions of the features and the public
  start W~_start (default W~_0) only. ``private_kernel``: X~ X~p^T if
  already computed (e.g. in chunks)."""
  if public.size == 0:
    raise ValueError("the dual form needs public examples.")
  anchor = linear.stack(anchor_params)
  start = anchor if init_params is None else linear.stack(init_params)
  offset = start - anchor
  if private_kernel is None:
    private_kernel = private_x_aug @ public.x_aug.T
  return DualCache(
      anchor=anchor, offset=offset, private_kernel=private_kernel,
      private_anchor_logits=private_x_aug @ anchor,
      private_offset_logits=private_x_aug @ offset,
      public_anchor_logits=public.x_aug @ anchor,
      public_offset_logits=public.x_aug @ offset)


def init_dual_state(cache: DualCache, key: jax.Array) -> DualState:
  """The dual state at W~_start: S = 0, a = 1."""
  num_public = cache.public_anchor_logits.shape[0]
  coef = jnp.zeros((num_public, cache.anchor.shape[1]), cache.anchor.dtype)
  return DualState(coef=coef, decay=jnp.ones((), coef.dtype),
                   average_coef=jnp.zeros_like(coef),
                   average_decay=jnp.zeros((), coef.dtype),
                   average_weight=jnp.zeros((), coef.dtype),
                   averaged_steps=jnp.zeros((), jnp.int32), key=key,
                   step=jnp.zeros((), jnp.int32))


def init_dual(anchor_params: dict, public: PublicData,
              private_x_aug: jax.Array, key: jax.Array,
              init_params: Optional[dict] = None,
              private_kernel: Optional[jax.Array] = None
              ) -> tuple[DualState, DualCache]:
  """(state, cache) of the dual form at W~_start (default W~_0)."""
  cache = dual_cache(anchor_params, public, private_x_aug, init_params,
                     private_kernel)
  return init_dual_state(cache, key), cache


def dual_matrix(state: DualState, cache: DualCache, public: PublicData,
                average: bool = False) -> jax.Array:
  """W~_t (or the tail average) as a (d+1, c) matrix."""
  if average:
    return (state.average_weight * cache.anchor +
            state.average_decay * cache.offset +
            public.x_aug.T @ state.average_coef)
  return cache.anchor + state.decay * cache.offset + public.x_aug.T @ state.coef


def _softmax_residuals(logits: jax.Array, y: jax.Array) -> jax.Array:
  return jax.nn.softmax(logits) - jax.nn.one_hot(y, logits.shape[1])


def _public_gram(public: PublicData) -> jax.Array:
  if public.gram is not None:
    return public.gram
  return subspace_lib.public_feature_gram(public.x_aug)


def _public_residuals(state, cache, public: PublicData) -> jax.Array:
  if cache is None:
    return linear.residuals(state.matrix, public.x_aug, public.y,
                            public.base_logits)
  logits = (cache.public_anchor_logits +
            state.decay * cache.public_offset_logits +
            _public_gram(public) @ state.coef)
  return _softmax_residuals(logits, public.y)


def _matrix_example_loss(matrix, example):
  """Cross-entropy of ONE example (x~, y[, base logits]) at W~."""
  x_aug, y, *base = example
  logits = x_aug @ matrix
  if base:
    logits = logits + base[0]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def matrix_contributions(subspace: subspace_lib.Subspace, matrix: jax.Array,
                         x_aug: jax.Array, y: jax.Array,
                         flags: settings_lib.PerformanceFlags,
                         kernel: Optional[jax.Array] = None,
                         base_logits: Optional[jax.Array] = None):
  """A batch's contributions at W~ (the mechanism's backend): closed form
  (``kernel``: the batch's cached rows of X~ X~p^T, "gradients" only) or
  vmap per-example gradients projected onto the subspace. ``base_logits``:
  the batch's fixed logits added to x~ W~ (see PublicData)."""
  if flags.path == "closed_form":
    if subspace.kind != "gradients":
      kernel = None
    return subspace_lib.closed_form_contributions(
        subspace, x_aug, linear.residuals(matrix, x_aug, y, base_logits),
        kernel)
  transform = None
  if subspace.kind != "none":
    transform = lambda g: subspace_lib.coefficients_of(subspace, g)
  if base_logits is None:
    base_logits = jnp.zeros((y.shape[0], matrix.shape[1]), matrix.dtype)
  return per_example.vmap_contributions(
      _matrix_example_loss, matrix, (x_aug, y, base_logits), transform,
      microbatch_size=flags.microbatch_size)


def dual_contributions(subspace: subspace_lib.Subspace, state: DualState,
                       cache: DualCache, y: jax.Array, indices: jax.Array):
  """The batch's contributions in the dual form: kernel rows and cached
  logits replace the features (same coefficients as the matrix form)."""
  rows = cache.private_kernel[indices]
  logits = (cache.private_anchor_logits[indices] +
            state.decay * cache.private_offset_logits[indices] +
            rows @ state.coef)
  return subspace_lib.closed_form_contributions(
      subspace, None, _softmax_residuals(logits, y), rows)


def _private_contributions(state, cache, subspace, private: PrivateData,
                           indices, flags: settings_lib.PerformanceFlags):
  y = private.y[indices]
  if cache is not None:
    return dual_contributions(subspace, state, cache, y, indices)
  kernel = None if private.kernel is None else private.kernel[indices]
  base = None if private.base_logits is None else private.base_logits[indices]
  return matrix_contributions(subspace, state.matrix, private.x_aug[indices],
                              y, flags, kernel, base)


def _refreshed(subspace, public: PublicData, e_public, refresh):
  """The "gradients" subspace rebuilt at W~_t from the public residuals the
  step computes anyway (warm-started from ``subspace``)."""
  return subspace_lib.from_public_gradients(
      public.x_aug, e_public, refresh.rank, public_gram=public.gram,
      method=refresh.method, previous=subspace,
      iterations=refresh.iterations, oversample=refresh.oversample)


def private_step(structure: settings_lib.StepStructure,
                 flags: settings_lib.PerformanceFlags,
                 refresh: Optional[settings_lib.SubspaceSpec],
                 numbers: settings_lib.StepNumbers, state,
                 subspace: subspace_lib.Subspace, public: PublicData,
                 private: PrivateData, indices: jax.Array, mask: jax.Array,
                 average_from: jax.Array, lr_schedule: jax.Array,
                 cache: Optional[DualCache] = None, tap=None):
  """One private step on the batch ``indices`` (padded; ``mask`` marks real).

  The static arguments are ``structure``, ``flags`` and ``refresh`` (the
  subspace spec when the "gradients" subspace is rebuilt in this step, else
  None); ``cache`` selects the dual representation (None: matrix).
  ``lr_schedule``: the run's learning-rate multipliers, read at
  ``state.step`` on device (so a step ships no scalar, and a resumed state
  reads the right entry); past its end the last entry holds, so a constant
  schedule is the (1,) array [1.] and runs of every T share one compiled
  step. ``tap``: privacy audits only (``audit.whitebox.CanaryTap``): the
  auditor's canaries join this step's batch in the same ``privatize`` call
  and their released coordinates come back in ``metrics.canary_release``;
  None in every real run.

  Returns:
    (new state, metrics, the subspace used by this step).
  """
  num_public = public.size
  e_public = (_public_residuals(state, cache, public) if num_public else None)
  if refresh is not None and num_public:
    subspace = _refreshed(subspace, public, e_public, refresh)
  public_norms = None
  if num_public and structure.adaptive_threshold:
    kernel = public.gram if subspace.kind == "gradients" else None
    public_norms = subspace_lib.closed_form_norms(subspace, public.x_aug,
                                                  e_public, kernel)
  threshold = threshold_lib.public_threshold(
      public_norms, adaptive=structure.adaptive_threshold,
      quantile=numbers.threshold_quantile, clip_norm=numbers.clip_norm)

  noise_key, next_key = jax.random.split(state.key)
  contributions = _private_contributions(state, cache, subspace, private,
                                         indices, flags)
  canary_release = None
  if tap is not None:
    contributions, mask = tap.attach(contributions, mask)
  noisy_mean, stats = mechanism.privatize(
      contributions, threshold, mask, noise_key,
      noise_multiplier=numbers.noise_multiplier,
      normalizer=numbers.expected_batch_size)
  if tap is not None:
    noisy_mean, canary_release = tap.detach(noisy_mean)

  private_weight, public_weight = rules.mixing_weights(numbers.public_weight,
                                                       num_public)
  learning_rate, step_size = rules.step_sizes(
      numbers.learning_rate,
      lr_schedule[jnp.minimum(state.step, lr_schedule.shape[0] - 1)],
      threshold,
      structure.normalize_by_threshold)
  pull = learning_rate * numbers.pull
  if (subspace.kind == "gradients" and public.gram is not None and
      num_public):
    # Every term is X~p^T (n, c): ONE product maps private and public back.
    factor = private_weight * subspace_lib.map_back_weights(subspace,
                                                            noisy_mean)
    factor += (public_weight / num_public) * e_public
    direction = None
  else:
    factor = None
    direction = private_weight * subspace_lib.map_back(subspace, noisy_mean)
    if num_public:
      direction += public_weight * (public.x_aug.T @ e_public / num_public)

  in_tail = state.step >= average_from
  averaged = state.averaged_steps + in_tail.astype(jnp.int32)
  if cache is None:
    if direction is None:
      direction = public.x_aug.T @ factor
    matrix = state.matrix - step_size * direction
    matrix -= pull * (state.matrix - state.anchor)
    new_state = MatrixState(
        matrix=matrix, anchor=state.anchor,
        average=rules.running_mean(state.average, matrix, averaged, in_tail),
        averaged_steps=averaged, key=next_key, step=state.step + 1)
  else:
    if factor is None:
      raise ValueError("the dual form needs a 'gradients' subspace and "
                       "PublicData.gram (make_public_data).")
    shrink = 1.0 - pull
    coef = shrink * state.coef - step_size * factor
    decay = shrink * state.decay
    new_state = DualState(
        coef=coef, decay=decay,
        average_coef=rules.running_mean(state.average_coef, coef, averaged,
                                        in_tail),
        average_decay=rules.running_mean(state.average_decay, decay,
                                         averaged, in_tail),
        average_weight=rules.running_mean(state.average_weight, 1.0,
                                          averaged, in_tail),
        averaged_steps=averaged, key=next_key, step=state.step + 1)
  metrics = StepMetrics(threshold=threshold, batch_size=stats.num_examples,
                        num_clipped=stats.num_clipped,
                        num_nonfinite=stats.num_nonfinite,
                        canary_release=canary_release)
  return new_state, metrics, subspace


def final_matrix(state, cache: Optional[DualCache], public: PublicData,
                 average: bool) -> jax.Array:
  """The released head W~ (the tail average, or the last iterate)."""
  if cache is not None:
    return dual_matrix(state, cache, public, average=average)
  return state.average if average else state.matrix
