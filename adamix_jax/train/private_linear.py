"""The private training loop for a linear head (DP-SGD and AdaMix).

Host side: Poisson sampling (the sampling that is accounted), the budget
guard, the ledger. Device side: one jitted step with donated state; the
private features live on the device and each step ships only the padded
index vector and mask.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from adamix_jax.adamix import step as step_lib
from adamix_jax.adamix import subspace as subspace_lib
from adamix_jax.models import linear
from adamix_jax.privacy import accounting
from adamix_jax.privacy import randomness
from adamix_jax.privacy import sampler as sampler_lib
from adamix_jax.train import checkpoint as checkpoint_lib


@dataclasses.dataclass(frozen=True)
class SubspaceSpec:
  """Which public subspace private gradients are projected onto.

  kind: "none", "features" or "gradients" (see adamix.subspace).
  rank: its dimension k (capped by the public set size).
  refresh_every: recompute a "gradients" subspace every m steps.
  method: how a "gradients" subspace is computed: "eigh" (full
    eigendecomposition of the n x n public Gram every refresh) or
    "iterative" (the first build by eigh, each refresh by ``iterations``
    steps of block subspace iteration warm-started from the last basis, then
    Rayleigh-Ritz; see adamix.subspace).
  iterations, oversample: of the "iterative" method.
  """

  kind: str = "none"
  rank: int = 0
  refresh_every: int = 10
  method: str = "eigh"
  iterations: int = 2
  oversample: int = 10

  def __post_init__(self):
    if self.kind not in subspace_lib.SUBSPACE_KINDS:
      raise ValueError(f"subspace kind must be one of "
                       f"{subspace_lib.SUBSPACE_KINDS}, got {self.kind!r}.")
    if self.kind != "none" and self.rank <= 0:
      raise ValueError(f"subspace rank must be > 0 for kind {self.kind!r}; use "
                       "kind='none' to disable projection.")
    if self.refresh_every <= 0:
      raise ValueError("refresh_every must be > 0.")
    if self.method not in subspace_lib.GRADIENT_METHODS:
      raise ValueError(f"subspace method must be one of "
                       f"{subspace_lib.GRADIENT_METHODS}, got {self.method!r}.")
    if self.iterations < 0 or self.oversample < 0:
      raise ValueError("iterations and oversample must be >= 0.")


def scheduled_train_step(config, state, subspace, public, private_x_aug,
                         private_y, indices, mask, average_from, lr_schedule,
                         private_kernel=None):
  """``step.train_step`` with its lr multiplier read on device.

  ``lr_schedule``: (T,) multipliers of the run, placed on the device once;
  the step reads entry ``state.step`` (so a step ships no scalar, and a
  resumed state reads the right entry).
  """
  return step_lib.train_step(config, state, subspace, public, private_x_aug,
                             private_y, indices, mask, average_from,
                             lr_schedule[state.step], private_kernel)


_jitted_step = jax.jit(scheduled_train_step, static_argnums=(0,),
                       donate_argnums=(1,))


LR_SCHEDULES = ("constant", "cosine")


def learning_rate_scale(schedule: str, step: int, steps: int) -> float:
  """Multiplier of the base learning rate at ``step`` of ``steps``."""
  if schedule == "constant":
    return 1.0
  if schedule == "cosine":
    return 0.5 * (1.0 + math.cos(math.pi * step / steps))
  raise ValueError(f"lr schedule must be one of {LR_SCHEDULES}, got "
                   f"{schedule!r}.")


def build_subspace(spec: SubspaceSpec, matrix: jax.Array,
                   public: step_lib.PublicData,
                   fallback_basis: Optional[jax.Array] = None,
                   previous: Optional[subspace_lib.Subspace] = None
                   ) -> subspace_lib.Subspace:
  """The subspace at the current parameters, from public data only.

  ``previous``: the last subspace, the warm start of an "iterative" refresh
  (None: the first build, by eigh).
  """
  if spec.kind == "none":
    return subspace_lib.identity()
  if public.y.shape[0] == 0:
    if spec.kind == "features" and fallback_basis is not None:
      return subspace_lib.from_basis_vectors(fallback_basis)
    return subspace_lib.identity()
  if spec.kind == "features":
    return subspace_lib.from_public_features(public.x_aug, spec.rank)
  e = linear.residuals(matrix, public.x_aug, public.y)
  if spec.method == "eigh" or previous is None:
    # (eigh also keeps the top rank + oversample eigenvectors: the warm start.)
    return subspace_lib.from_public_gradients(
        public.x_aug, e, spec.rank, public_gram=public.gram,
        oversample=spec.oversample)
  return subspace_lib.from_public_gradients(
      public.x_aug, e, spec.rank, public_gram=public.gram, method="iterative",
      previous=previous, iterations=spec.iterations,
      oversample=spec.oversample)


_jitted_build = jax.jit(build_subspace, static_argnums=(0,))


@functools.partial(jax.jit, static_argnums=(0, 10), donate_argnums=(1,))
def _jitted_dual_step(config, state, subspace, public, cache, private_y,
                      indices, mask, average_from, lr_schedule, refresh):
  return step_lib.dual_train_step(config, state, subspace, public, cache,
                                  private_y, indices, mask, average_from,
                                  lr_schedule[state.step], refresh)


REPRESENTATIONS = ("matrix", "dual")
# "auto" uses the dual form only when its caches fit in this much memory.
DUAL_CACHE_LIMIT_BYTES = 2 * 2**30


def private_public_kernel(private_x_aug: jax.Array, public_x_aug: jax.Array,
                          chunk: int = 8192) -> jax.Array:
  """X~ X~p^T (N, n) for every private example, in row chunks.

  A function of the features alone (the public set is public; the private
  rows are only ever read back by the step for its sampled batch).
  """
  product = jax.jit(lambda a, b: a @ b.T)
  parts = [product(private_x_aug[i:i + chunk], public_x_aug)
           for i in range(0, private_x_aug.shape[0], chunk)]
  return jnp.concatenate(parts) if len(parts) > 1 else parts[0]


class SingleDevice:
  """Where ``train_private_head`` puts its arrays: the default device.

  ``adamix_jax.parallel.MeshPlacement`` is the data-parallel counterpart;
  the training loop is the same code for both.
  """

  pad_multiple = 1

  def replicate(self, tree):
    return jax.tree_util.tree_map(jnp.asarray, tree)

  def replicate_key(self, key: jax.Array) -> jax.Array:
    return key

  def share_coins(self, coins: randomness.MechanismCoins
                  ) -> randomness.MechanismCoins:
    return coins

  def shard_batch(self, tree):
    return jax.tree_util.tree_map(jnp.asarray, tree)

  def init_state(self, anchor_params: dict,
                 key: jax.Array) -> step_lib.TrainState:
    return step_lib.init_state(anchor_params, key)

  def public_data(self, x_aug, y, cache_gram: bool) -> step_lib.PublicData:
    return step_lib.make_public_data(x_aug, y, cache_gram=cache_gram)

  def build_subspace(self, spec: SubspaceSpec) -> Callable:
    return functools.partial(_jitted_build, spec)

  def private_kernel(self, private_x_aug, public_x_aug):
    return private_public_kernel(private_x_aug, public_x_aug)

  def step(self, config: step_lib.StepConfig) -> Callable:
    return functools.partial(_jitted_step, config)


def _augment_host(x: np.ndarray) -> np.ndarray:
  """linear.augment on the host (placement then copies it to devices)."""
  return np.asarray(linear.augment(np.asarray(x, np.float32)), np.float32)


def choose_representation(representation: str, subspace: SubspaceSpec,
                          config: step_lib.StepConfig, num_private: int,
                          num_public: int, num_classes: int,
                          placement: SingleDevice) -> str:
  """Resolves ``representation="auto"``: the dual form wherever it applies.

  It applies to a "gradients" subspace on the closed-form path with public
  examples, on one device, when its caches (N x (n + 2c) floats) fit in
  ``DUAL_CACHE_LIMIT_BYTES``; otherwise the matrix form (the same update).
  An explicit "dual" that does not apply is an error.
  """
  if representation not in REPRESENTATIONS + ("auto",):
    raise ValueError(f"representation must be one of "
                     f"{REPRESENTATIONS + ('auto',)}, got {representation!r}.")
  applies = (subspace.kind == "gradients" and config.path == "closed_form" and
             num_public > 0)
  one_device = type(placement) is SingleDevice  # pylint: disable=unidiomatic-typecheck
  if representation == "dual":
    if not applies:
      raise ValueError("representation='dual' needs a 'gradients' subspace, "
                       "path='closed_form' and public examples.")
    if not one_device:
      raise ValueError("representation='dual' runs on one device only; use "
                       "'matrix' (the same update) for data parallelism.")
    return "dual"
  if representation == "matrix":
    return "matrix"
  cache_bytes = 4 * num_private * (num_public + 2 * num_classes)
  if applies and one_device and cache_bytes <= DUAL_CACHE_LIMIT_BYTES:
    return "dual"
  return "matrix"


def run_fingerprint(private_x, private_y, public_x, public_y, anchor_params,
                    config: step_lib.StepConfig, **settings) -> dict:
  """What a checkpoint must match to be resumed by a run (see checkpoint)."""
  return {"private_data": checkpoint_lib.digest(private_x, private_y),
          "public_data": checkpoint_lib.digest(public_x, public_y),
          "anchor": checkpoint_lib.digest(anchor_params["kernel"],
                                          anchor_params["bias"]),
          "step_config": repr(config),
          **{k: v if isinstance(v, (int, float, str, type(None))) else repr(v)
             for k, v in settings.items()}}


def train_private_head(private_x: np.ndarray,
                       private_y: np.ndarray,
                       public_x: np.ndarray,
                       public_y: np.ndarray,
                       anchor_params: dict,
                       config: step_lib.StepConfig,
                       *,
                       steps: int,
                       sampling_rate: float,
                       ledger: accounting.PrivacyLedger,
                       coins: Optional[randomness.MechanismCoins] = None,
                       subspace: SubspaceSpec = SubspaceSpec(),
                       average_tail: float = 0.5,
                       lr_schedule: str = "constant",
                       fallback_basis: Optional[np.ndarray] = None,
                       on_step: Optional[Callable[[int, step_lib.StepMetrics],
                                                  None]] = None,
                       cache_private_kernel: bool = False,
                       representation: str = "auto",
                       placement: Optional[SingleDevice] = None,
                       checkpointer: Optional[
                           checkpoint_lib.RunCheckpointer] = None,
                       ) -> dict:
  """Runs ``steps`` private steps from ``anchor_params``; returns the params.

  The budget guard: the ledger approves the whole remaining run before the
  first step (epsilon is monotone in steps, so every prefix then fits),
  checks each step before it is taken, and records it after its noisy update
  is applied.

  Args:
    private_x, private_y: the private set (features, labels).
    public_x, public_y: the public set (may be empty).
    anchor_params: W_0, the starting point and the pull target.
    config: the step's hyperparameters (sigma, lr, thresholds, ...).
    steps: number of private steps T.
    sampling_rate: Poisson rate q (1.0: full batch).
    ledger: records the steps taken; its target is enforced.
    coins: the secret randomness of the sampler and the noise
      (``privacy.randomness``); None draws fresh OS entropy. A resumed run
      uses the coins in its checkpoint instead (the replay is then exact).
    subspace: the projection (kind, rank, refresh period).
    average_tail: average the iterates of this final fraction of the run
      (0: return the last iterate).
    lr_schedule: "constant" or "cosine" (decay to 0 over the run).
    fallback_basis: (d+1, r) public directions to use as a ``features``
      subspace when there are no public examples (zero-shot head columns).
    on_step: optional callback(step, metrics) for progress/diagnostics.
    cache_private_kernel: matrix form with a "gradients" subspace: compute
      X~ X~p^T (N x n floats) for all private examples once, so each step
      gathers its batch's rows instead of a B x n x (d+1) product.
    representation: "auto" (default: "dual" wherever it applies, see
      ``choose_representation``), "matrix" (the parameters are the state) or
      "dual" (closed form with a "gradients" subspace only: the state is
      W~_0 + a D + X~p^T S, see step.dual_train_step; it caches the private
      kernel and logits, N x (n + 2c) floats, and refreshes the subspace
      inside the step). Same update up to float rounding, fewer flops.
    placement: where arrays live and how steps are compiled; default one
      device. ``adamix_jax.parallel.MeshPlacement(mesh)`` runs the same loop
      data parallel (see ``parallel.train_private_head_sharded``).
    checkpointer: saves the state and the ledger every few steps and at the
      end; the run first resumes from its latest checkpoint, if any (the
      ledger is then the checkpoint's). See ``adamix_jax.train.checkpoint``.

  Returns:
    ``{"kernel", "bias"}`` of the final (averaged) model.
  """
  lr_scales = np.array(  # (validates the schedule's name early, too)
      [learning_rate_scale(lr_schedule, t, steps) for t in range(steps)],
      np.float32)
  if not 0.0 <= average_tail < 1.0:
    raise ValueError(f"average_tail must be in [0, 1), got {average_tail}.")
  placement = SingleDevice() if placement is None else placement
  num_classes = np.asarray(anchor_params["kernel"]).shape[1]
  representation = choose_representation(
      representation, subspace, config, len(private_y), len(public_y),
      num_classes, placement)
  fingerprint = None
  if checkpointer is not None:
    fingerprint = run_fingerprint(
        private_x, private_y, public_x, public_y, anchor_params, config,
        steps=steps, sampling_rate=float(sampling_rate), subspace=subspace,
        average_tail=float(average_tail),
        lr_schedule=lr_schedule, representation=representation,
        fallback_basis=None if fallback_basis is None else
        checkpoint_lib.digest(fallback_basis))
  coins = placement.share_coins(
      randomness.MechanismCoins.fresh() if coins is None else coins)
  private_x_host = _augment_host(private_x)
  private_x_aug, private_y_dev = placement.replicate(
      (private_x_host, np.asarray(private_y, np.int32)))
  public_x_aug, public_y_dev = placement.replicate(
      (_augment_host(np.asarray(public_x, np.float32).reshape(
          len(public_y), private_x_host.shape[1] - 1)),
       np.asarray(public_y, np.int32)))
  # The public feature Gram never changes: cached for the gradient subspace.
  public = placement.public_data(public_x_aug, public_y_dev,
                                 subspace.kind == "gradients")
  average_from = placement.replicate(
      np.int32(int(round(steps * (1.0 - average_tail)))))
  schedule = placement.replicate(lr_scales)
  basis = None if fallback_basis is None else placement.replicate(
      np.asarray(fallback_basis, np.float32))
  build = placement.build_subspace(subspace)
  if representation == "dual":
    state, cache = step_lib.init_dual(
        anchor_params, public, private_x_aug,
        placement.replicate_key(coins.noise_key()),
        private_kernel=private_public_kernel(private_x_aug, public.x_aug))
    current = build(step_lib.dual_matrix(state, cache, public), public, basis)
    refresh = step_lib.BasisRefresh(subspace.rank, subspace.method,
                                    subspace.iterations, subspace.oversample)

    def advance(t, state, current, batch):
      return _jitted_dual_step(
          config, state, current, public, cache, private_y_dev,
          jnp.asarray(batch.indices), jnp.asarray(batch.mask), average_from,
          schedule, refresh if t % subspace.refresh_every == 0 and t else None)

    def final_matrix(state):
      return step_lib.dual_matrix(state, cache, public,
                                  average=average_tail > 0)
  else:
    state = placement.init_state(anchor_params,
                                 placement.replicate_key(coins.noise_key()))
    current = build(state.matrix, public, basis)
    kernel = None
    if (cache_private_kernel and current.kind == "gradients" and
        config.path == "closed_form"):
      kernel = placement.private_kernel(private_x_aug, public.x_aug)
    step_fn = placement.step(config)

    def advance(t, state, current, batch):
      if subspace.kind == "gradients" and t % subspace.refresh_every == 0 and t:
        current = build(state.matrix, public, basis, current)
      indices, mask = placement.shard_batch(
          (batch.indices.astype(np.int32), batch.mask))
      state, metrics = step_fn(state, current, public, private_x_aug,
                               private_y_dev, indices, mask, average_from,
                               schedule, kernel)
      return state, metrics, current

    def final_matrix(state):
      return state.average if average_tail > 0 else state.matrix

  start = 0
  if checkpointer is not None:
    # The coins travel with the state: a resume replays the same batches and
    # noise (the checkpoint is the only place they are ever written).
    restored = checkpointer.restore((state, current), ledger, fingerprint,
                                    put=placement.replicate)
    if restored is not None:
      start, (state, current) = restored.step, restored.tree
      coins = restored.coins
  sampler = sampler_lib.PoissonSampler(len(private_y), sampling_rate,
                                       coins.sampler_seed,
                                       pad_multiple=placement.pad_multiple)
  sigma, q = config.noise_multiplier, sampling_rate
  ledger.approve(sigma, q, steps - start)
  for t in range(start, steps):
    ledger.check_step(sigma, q)
    state, metrics, current = advance(t, state, current, sampler.batch(t))
    ledger.record(sigma, q)
    if checkpointer is not None:
      checkpointer.maybe_save(t + 1, (state, current), ledger, fingerprint,
                              force=t + 1 == steps, coins=coins)
    if on_step is not None:
      on_step(t, metrics)
  final = final_matrix(state)
  return {k: np.asarray(v) for k, v in linear.unstack(final).items()}
