"""Private training of a linear head on frozen features (DP-SGD, AdaMix).

``LinearHeadProgram`` is the linear head as ``fit`` drives it: the private
features live on the device (replicated on a mesh) and each step ships only
the padded index vector and mask; the jitted step is
``adamix.linear_step.private_step`` in the matrix or the dual
representation. ``train_private_head`` builds the program and runs ``fit``.

Example::

  config = StepConfig(noise_multiplier=sigma, expected_batch_size=q * n,
                      learning_rate=1.0, adaptive_threshold=True)
  ledger = PrivacyLedger(delta=1e-5, target_epsilon=2.0)
  params = train_private_head(x_priv, y_priv, x_pub, y_pub, w0, config,
                              steps=100, sampling_rate=q, ledger=ledger)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from adamix_jax.adamix import linear_step
from adamix_jax.adamix import sensitivity
from adamix_jax.adamix import settings as settings_lib
from adamix_jax.adamix import subspace as subspace_lib
from adamix_jax.data import validation
from adamix_jax.models import linear
from adamix_jax.privacy import accounting
from adamix_jax.privacy import individual as individual_lib
from adamix_jax.privacy import randomness
from adamix_jax.privacy import sampler as sampler_lib
from adamix_jax.train import checkpoint as checkpoint_lib
from adamix_jax.train import fit as fit_lib
from adamix_jax.train import placement as placement_lib

StepConfig = settings_lib.StepConfig
SubspaceSpec = settings_lib.SubspaceSpec
PerformanceFlags = settings_lib.PerformanceFlags

# "auto" uses the dual form only when its caches fit in this much memory.
DUAL_CACHE_LIMIT_BYTES = 2 * 2**30


def initial_subspace(spec: SubspaceSpec, matrix: jax.Array,
                     public: linear_step.PublicData,
                     fallback_basis: Optional[jax.Array] = None
                     ) -> subspace_lib.Subspace:
  """The subspace at the start (public data only).

  A "gradients" subspace is built by a full ``eigh`` (it also keeps the top
  rank + oversample eigenvectors: the warm start of "iterative" refreshes).
  With no public examples a "features" subspace falls back to the span of
  ``fallback_basis`` (a zero-shot head's class embeddings), else none.
  """
  if spec.kind == "none":
    return subspace_lib.identity()
  if public.size == 0:
    if spec.kind == "features" and fallback_basis is not None:
      return subspace_lib.from_basis_vectors(fallback_basis)
    return subspace_lib.identity()
  if spec.kind == "features":
    return subspace_lib.from_public_features(public.x_aug, spec.rank)
  e = linear.residuals(matrix, public.x_aug, public.y, public.base_logits)
  return subspace_lib.from_public_gradients(
      public.x_aug, e, spec.rank, public_gram=public.gram,
      oversample=spec.oversample)


def private_public_kernel(private_x_aug: jax.Array, public_x_aug: jax.Array,
                          chunk: int = 8192) -> jax.Array:
  """X~ X~p^T (N, n) for every private example, in row chunks.

  A function of the features alone (the public set is public; the step only
  ever reads back the rows of its sampled batch).
  """
  product = jax.jit(lambda a, b: a @ b.T)
  parts = [product(private_x_aug[i:i + chunk], public_x_aug)
           for i in range(0, private_x_aug.shape[0], chunk)]
  return jnp.concatenate(parts) if len(parts) > 1 else parts[0]


def choose_representation(flags: PerformanceFlags, subspace: SubspaceSpec,
                          num_private: int, num_public: int,
                          num_classes: int, one_device: bool) -> str:
  """Resolves ``representation="auto"``: the dual form wherever it applies.

  It applies to a "gradients" subspace on the closed-form path with public
  examples, on one device, when its caches (N x (n + 2c) floats) fit in
  ``DUAL_CACHE_LIMIT_BYTES``; otherwise the matrix form (the same update).
  An explicit "dual" that does not apply is an error.
  """
  applies = (subspace.kind == "gradients" and flags.path == "closed_form" and
             num_public > 0)
  if flags.representation == "dual":
    if not applies:
      raise ValueError("representation='dual' needs a 'gradients' subspace, "
                       "path='closed_form' and public examples.")
    if not one_device:
      raise ValueError("representation='dual' runs on one device only; use "
                       "'matrix' (the same update) for data parallelism.")
    return "dual"
  if flags.representation == "matrix":
    return "matrix"
  cache_bytes = 4 * num_private * (num_public + 2 * num_classes)
  if applies and one_device and cache_bytes <= DUAL_CACHE_LIMIT_BYTES:
    return "dual"
  return "matrix"


def _check_feature_map(feature_map, dim_aug: int) -> np.ndarray:
  feature_map = np.asarray(feature_map, np.float32)
  if feature_map.ndim != 2 or feature_map.shape[0] != dim_aug:
    raise ValueError(f"feature_map must have shape ({dim_aug}, k) (it maps "
                     f"the augmented features x~ = [x, 1]), got "
                     f"{feature_map.shape}.")
  if not np.all(np.isfinite(feature_map)):
    raise ValueError("feature_map holds NaN or inf.")
  return feature_map


def _augment_host(x: np.ndarray) -> np.ndarray:
  """linear.augment on the host (placement then copies it to devices)."""
  return np.asarray(linear.augment(np.asarray(x, np.float32)), np.float32)


class LinearHeadProgram:
  """One private run of a linear head (see ``train_private_head``).

  The state is (head, subspace), plus the (N, L + 1) clipping-ratio counts
  when ``individual`` is given (``adamix.sensitivity``); ``release`` then
  also fills ``individual`` with the counts of the whole run.
  """

  def __init__(self, private_x, private_y, public_x, public_y,
               anchor_params: dict, config: StepConfig, *, steps: int,
               sampling_rate: float,
               subspace: SubspaceSpec = SubspaceSpec(),
               flags: PerformanceFlags = PerformanceFlags(),
               average_tail: float = 0.5, lr_schedule: str = "constant",
               fallback_basis: Optional[np.ndarray] = None,
               mesh: Optional[jax.sharding.Mesh] = None,
               individual: Optional[individual_lib.IndividualRecorder] = None,
               feature_map: Optional[np.ndarray] = None,
               tap: Optional[Callable[[int], Any]] = None):
    """See ``train_private_head``; ``tap`` (privacy audits only,
    ``audit.whitebox``): ``tap(t)`` gives the auditor's canaries of step t,
    released by the step's own ``privatize`` call."""
    arrays = validation.check_linear_head_inputs(
        private_x, private_y, public_x, public_y, anchor_params,
        fallback_basis)
    private_x, private_y, public_x, public_y = arrays
    if not 0.0 <= average_tail < 1.0:
      raise ValueError(f"average_tail must be in [0, 1), got {average_tail}.")
    if not 0.0 < sampling_rate <= 1.0:
      raise ValueError(f"sampling_rate must be in (0, 1], got "
                       f"{sampling_rate}.")
    lr_scales = fit_lib.learning_rate_scales(lr_schedule, steps)
    self.placement = placement_lib.placement_for(mesh)
    self.config, self.spec = config, subspace
    self.noise_multiplier = float(config.noise_multiplier)
    self.sampling_rate = float(sampling_rate)
    self.num_examples = len(private_y)
    # Padded sizes: whole microbatches on every device.
    self.pad_multiple = self.placement.pad_multiple * (
        flags.microbatch_size or 1 if flags.path == "vmap" else 1)
    self.average = average_tail > 0
    if individual is not None and (individual.steps or
                                   individual.num_examples != len(private_y)):
      raise ValueError(
          "individual must be an empty IndividualRecorder of the private set "
          f"({len(private_y)} examples); got {individual.num_examples} "
          f"examples and {individual.steps} steps.")
    if individual is not None and tap is not None:
      raise ValueError("an audit tap and individual recording cannot be "
                       "combined in one run.")
    self.individual = individual
    self._tap = tap
    num_classes = np.asarray(anchor_params["kernel"]).shape[1]
    if feature_map is not None:
      feature_map = _check_feature_map(feature_map, private_x.shape[1] + 1)
      if fallback_basis is not None:
        raise ValueError("a feature_map and a zero-shot fallback_basis cannot "
                         "be combined (the basis lives in the original "
                         "feature space).")
      # The dual form caches logits of a start in the original space.
      flags = dataclasses.replace(flags, representation="matrix")
    self.flags = flags
    self.representation = choose_representation(
        flags, subspace, len(private_y), len(public_y), num_classes,
        one_device=mesh is None)
    self.fingerprint = {
        "private_data": checkpoint_lib.digest(private_x, private_y),
        "public_data": checkpoint_lib.digest(public_x, public_y),
        "anchor": checkpoint_lib.digest(anchor_params["kernel"],
                                        anchor_params["bias"]),
        "step_config": repr(config), "subspace": repr(subspace),
        "flags": repr(flags), "steps": int(steps),
        "sampling_rate": self.sampling_rate,
        "average_tail": float(average_tail), "lr_schedule": lr_schedule,
        "representation": self.representation,
        "fallback_basis": None if fallback_basis is None else
        checkpoint_lib.digest(fallback_basis),
        # The counts are part of the state: a checkpoint with or without
        # them fits only a run of the same kind.
        "individual_levels": None if individual is None else
        individual.levels,
        "feature_map": None if feature_map is None else
        checkpoint_lib.digest(feature_map)}

    put = self.placement.replicate
    private_x_aug = _augment_host(private_x)
    public_x_aug = _augment_host(public_x)
    self._anchor = {k: np.asarray(v, np.float32)
                    for k, v in anchor_params.items()}
    self._feature_map = feature_map
    self._full_batch = None
    self._base_params = self._anchor
    private_base = public_base = None
    if feature_map is not None:
      # W~ = W~_0 + M V: the head trains V from 0 on z = x~ M, and the
      # public model's logits x~ W~_0 are a fixed part of every logit.
      anchor = np.asarray(linear.stack(self._anchor), np.float32)
      private_base = put(private_x_aug @ anchor)
      public_base = jnp.asarray(public_x_aug @ anchor)
      private_x_aug = private_x_aug @ feature_map
      public_x_aug = public_x_aug @ feature_map
      self._anchor = np.zeros((feature_map.shape[1], num_classes), np.float32)
    # The public feature Gram never changes: cached for a gradient subspace.
    self.public = put(jax.device_get(linear_step.make_public_data(
        jnp.asarray(public_x_aug), jnp.asarray(public_y, jnp.int32),
        cache_gram=subspace.kind == "gradients", base_logits=public_base)))
    x_aug = put(private_x_aug)
    kernel = None
    needs_kernel = (self.representation == "dual" or (
        flags.cache_private_kernel and subspace.kind == "gradients" and
        flags.path == "closed_form" and len(public_y)))
    if needs_kernel:
      kernel = private_public_kernel(x_aug, self.public.x_aug)
    self.private = linear_step.PrivateData(
        x_aug=x_aug, y=put(np.asarray(private_y, np.int32)),
        kernel=kernel if self.representation == "matrix" else None,
        base_logits=private_base)
    self._cache = None
    if self.representation == "dual":
      self._cache = linear_step.dual_cache(self._anchor, self.public, x_aug,
                                           private_kernel=kernel)
    self.numbers = put(config.numbers())
    self.average_from = put(np.int32(int(round(steps * (1.0 -
                                                        average_tail)))))
    self.lr_schedule = put(lr_scales)
    self.fallback = None if fallback_basis is None else put(
        np.asarray(fallback_basis, np.float32))
    jit = functools.partial(placement_lib.cached_jit, mesh)
    if individual is None:
      self._step = jit(linear_step.private_step, static_argnums=(0, 1, 2),
                       donate_argnums=(4,))
    else:
      self._step = jit(sensitivity.recorded_step,
                       static_argnums=(0, 1, 2, 3), donate_argnums=(5, 6))
    self._build = jit(initial_subspace, static_argnums=(0,))
    self._init_matrix = jit(linear_step.init_matrix_state)

  # --- fit's Program interface ----------------------------------------------

  def share_coins(self, coins: randomness.MechanismCoins
                  ) -> randomness.MechanismCoins:
    return self.placement.share_coins(coins)

  def put(self, array):
    return self.placement.replicate(array)

  def init(self, coins: randomness.MechanismCoins):
    key = self.placement.replicate_key(coins.noise_key())
    if self._cache is not None:
      state = linear_step.init_dual_state(self._cache, key)
      matrix = linear_step.dual_matrix(state, self._cache, self.public)
    else:
      state = self._init_matrix(self._anchor, key)
      matrix = state.matrix
    subspace = self._build(self.spec, matrix, self.public, self.fallback)
    if self.individual is None:
      return state, subspace
    return state, subspace, self.put(sensitivity.zero_counts(
        self.num_examples, self.individual.levels))

  def step(self, t: int, state, batch: sampler_lib.PaddedBatch):
    head, subspace = state[:2]
    refresh = None
    if (self.spec.kind == "gradients" and t and
        t % self.spec.refresh_every == 0):
      refresh = self.spec
    indices, mask = self._placed_batch(batch)
    if self.individual is None:
      tap = None
      if self._tap is not None:
        tap = self.placement.replicate(self._tap(t))
      head, metrics, subspace = self._step(
          self.config.structure(), self.flags, refresh, self.numbers, head,
          subspace, self.public, self.private, indices, mask,
          self.average_from, self.lr_schedule, self._cache, tap)
      return (head, subspace), metrics
    head, counts, metrics, subspace = self._step(
        self.config.structure(), self.flags, refresh, self.individual.levels,
        self.numbers, head, state[2], subspace, self.public, self.private,
        indices, mask, self.average_from, self.lr_schedule, self._cache)
    return (head, subspace, counts), metrics

  def _placed_batch(self, batch: sampler_lib.PaddedBatch):
    """The batch's (indices, mask) on the device(s). A full batch (q = 1)
    is every index at every step: it is placed once and reused (a copy per
    step cost more host time than the digits step itself)."""
    full = self.sampling_rate == 1.0  # the sampler's batch is arange(N)
    if full and self._full_batch is not None:
      return self._full_batch
    placed = self.placement.shard_batch(
        (batch.indices.astype(np.int32), batch.mask))
    if full:
      self._full_batch = placed
    return placed

  def release(self, state) -> dict:
    head = state[0]
    if self.individual is not None:
      # Every step, restored ones included, is in the counts: each row sums
      # to the step counter (record_counts checks it).
      self.individual.record_counts(np.asarray(jax.device_get(state[2])),
                                    int(jax.device_get(head.step)))
    final = np.asarray(linear_step.final_matrix(head, self._cache, self.public,
                                                self.average))
    if self._feature_map is not None:  # back to x~: W~_0 + M V
      final = (np.asarray(linear.stack(self._base_params), np.float32) +
               self._feature_map @ final)
    return {k: np.asarray(v) for k, v in linear.unstack(final).items()}


def train_private_head(private_x: np.ndarray,
                       private_y: np.ndarray,
                       public_x: np.ndarray,
                       public_y: np.ndarray,
                       anchor_params: dict,
                       config: StepConfig,
                       *,
                       steps: int,
                       sampling_rate: float,
                       ledger: accounting.PrivacyLedger,
                       coins: Optional[randomness.MechanismCoins] = None,
                       subspace: SubspaceSpec = SubspaceSpec(),
                       flags: PerformanceFlags = PerformanceFlags(),
                       average_tail: float = 0.5,
                       lr_schedule: str = "constant",
                       fallback_basis: Optional[np.ndarray] = None,
                       mesh: Optional[jax.sharding.Mesh] = None,
                       checkpointer: Optional[
                           checkpoint_lib.RunCheckpointer] = None,
                       progress: Optional[fit_lib.Progress] = None,
                       on_step: Optional[Callable[[int, Any], None]] = None,
                       individual: Optional[
                           individual_lib.IndividualRecorder] = None,
                       feature_map: Optional[np.ndarray] = None,
                       ) -> dict:
  """Runs ``steps`` private steps from ``anchor_params``; returns the params.

  Args:
    private_x, private_y: the private set (features, labels in [0, c)).
    public_x, public_y: the public set (may be empty).
    anchor_params: W_0 = {"kernel" (d, c), "bias" (c,)}: the starting point
      and the pull target.
    config: the step's settings (sigma, q*N, lr, threshold rule, ...).
    steps: number of private steps T.
    sampling_rate: Poisson rate q (1.0: full batch).
    ledger: records the steps taken; its target is enforced.
    coins: the secret randomness of the sampler and the noise
      (``privacy.randomness``); None draws fresh OS entropy. A resumed run
      uses the coins in its checkpoint instead (the replay is then exact).
    subspace: the projection (kind, rank, refresh period).
    flags: how the update is computed (closed form or vmap, representation,
      microbatches, caches); never what is released.
    average_tail: average the iterates of this final fraction of the run
      (0: return the last iterate).
    lr_schedule: "constant" or "cosine" (decay to 0 over the run).
    fallback_basis: (d+1, r) public directions to use as a ``features``
      subspace when there are no public examples (zero-shot head columns).
    mesh: run data parallel over this mesh (``parallel.make_data_mesh()``);
      the same result up to float summation order.
    checkpointer: saves the state, coins and ledger every few steps and at
      the end; the run first resumes from its latest checkpoint, if any.
    progress: optional progress reporter (``fit.BarProgress()``).
    on_step: optional callback(step, metrics) for diagnostics.
    individual: an empty ``privacy.individual.IndividualRecorder`` of the
      private set: the run then records every private example's clipping
      ratio at every step, inside the jitted step, in counts carried (and
      checkpointed) with the state (``adamix.sensitivity``); on return it
      holds the counts of the whole run. They are derived from the private
      data: an analysis for the data owner, not a release.
    feature_map: a PUBLIC (d+1, k) map M: the run trains V (k, c) from 0 on
      z = x~ M, with the logits of ``anchor_params`` W~_0 as a fixed part of
      every logit, and releases W~ = W~_0 + M V (clipping and noise act on
      the gradient with respect to V, in the geometry M sets; see
      ``adamix.geometry``). None: train W~ itself from ``anchor_params``.

  Returns:
    ``{"kernel", "bias"}`` of the final (averaged) model, as numpy arrays.
  """
  program = LinearHeadProgram(
      private_x, private_y, public_x, public_y, anchor_params, config,
      steps=steps, sampling_rate=sampling_rate, subspace=subspace,
      flags=flags, average_tail=average_tail, lr_schedule=lr_schedule,
      fallback_basis=fallback_basis, mesh=mesh, individual=individual,
      feature_map=feature_map)
  return fit_lib.fit(program, steps=steps, ledger=ledger, coins=coins,
                     checkpointer=checkpointer, progress=progress,
                     on_step=on_step)
