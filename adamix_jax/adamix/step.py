"""The private step on a linear head: DP-SGD and AdaMix from one function.

One step, given parameters W~_t (augmented, (d+1, c)), the public set and a
Poisson-sampled private batch:

1. public residuals at W~_t give the clipping threshold C_t (a quantile of
   the public per-example gradient norms, measured in the subspace), or
   C_t = the fixed ``clip_norm`` (DP-SGD, or no public examples);
2. each private gradient is mapped to subspace coefficients, clipped to C_t,
   summed; N(0, (sigma C_t)^2) is added ONCE to that sum in coefficient space;
   the result is mapped back and divided by the expected batch size q*N;
3. the update mixes in the exact public gradient (weight ``public_weight``)
   and pulls towards the anchor W~_0 (weight ``pull``); with
   ``normalize_by_threshold`` the gradient step is lr / C_t, so that a
   shrinking threshold does not silently shrink the learning rate.

Everything but the private batch is public or post-processing of earlier
noisy releases (DESIGN.md invariant 3), and sigma is fixed by the accountant,
independent of C_t. Two implementations of step 2 are kept: ``closed_form``
(never forms a per-example (d+1)*c gradient) and ``vmap`` (explicit
per-example gradients via jax.vmap(jax.grad), optionally in microbatches of
``microbatch_size`` so peak memory is microbatch x params); tests hold them
equal.

Speed (closed form, ``gradients`` subspace): the public residuals at W~_t are
computed once per step and shared by the threshold and the public gradient;
with a cached public Gram (``PublicData.gram``) the public kernel is not
recomputed, and the noisy private gradient and the public gradient are mapped
back in ONE X~p^T product. ``train_step(..., private_kernel=...)`` takes the
cached private-public kernel X~ X~p^T (N, n) of all private examples (features
never change; the step gathers the batch's rows), which removes the
B x n x (d+1) product. Both caches are functions of the data alone.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax

from adamix_jax.adamix import subspace as subspace_lib
from adamix_jax.models import linear
from adamix_jax.privacy import clipping
from adamix_jax.privacy import noise
from adamix_jax.privacy import per_example

PATHS = ("closed_form", "vmap")
MIN_THRESHOLD = 1e-6


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static hyperparameters of the private linear-head step.

  Attributes:
    noise_multiplier: sigma, calibrated by the accountant before training.
    expected_batch_size: q * N, the fixed normaliser of the noisy sum.
    learning_rate: step size (in units of the threshold when normalised).
    clip_norm: fixed threshold; used when ``adaptive_threshold`` is False or
      there are no public examples.
    adaptive_threshold: C_t from the public per-example gradient norms.
    threshold_quantile: which quantile of those norms (1.0 = max).
    normalize_by_threshold: step lr / C_t instead of lr.
    public_weight: alpha in (1 - alpha) g_private + alpha g_public.
    pull: lambda in the extra step term lambda * (W - W_0).
    path: "closed_form" or "vmap".
    microbatch_size: vmap path only: examples per vmap (the batch is padded
      with masked rows to a multiple); None: the whole batch at once.
  """

  noise_multiplier: float
  expected_batch_size: float
  learning_rate: float
  clip_norm: float = 1.0
  adaptive_threshold: bool = False
  threshold_quantile: float = 0.5
  normalize_by_threshold: bool = True
  public_weight: float = 0.0
  pull: float = 0.0
  path: str = "closed_form"
  microbatch_size: Optional[int] = None

  def __post_init__(self):
    check_private_step_settings(self)
    if self.pull < 0:
      raise ValueError(f"pull must be >= 0, got {self.pull}.")
    if self.path not in PATHS:
      raise ValueError(f"path must be one of {PATHS}, got {self.path!r}.")


def check_private_step_settings(config) -> None:
  """The settings every private step config shares (this module's
  StepConfig, ``train.full_model.FullModelConfig``): clear errors."""
  if not config.noise_multiplier >= 0:
    raise ValueError(f"noise_multiplier must be >= 0, got "
                     f"{config.noise_multiplier}.")
  if not config.expected_batch_size > 0:
    raise ValueError("expected_batch_size (q*N) must be > 0.")
  if not config.clip_norm > 0:
    raise ValueError(f"clip_norm must be > 0, got {config.clip_norm}.")
  if not 0.0 <= config.threshold_quantile <= 1.0:
    raise ValueError(f"threshold_quantile must be in [0, 1], got "
                     f"{config.threshold_quantile}.")
  if not 0.0 <= config.public_weight <= 1.0:
    raise ValueError(f"public_weight must be in [0, 1], got "
                     f"{config.public_weight}.")
  if config.microbatch_size is not None and config.microbatch_size <= 0:
    raise ValueError(f"microbatch_size must be > 0 or None, got "
                     f"{config.microbatch_size}.")


@flax.struct.dataclass
class PublicData:
  """The public set on device (augmented features); may be empty.

  ``gram``: optional cached X~p X~p^T (see ``make_public_data``). When it is
  set, a ``gradients`` subspace passed to the step with this PublicData must
  have been built from the same ``x_aug`` (``private_linear.build_subspace``
  does): the step then uses ``gram`` as the public-public kernel and maps the
  private and public gradients back in one product.
  """

  x_aug: jax.Array  # (n, d+1)
  y: jax.Array  # (n,)
  gram: Optional[jax.Array] = None  # (n, n) = x_aug @ x_aug.T


def make_public_data(x_aug: jax.Array, y: jax.Array,
                     cache_gram: bool = True) -> PublicData:
  """PublicData with its feature Gram cached (public data only)."""
  gram = None
  if cache_gram and y.shape[0] > 0:
    gram = subspace_lib.public_feature_gram(x_aug)
  return PublicData(x_aug=x_aug, y=y, gram=gram)


@flax.struct.dataclass
class TrainState:
  matrix: jax.Array  # W~_t, (d+1, c)
  anchor: jax.Array  # W~_0, the pull target
  average: jax.Array  # running mean of iterates (tail averaging)
  averaged_steps: jax.Array
  key: jax.Array
  step: jax.Array


class StepMetrics(NamedTuple):
  threshold: jax.Array
  batch_size: jax.Array
  num_clipped: jax.Array
  num_nonfinite: jax.Array


def init_state(anchor_params: dict, key: jax.Array,
               init_params: Optional[dict] = None) -> TrainState:
  anchor = linear.stack(anchor_params)
  # A copy: the state is donated to the jitted step, anchor and start too.
  start = jnp.array(anchor if init_params is None else linear.stack(init_params),
                    copy=True)
  return TrainState(matrix=start, anchor=anchor, average=jnp.zeros_like(start),
                    averaged_steps=jnp.zeros((), jnp.int32), key=key,
                    step=jnp.zeros((), jnp.int32))


def _public_kernel(subspace: subspace_lib.Subspace,
                   public: PublicData) -> Optional[jax.Array]:
  """The cached public-public kernel, if the subspace can use it."""
  if subspace.kind == "gradients" and public.gram is not None:
    return public.gram
  return None


def public_threshold(config: StepConfig, subspace: subspace_lib.Subspace,
                     matrix: jax.Array, public: PublicData,
                     residuals: Optional[jax.Array] = None) -> jax.Array:
  """C_t: a quantile of public gradient norms in the subspace, or clip_norm.

  ``residuals``: the public residuals at ``matrix`` if already computed.
  """
  if not config.adaptive_threshold or public.y.shape[0] == 0:
    return jnp.float32(config.clip_norm)
  e = residuals
  if e is None:
    e = linear.residuals(matrix, public.x_aug, public.y)
  norms = subspace_lib.closed_form_norms(subspace, public.x_aug, e,
                                         _public_kernel(subspace, public))
  return jnp.maximum(jnp.quantile(norms, config.threshold_quantile),
                     MIN_THRESHOLD)


def public_gradient(matrix: jax.Array, public: PublicData,
                    residuals: Optional[jax.Array] = None) -> jax.Array:
  """Exact mean gradient of the public cross-entropy: X~p^T Ep / n."""
  if public.y.shape[0] == 0:
    return jnp.zeros_like(matrix)
  e = residuals
  if e is None:
    e = linear.residuals(matrix, public.x_aug, public.y)
  return public.x_aug.T @ e / public.y.shape[0]


def _matrix_example_loss(matrix, example):
  x_aug, y = example
  return optax.softmax_cross_entropy_with_integer_labels(x_aug @ matrix, y)


def _pad_to_multiple(size: int, x_aug, y, mask):
  pad = (-x_aug.shape[0]) % size
  if not pad:
    return x_aug, y, mask
  return (jnp.concatenate([x_aug, jnp.zeros((pad,) + x_aug.shape[1:],
                                            x_aug.dtype)]),
          jnp.concatenate([y, jnp.zeros((pad,), y.dtype)]),
          jnp.concatenate([mask, jnp.zeros((pad,), mask.dtype)]))


def _gradient_clipped_sum(subspace, x_aug, e, kernel, mask, threshold):
  """``gradients`` kind: one (B, k) coefficient matrix serves norms and sum."""
  coefficients = subspace_lib.gradient_coefficients(subspace, x_aug, e, kernel)
  norms = jnp.linalg.norm(coefficients, axis=1)
  # Non-finite rows (a NaN feature or kernel row) are zeroed and counted.
  finite = jnp.isfinite(norms)
  coefficients = jnp.where(finite[:, None], coefficients, 0.0)
  scales, stats = clipping.clip_scales(norms, threshold, mask)
  return scales @ coefficients, stats


def clipped_coefficient_sum(config: StepConfig,
                            subspace: subspace_lib.Subspace,
                            matrix: jax.Array, x_aug: jax.Array, y: jax.Array,
                            mask: jax.Array, threshold: jax.Array,
                            kernel: Optional[jax.Array] = None
                            ) -> tuple[jax.Array, clipping.ClipStats]:
  """sum_i clip_{C_t}(coefficients of G_i): sensitivity C_t.

  ``kernel``: optional x_aug @ subspace.public_x.T (B, n), precomputed
  (closed form, ``gradients`` subspace; ignored otherwise).
  """
  if config.path == "closed_form":
    e = linear.residuals(matrix, x_aug, y)
    if subspace.kind == "gradients":
      return _gradient_clipped_sum(subspace, x_aug, e, kernel, mask, threshold)
    norms = subspace_lib.closed_form_norms(subspace, x_aug, e)
    # Non-finite rows: residuals of a NaN feature are NaN; zero them first.
    # (x_aug, B x (d+1), is only rewritten when some row needs it.)
    finite = jnp.isfinite(norms)
    e = jnp.where(finite[:, None], e, 0.0)
    scales, stats = clipping.clip_scales(norms, threshold, mask)
    weighted_sum = lambda x: subspace_lib.closed_form_weighted_sum(
        subspace, x, e, scales)
    total = jax.lax.cond(
        jnp.all(finite), weighted_sum,
        lambda x: weighted_sum(jnp.where(finite[:, None], x, 0.0)), x_aug)
    return total, stats
  transform = None
  if subspace.kind != "none":
    transform = lambda g: subspace_lib.coefficients_of(subspace, g)
  if config.microbatch_size is not None:
    x_aug, y, mask = _pad_to_multiple(config.microbatch_size, x_aug, y, mask)
  return per_example.clipped_grad_sum(
      _matrix_example_loss, matrix, (x_aug, y), threshold, mask,
      microbatch_size=config.microbatch_size, pre_clip_transform=transform)


def private_gradient(config: StepConfig, subspace: subspace_lib.Subspace,
                     matrix: jax.Array, x_aug: jax.Array, y: jax.Array,
                     mask: jax.Array, threshold: jax.Array, key: jax.Array,
                     kernel: Optional[jax.Array] = None
                     ) -> tuple[jax.Array, clipping.ClipStats]:
  """The released private gradient: map_back(clipped sum + noise) / (q N)."""
  noisy, stats = noisy_coefficient_sum(config, subspace, matrix, x_aug, y,
                                       mask, threshold, key, kernel)
  return subspace_lib.map_back(subspace, noisy) / config.expected_batch_size, stats


def noisy_coefficient_sum(config: StepConfig, subspace: subspace_lib.Subspace,
                          matrix: jax.Array, x_aug: jax.Array, y: jax.Array,
                          mask: jax.Array, threshold: jax.Array, key: jax.Array,
                          kernel: Optional[jax.Array] = None
                          ) -> tuple[jax.Array, clipping.ClipStats]:
  """The released coefficients: clipped sum + N(0, (sigma C_t)^2), once."""
  total, stats = clipped_coefficient_sum(config, subspace, matrix, x_aug, y,
                                         mask, threshold, kernel)
  noisy = noise.add_gaussian_noise(total, key,
                                   config.noise_multiplier * threshold)
  return noisy, stats


def _step_sizes(config: StepConfig, lr_scale,
                threshold: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(learning rate, step size of the gradient): lr / C_t when normalised,
  so that a shrinking threshold does not shrink the step."""
  learning_rate = config.learning_rate * lr_scale
  if config.normalize_by_threshold:
    return learning_rate, learning_rate / threshold
  return learning_rate, learning_rate


def train_step(config: StepConfig, state: TrainState,
               subspace: subspace_lib.Subspace, public: PublicData,
               private_x_aug: jax.Array, private_y: jax.Array,
               indices: jax.Array, mask: jax.Array,
               average_from: jax.Array, lr_scale: jax.Array = 1.0,
               private_kernel: Optional[jax.Array] = None
               ) -> tuple[TrainState, StepMetrics]:
  """One private step on the batch ``indices`` (padded; ``mask`` marks real).

  ``lr_scale`` multiplies the learning rate (the host's schedule).
  ``private_kernel``: optional cached private_x_aug @ subspace.public_x.T
  (N, n) for a ``gradients`` subspace (closed form); rows ``indices`` are
  used instead of recomputing them. Data-only, so it changes no privacy
  property; the result equals the default up to float rounding.
  """
  x_aug, y = private_x_aug[indices], private_y[indices]
  kernel = None
  if (private_kernel is not None and subspace.kind == "gradients" and
      config.path == "closed_form"):
    kernel = private_kernel[indices]
  num_public = public.y.shape[0]
  needs_public = num_public > 0 and (config.adaptive_threshold or
                                     config.public_weight > 0)
  # Public residuals at W~_t: computed once, shared by C_t and g_public.
  e_public = (linear.residuals(state.matrix, public.x_aug, public.y)
              if needs_public else None)
  threshold = public_threshold(config, subspace, state.matrix, public,
                               e_public)
  noise_key, next_key = jax.random.split(state.key)
  noisy, stats = noisy_coefficient_sum(config, subspace, state.matrix, x_aug,
                                       y, mask, threshold, noise_key, kernel)
  private_scale = (1.0 - config.public_weight) / config.expected_batch_size
  if (subspace.kind == "gradients" and public.gram is not None and
      num_public > 0):
    # Same public set (PublicData.gram contract): one X~p^T product for both.
    factor = private_scale * subspace_lib.map_back_weights(subspace, noisy)
    if config.public_weight > 0:
      factor += (config.public_weight / num_public) * e_public
    direction = public.x_aug.T @ factor
  else:
    direction = private_scale * subspace_lib.map_back(subspace, noisy)
    if config.public_weight > 0:
      direction += config.public_weight * public_gradient(
          state.matrix, public, e_public)
  learning_rate, step_size = _step_sizes(config, lr_scale, threshold)
  matrix = state.matrix - step_size * direction
  if config.pull > 0:
    matrix -= learning_rate * config.pull * (state.matrix - state.anchor)
  in_tail = state.step >= average_from
  averaged = state.averaged_steps + in_tail.astype(jnp.int32)
  average = jnp.where(
      in_tail, state.average + (matrix - state.average) /
      jnp.maximum(averaged, 1).astype(matrix.dtype), state.average)
  new_state = TrainState(matrix=matrix, anchor=state.anchor, average=average,
                         averaged_steps=averaged, key=next_key,
                         step=state.step + 1)
  return new_state, StepMetrics(threshold=threshold,
                                batch_size=stats.num_examples,
                                num_clipped=stats.num_clipped,
                                num_nonfinite=stats.num_nonfinite)


# --- the dual form: AdaMix with a public-gradient subspace -------------------
#
# With a ``gradients`` subspace every update lies in the row space of the
# public features: the noisy private gradient is X~p^T (w * Ep_sub), the
# public gradient X~p^T Ep / n, and the pull shrinks W~ - W~_0. So
#
#   W~_t = W~_0 + a_t D + X~p^T S_t,   D = W~_start - W~_0,
#
# with S_t (n, c) and a scalar a_t. Logits never need W~_t: the private
# batch's are L0[idx] + a_t LD[idx] + K[idx] S_t and the public ones
# Z0 + a_t ZD + (X~p X~p^T) S_t, with K = X~ X~p^T, L0 = X~ W~_0,
# LD = X~ D (per private example) and Z0, ZD (public) computed once: they
# are functions of the features and of the public start, nothing else. The
# step is the same function of the same inputs as ``train_step`` (tests hold
# the two equal); it skips the two (d+1) x c sized products per step (the
# private forward pass through d and the map back).


@dataclasses.dataclass(frozen=True)
class BasisRefresh:
  """How ``dual_train_step`` rebuilds the ``gradients`` subspace in-step."""

  rank: int
  method: str = "iterative"
  iterations: int = 2
  oversample: int = 10


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


def init_dual(anchor_params: dict, public: PublicData,
              private_x_aug: jax.Array, key: jax.Array,
              init_params: Optional[dict] = None,
              private_kernel: Optional[jax.Array] = None
              ) -> tuple[DualState, DualCache]:
  """The dual state at W~_start (default W~_0) and its constant caches.

  ``private_kernel``: X~ X~p^T if already computed (e.g. in chunks).
  """
  if public.y.shape[0] == 0:
    raise ValueError("the dual form needs public examples.")
  anchor = linear.stack(anchor_params)
  start = anchor if init_params is None else linear.stack(init_params)
  offset = start - anchor
  if private_kernel is None:
    private_kernel = private_x_aug @ public.x_aug.T
  cache = DualCache(
      anchor=anchor, offset=offset, private_kernel=private_kernel,
      private_anchor_logits=private_x_aug @ anchor,
      private_offset_logits=private_x_aug @ offset,
      public_anchor_logits=public.x_aug @ anchor,
      public_offset_logits=public.x_aug @ offset)
  coef = jnp.zeros((public.y.shape[0], anchor.shape[1]), anchor.dtype)
  state = DualState(coef=coef, decay=jnp.ones((), anchor.dtype),
                    average_coef=jnp.zeros_like(coef),
                    average_decay=jnp.zeros((), anchor.dtype),
                    average_weight=jnp.zeros((), anchor.dtype),
                    averaged_steps=jnp.zeros((), jnp.int32), key=key,
                    step=jnp.zeros((), jnp.int32))
  return state, cache


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


def dual_public_residuals(state: DualState, cache: DualCache,
                          public: PublicData) -> jax.Array:
  """Public residuals at W~_t, from (X~p X~p^T) S_t: (n, c)."""
  gram = public.gram
  if gram is None:
    gram = subspace_lib.public_feature_gram(public.x_aug)
  logits = (cache.public_anchor_logits +
            state.decay * cache.public_offset_logits + gram @ state.coef)
  return _softmax_residuals(logits, public.y)


def dual_train_step(config: StepConfig, state: DualState,
                    subspace: subspace_lib.Subspace, public: PublicData,
                    cache: DualCache, private_y: jax.Array,
                    indices: jax.Array, mask: jax.Array,
                    average_from: jax.Array, lr_scale: jax.Array = 1.0,
                    refresh: Optional[BasisRefresh] = None
                    ) -> tuple[DualState, StepMetrics, subspace_lib.Subspace]:
  """``train_step`` for a ``gradients`` subspace, in the dual form.

  Same update, same privacy (the clipped coefficients, C_t and the noise are
  computed exactly as in the closed form); needs ``public.gram`` and a
  ``gradients`` subspace built from ``public``. With ``refresh`` (static),
  the subspace is first rebuilt at W~_t from the public residuals the step
  computes anyway (warm-started from ``subspace``), and returned.
  """
  if config.path != "closed_form":
    raise ValueError("the dual form is a closed-form path; got path "
                     f"{config.path!r}.")
  if subspace.kind != "gradients" or public.gram is None:
    raise ValueError("the dual form needs a 'gradients' subspace and "
                     "PublicData.gram (step.make_public_data).")
  num_public = public.y.shape[0]
  e_public = dual_public_residuals(state, cache, public)
  if refresh is not None:
    subspace = subspace_lib.from_public_gradients(
        public.x_aug, e_public, refresh.rank, public_gram=public.gram,
        method=refresh.method, previous=subspace,
        iterations=refresh.iterations, oversample=refresh.oversample)
  threshold = public_threshold(config, subspace, None, public, e_public)
  rows = cache.private_kernel[indices]
  logits = (cache.private_anchor_logits[indices] +
            state.decay * cache.private_offset_logits[indices] +
            rows @ state.coef)
  e_private = _softmax_residuals(logits, private_y[indices])
  noise_key, next_key = jax.random.split(state.key)
  total, stats = _gradient_clipped_sum(subspace, None, e_private, rows, mask,
                                       threshold)
  noisy = noise.add_gaussian_noise(total, noise_key,
                                   config.noise_multiplier * threshold)
  # direction = X~p^T factor (the closed form's single map-back product).
  private_scale = (1.0 - config.public_weight) / config.expected_batch_size
  factor = private_scale * subspace_lib.map_back_weights(subspace, noisy)
  if config.public_weight > 0:
    factor += (config.public_weight / num_public) * e_public
  learning_rate, step_size = _step_sizes(config, lr_scale, threshold)
  shrink = 1.0 - learning_rate * config.pull
  coef = shrink * state.coef - step_size * factor
  decay = shrink * state.decay
  in_tail = state.step >= average_from
  averaged = state.averaged_steps + in_tail.astype(jnp.int32)
  count = jnp.maximum(averaged, 1).astype(coef.dtype)

  def running_mean(average, value):
    return jnp.where(in_tail, average + (value - average) / count, average)

  new_state = DualState(
      coef=coef, decay=decay,
      average_coef=running_mean(state.average_coef, coef),
      average_decay=running_mean(state.average_decay, decay),
      average_weight=running_mean(state.average_weight, 1.0),
      averaged_steps=averaged, key=next_key, step=state.step + 1)
  return new_state, StepMetrics(threshold=threshold,
                                batch_size=stats.num_examples,
                                num_clipped=stats.num_clipped,
                                num_nonfinite=stats.num_nonfinite), subspace
