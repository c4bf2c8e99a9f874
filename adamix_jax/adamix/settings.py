"""What a private step is told: its privacy and algorithm settings, its
projection, and performance flags that cannot change the guarantee.

* ``StepConfig``: the numbers that define the released quantity and the
  update (sigma, q*N, the threshold rule, mixing, pull, step size). Frozen
  and validated. Inside a jitted step the numbers are DATA (``numbers()``)
  and only the few booleans are structure (``structure()``), so a sweep over
  epsilon compiles each step once, not once per sigma.
* ``SubspaceSpec``: onto which public subspace private gradients are
  projected before clipping (AdaMix), and how often it is refreshed.
* ``PerformanceFlags``: how the same update is computed (closed form or
  vmap, matrix or dual representation, microbatches, caches, ghost norms).
  Every choice releases the same quantity up to float rounding; tests hold
  the paths equal (tests/test_speed_paths.py, tests/test_ghost_*.py).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.struct
import jax.numpy as jnp

SUBSPACE_KINDS = ("none", "features", "gradients")
GRADIENT_METHODS = ("eigh", "iterative")
PATHS = ("closed_form", "vmap")
REPRESENTATIONS = ("auto", "matrix", "dual")
CLIPPING_METHODS = ("auto", "vmap", "ghost")
PROJECTION_METHODS = ("auto", "vmap", "jvp", "ghost")


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Settings of one private step (DP-SGD or AdaMix, any model).

  Attributes:
    noise_multiplier: sigma, calibrated by the accountant for the whole run.
    expected_batch_size: q * N, the fixed normaliser of the noisy sum.
    learning_rate: the linear head's SGD step (in units of the threshold
      when ``normalize_by_threshold``). Full models: the optax optimiser's
      learning rate is used instead and this must stay 1.0.
    clip_norm: the fixed threshold; used when ``adaptive_threshold`` is
      False or there are no public examples.
    adaptive_threshold: C_t = a quantile of the public per-example gradient
      norms (measured in the projection subspace).
    threshold_quantile: which quantile (1.0 = max).
    normalize_by_threshold: step lr / C_t instead of lr, so that a
      shrinking threshold does not silently shrink the step.
    public_weight: alpha in (1 - alpha) g_private + alpha g_public.
    pull: lambda in the extra step term lambda * (w - w_0).
  """

  noise_multiplier: float
  expected_batch_size: float
  learning_rate: float = 1.0
  clip_norm: float = 1.0
  adaptive_threshold: bool = False
  threshold_quantile: float = 0.5
  normalize_by_threshold: bool = True
  public_weight: float = 0.0
  pull: float = 0.0

  def __post_init__(self):
    # `not x >= 0` also rejects NaN.
    if not self.noise_multiplier >= 0:
      raise ValueError(f"noise_multiplier must be >= 0, got "
                       f"{self.noise_multiplier}.")
    if not self.expected_batch_size > 0:
      raise ValueError("expected_batch_size (q*N) must be > 0, got "
                       f"{self.expected_batch_size}.")
    if not self.learning_rate > 0:
      raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}.")
    if not self.clip_norm > 0:
      raise ValueError(f"clip_norm must be > 0, got {self.clip_norm}.")
    if not 0.0 <= self.threshold_quantile <= 1.0:
      raise ValueError(f"threshold_quantile must be in [0, 1], got "
                       f"{self.threshold_quantile}.")
    if not 0.0 <= self.public_weight <= 1.0:
      raise ValueError(f"public_weight must be in [0, 1], got "
                       f"{self.public_weight}.")
    if not self.pull >= 0:
      raise ValueError(f"pull must be >= 0, got {self.pull}.")

  def structure(self) -> "StepStructure":
    """The static part: what changes the compiled program."""
    return StepStructure(adaptive_threshold=bool(self.adaptive_threshold),
                         normalize_by_threshold=bool(
                             self.normalize_by_threshold))

  def numbers(self) -> "StepNumbers":
    """The traced part: float32 scalars, one compiled step for every value."""
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    return StepNumbers(
        noise_multiplier=f32(self.noise_multiplier),
        expected_batch_size=f32(self.expected_batch_size),
        learning_rate=f32(self.learning_rate), clip_norm=f32(self.clip_norm),
        threshold_quantile=f32(self.threshold_quantile),
        public_weight=f32(self.public_weight), pull=f32(self.pull))


@dataclasses.dataclass(frozen=True)
class StepStructure:
  """The booleans of a StepConfig (hashable: a static jit argument)."""

  adaptive_threshold: bool
  normalize_by_threshold: bool


@flax.struct.dataclass
class StepNumbers:
  """The numbers of a StepConfig as device scalars (a pytree)."""

  noise_multiplier: jnp.ndarray
  expected_batch_size: jnp.ndarray
  learning_rate: jnp.ndarray
  clip_norm: jnp.ndarray
  threshold_quantile: jnp.ndarray
  public_weight: jnp.ndarray
  pull: jnp.ndarray


@dataclasses.dataclass(frozen=True)
class SubspaceSpec:
  """Which public subspace private gradients are projected onto.

  kind: "none", "features" (linear heads: top-k right singular vectors of
    the public features) or "gradients" (top-k singular directions of the
    public per-example gradients at the current parameters; any model).
  rank: its dimension k (capped by the public set size).
  refresh_every: recompute a "gradients" subspace every m steps.
  method: how a linear head's "gradients" subspace is refreshed: "eigh"
    (exact) or "iterative" (warm-started block subspace iteration +
    Rayleigh-Ritz; see adamix.subspace). Full models use an SVD.
  iterations, oversample: of the "iterative" method.
  """

  kind: str = "none"
  rank: int = 0
  refresh_every: int = 10
  method: str = "eigh"
  iterations: int = 2
  oversample: int = 10

  def __post_init__(self):
    if self.kind not in SUBSPACE_KINDS:
      raise ValueError(f"subspace kind must be one of {SUBSPACE_KINDS}, got "
                       f"{self.kind!r}.")
    if self.kind != "none" and self.rank <= 0:
      raise ValueError(f"subspace rank must be > 0 for kind {self.kind!r}; use "
                       "kind='none' to disable projection.")
    if self.refresh_every <= 0:
      raise ValueError("refresh_every must be > 0.")
    if self.method not in GRADIENT_METHODS:
      raise ValueError(f"subspace method must be one of {GRADIENT_METHODS}, "
                       f"got {self.method!r}.")
    if self.iterations < 0 or self.oversample < 0:
      raise ValueError("iterations and oversample must be >= 0.")


@dataclasses.dataclass(frozen=True)
class PerformanceFlags:
  """How the update is computed; never what is released.

  path: linear heads: "closed_form" (never forms a per-example gradient)
    or "vmap" (explicit per-example gradients).
  representation: linear heads: "matrix" (the parameters are the state),
    "dual" (a "gradients" subspace only: the state is W~_0 + a D + X~p^T S,
    see linear_step) or "auto" (dual wherever it applies on one device).
  microbatch_size: vmap paths: examples per vmap slice (peak memory is one
    slice's per-example gradients); full models' ghost and JVP projections:
    examples per capture / forward-mode pass (peak memory is one slice's
    activations, patches and tangents); must divide the padded batch.
    None: the whole batch.
  cache_private_kernel: linear heads, matrix form, "gradients" subspace:
    cache X~ X~p^T for every private example (N x n floats).
  clipping: full models: "vmap" (per-example gradients), "ghost" (norms
    from layer inputs and output gradients, no per-example gradients; see
    privacy.ghost) or "auto" (ghost where every layer supports it).
  projection: full models with a subspace: "vmap" (project explicit
    per-example gradients), "jvp" (forward-mode directional derivatives, no
    per-example gradients, least memory), "ghost" (the coefficients from the
    ghost capture's layer inputs and output gradients) or "auto" (ghost when
    the clipping is ghost, else vmap).
  """

  path: str = "closed_form"
  representation: str = "auto"
  microbatch_size: Optional[int] = None
  cache_private_kernel: bool = False
  clipping: str = "auto"
  projection: str = "auto"

  def __post_init__(self):
    for name, value, allowed in (
        ("path", self.path, PATHS),
        ("representation", self.representation, REPRESENTATIONS),
        ("clipping", self.clipping, CLIPPING_METHODS),
        ("projection", self.projection, PROJECTION_METHODS)):
      if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")
    if self.microbatch_size is not None and self.microbatch_size <= 0:
      raise ValueError(f"microbatch_size must be > 0 or None, got "
                       f"{self.microbatch_size}.")
