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
per-example gradients via jax.vmap(jax.grad)); tests hold them equal.
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

  def __post_init__(self):
    if self.noise_multiplier < 0:
      raise ValueError(f"noise_multiplier must be >= 0, got "
                       f"{self.noise_multiplier}.")
    if self.expected_batch_size <= 0:
      raise ValueError("expected_batch_size (q*N) must be > 0.")
    if self.clip_norm <= 0:
      raise ValueError(f"clip_norm must be > 0, got {self.clip_norm}.")
    if not 0.0 <= self.threshold_quantile <= 1.0:
      raise ValueError(f"threshold_quantile must be in [0, 1], got "
                       f"{self.threshold_quantile}.")
    if not 0.0 <= self.public_weight <= 1.0:
      raise ValueError(f"public_weight must be in [0, 1], got "
                       f"{self.public_weight}.")
    if self.pull < 0:
      raise ValueError(f"pull must be >= 0, got {self.pull}.")
    if self.path not in PATHS:
      raise ValueError(f"path must be one of {PATHS}, got {self.path!r}.")


@flax.struct.dataclass
class PublicData:
  """The public set on device (augmented features); may be empty."""

  x_aug: jax.Array  # (n, d+1)
  y: jax.Array  # (n,)


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


def public_threshold(config: StepConfig, subspace: subspace_lib.Subspace,
                     matrix: jax.Array, public: PublicData) -> jax.Array:
  """C_t: a quantile of public gradient norms in the subspace, or clip_norm."""
  if not config.adaptive_threshold or public.y.shape[0] == 0:
    return jnp.float32(config.clip_norm)
  e = linear.residuals(matrix, public.x_aug, public.y)
  norms = subspace_lib.closed_form_norms(subspace, public.x_aug, e)
  return jnp.maximum(jnp.quantile(norms, config.threshold_quantile),
                     MIN_THRESHOLD)


def public_gradient(matrix: jax.Array, public: PublicData) -> jax.Array:
  """Exact mean gradient of the public cross-entropy: X~p^T Ep / n."""
  if public.y.shape[0] == 0:
    return jnp.zeros_like(matrix)
  e = linear.residuals(matrix, public.x_aug, public.y)
  return public.x_aug.T @ e / public.y.shape[0]


def _matrix_example_loss(matrix, example):
  x_aug, y = example
  return optax.softmax_cross_entropy_with_integer_labels(x_aug @ matrix, y)


def clipped_coefficient_sum(config: StepConfig,
                            subspace: subspace_lib.Subspace,
                            matrix: jax.Array, x_aug: jax.Array, y: jax.Array,
                            mask: jax.Array, threshold: jax.Array
                            ) -> tuple[jax.Array, clipping.ClipStats]:
  """sum_i clip_{C_t}(coefficients of G_i): sensitivity C_t."""
  if config.path == "closed_form":
    e = linear.residuals(matrix, x_aug, y)
    norms = subspace_lib.closed_form_norms(subspace, x_aug, e)
    # Non-finite rows: residuals of a NaN feature are NaN; zero them first.
    finite = jnp.isfinite(norms)
    e = jnp.where(finite[:, None], e, 0.0)
    x_aug = jnp.where(finite[:, None], x_aug, 0.0)
    scales, stats = clipping.clip_scales(norms, threshold, mask)
    return subspace_lib.closed_form_weighted_sum(subspace, x_aug, e,
                                                 scales), stats
  grads = jax.vmap(jax.grad(_matrix_example_loss),
                   in_axes=(None, 0))(matrix, (x_aug, y))
  coefficients = jax.vmap(lambda g: subspace_lib.coefficients_of(subspace, g))(
      grads)
  return clipping.clipped_sum(coefficients, threshold, mask)


def private_gradient(config: StepConfig, subspace: subspace_lib.Subspace,
                     matrix: jax.Array, x_aug: jax.Array, y: jax.Array,
                     mask: jax.Array, threshold: jax.Array, key: jax.Array
                     ) -> tuple[jax.Array, clipping.ClipStats]:
  """The released private gradient: map_back(clipped sum + noise) / (q N)."""
  total, stats = clipped_coefficient_sum(config, subspace, matrix, x_aug, y,
                                         mask, threshold)
  noisy = noise.add_gaussian_noise(total, key,
                                   config.noise_multiplier * threshold)
  return subspace_lib.map_back(subspace, noisy) / config.expected_batch_size, stats


def train_step(config: StepConfig, state: TrainState,
               subspace: subspace_lib.Subspace, public: PublicData,
               private_x_aug: jax.Array, private_y: jax.Array,
               indices: jax.Array, mask: jax.Array,
               average_from: jax.Array, lr_scale: jax.Array = 1.0
               ) -> tuple[TrainState, StepMetrics]:
  """One private step on the batch ``indices`` (padded; ``mask`` marks real).

  ``lr_scale`` multiplies the learning rate (the host's schedule).
  """
  x_aug, y = private_x_aug[indices], private_y[indices]
  threshold = public_threshold(config, subspace, state.matrix, public)
  noise_key, next_key = jax.random.split(state.key)
  g_private, stats = private_gradient(config, subspace, state.matrix, x_aug, y,
                                      mask, threshold, noise_key)
  direction = (1.0 - config.public_weight) * g_private
  if config.public_weight > 0:
    direction += config.public_weight * public_gradient(state.matrix, public)
  learning_rate = config.learning_rate * lr_scale
  step_size = learning_rate
  if config.normalize_by_threshold:
    step_size = step_size / threshold
  matrix = (state.matrix - step_size * direction -
            learning_rate * config.pull * (state.matrix - state.anchor))
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
