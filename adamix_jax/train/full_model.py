"""Full-model DP fine-tuning: the DP engine trains any Flax model end to end.

``FullModelProgram`` is a Flax model's private run as ``fit`` drives it. The
state is an ``adamix.train_state.PrivateTrainState`` whose optimiser is
``optax.chain(adamix.transform.adamix(...), optimizer)``: AdaMix's public
gradient basis (refreshed every m steps) and threshold, and the one
mechanism (``privacy.mechanism.privatize``), run inside ``tx.update``. One
step, given parameters w_t, the public set P and a Poisson-sampled, padded
private batch B:

1. (AdaMix) every m steps, the basis V_t (P x k, orthonormal): the top-k
   right singular vectors of the n_pub x P matrix of PUBLIC per-example
   gradients at w_t;
2. C_t: a quantile of the public per-example gradient norms in V_t (or the
   fixed clip norm: DP-SGD);
3. private per-example coefficients V_t^T g_i (project THEN clip), clipped
   to C_t, summed, N(0, sigma^2 C_t^2 I_k) added ONCE, divided by q N, and
   mapped back by V_t (without a basis: plain DP-SGD on the whole gradient);
4. mixed with the exact mean public gradient, divided by C_t, pulled
   towards w_0, and fed to the optax optimiser; the tail average follows.

V_t and C_t come from public data and the current parameters only
(invariant 3).

Data parallel: pass a ``mesh`` (``parallel.make_data_mesh()``); the batch is
sharded on its ``data`` axis and the per-example section (gradients,
projection, clipping, the per-device sum) runs in ``jax.shard_map``
(``privacy.mechanism.ShardMapped``): in jax 0.10.2 GSPMD returned wrong
per-example kernel gradients for a vmapped convolution with a sharded batch.
The noise is then added once to the psummed global sum.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from adamix_jax.adamix import settings as settings_lib
from adamix_jax.adamix import train_state as train_state_lib
from adamix_jax.adamix import transform as transform_lib
from adamix_jax.data import validation
from adamix_jax.privacy import accounting
from adamix_jax.privacy import ghost
from adamix_jax.privacy import mechanism
from adamix_jax.privacy import per_example
from adamix_jax.privacy import projection
from adamix_jax.privacy import randomness
from adamix_jax.privacy import sampler as sampler_lib
from adamix_jax.train import checkpoint as checkpoint_lib
from adamix_jax.train import fit as fit_lib
from adamix_jax.train import placement as placement_lib

PyTree = Any
ExampleLoss = per_example.ExampleLoss
StepConfig = settings_lib.StepConfig
SubspaceSpec = settings_lib.SubspaceSpec
PerformanceFlags = settings_lib.PerformanceFlags


@functools.lru_cache(maxsize=None)
def classification_loss(model) -> ExampleLoss:
  """Cross-entropy of ONE example (x, y) under a Flax ``model``'s params.

  Cached per model, so that jitted steps built on it are reused.
  """
  return train_state_lib.classification_loss(model.apply)


def resolve_clipping(flags: PerformanceFlags, model) -> str:
  """"ghost" or "vmap": ghost norms need the Flax model (and its softmax
  cross-entropy loss); "auto" uses them whenever the model is known."""
  if flags.clipping == "ghost" and model is None:
    raise ValueError("clipping='ghost' needs the Flax model "
                     "(train_full_model(..., model=model)).")
  if flags.clipping == "auto":
    return "ghost" if model is not None else "vmap"
  return flags.clipping


def contributions_fn(loss_fn: ExampleLoss, params: PyTree, batch: PyTree,
                     flags: PerformanceFlags, mesh: Optional[Mesh] = None,
                     model=None) -> transform_lib.ContributionsFn:
  """basis -> the private batch's contributions (the mechanism's backend).

  Without a basis: ghost norms and book-kept sums (``privacy.ghost``, no
  per-example gradients) or vmap per-example gradients
  (``flags.microbatch_size`` at a time). With a basis, each example's
  coefficients V^T g_i, taken before clipping: from the ghost capture, by
  forward-mode products (``privacy.projection``) or from vmap gradients. On
  a ``mesh`` each device does its own rows inside ``shard_map``.
  """
  clipping = resolve_clipping(flags, model)
  projection_method = flags.projection
  if projection_method == "auto":
    projection_method = "ghost" if clipping == "ghost" else "vmap"
  if projection_method == "ghost" and model is None:
    raise ValueError("projection='ghost' needs the Flax model.")

  def local(local_batch, replicated):
    params, basis = replicated
    if basis is None and clipping == "ghost":
      return ghost.capture(model, params, local_batch)
    if basis is not None and projection_method == "ghost":
      return per_example.PerExampleGradients.create(
          ghost.projected_coefficients(
              model, params, local_batch, basis,
              examples_per_pass=flags.microbatch_size))
    if basis is not None and projection_method == "jvp":
      return per_example.PerExampleGradients.create(
          projection.jvp_coefficients(
              loss_fn, params, local_batch, basis,
              examples_per_pass=flags.microbatch_size))
    return per_example.vmap_contributions(
        loss_fn, params, local_batch, transform_lib.projector(basis),
        microbatch_size=flags.microbatch_size)

  def make(basis):
    if mesh is None:
      return local(batch, (params, basis))
    return mechanism.ShardMapped(make=local, batch=batch,
                                 replicated=(params, basis), mesh=mesh)

  return make


def _private_step(flags: PerformanceFlags, mesh: Optional[Mesh], model,
                  state: train_state_lib.PrivateTrainState, x, y, mask,
                  public, average_from):
  contributions = contributions_fn(state.loss_fn, state.params, (x, y),
                                   flags, mesh, model)
  return state.private_step((x, y), mask, public, average_from,
                            contributions=contributions)


class FullModelProgram:
  """One private run of any Flax model (see ``train_full_model``)."""

  def __init__(self, loss_fn: ExampleLoss, init_params: PyTree, private_x,
               private_y, public_x, public_y, config: StepConfig,
               optimizer: optax.GradientTransformation, *, steps: int,
               sampling_rate: float,
               subspace: SubspaceSpec = SubspaceSpec(),
               flags: PerformanceFlags = PerformanceFlags(),
               average_tail: float = 0.0, anchor: Optional[PyTree] = None,
               mesh: Optional[Mesh] = None,
               fingerprint: Optional[dict] = None, model=None):
    if subspace.kind == "features":
      raise ValueError("full models project onto a 'gradients' subspace (or "
                       "'none'); 'features' is for linear heads.")
    if not 0.0 <= average_tail < 1.0:
      raise ValueError(f"average_tail must be in [0, 1), got {average_tail}.")
    if not 0.0 < sampling_rate <= 1.0:
      raise ValueError(f"sampling_rate must be in (0, 1], got "
                       f"{sampling_rate}.")
    validation.check_params(init_params, "init_params")
    validation.check_same_length("private set", features=private_x,
                                 labels=private_y)
    self.private_x = validation.check_rows(private_x, "private features")
    self.private_y = np.asarray(private_y)
    self.public_x = validation.check_rows(public_x, "public features",
                                          allow_empty=True)
    self.public_y = np.asarray(public_y)
    validation.check_same_length("public set", features=self.public_x,
                                 labels=self.public_y)
    self.loss_fn, self.config, self.optimizer = loss_fn, config, optimizer
    self.model = model
    if model is not None:  # a classifier: labels are class indices
      resolve_clipping(flags, model)
      num_classes = model.apply({"params": init_params},
                                self.private_x[:1]).shape[-1]
      self.private_y = validation.check_labels(self.private_y, num_classes,
                                               "private set labels")
      if len(self.public_y):
        self.public_y = validation.check_labels(self.public_y, num_classes,
                                                "public set labels")
    self.spec, self.flags, self.mesh = subspace, flags, mesh
    self.anchor = anchor
    self.placement = placement_lib.placement_for(mesh)
    self.noise_multiplier = float(config.noise_multiplier)
    self.sampling_rate = float(sampling_rate)
    self.num_examples = len(self.private_y)
    # Padded sizes: whole microbatches on every device.
    self.pad_multiple = self.placement.pad_multiple * (
        flags.microbatch_size or 1)
    self.average = average_tail > 0
    self.average_from = int(round(steps * (1.0 - average_tail)))
    self.init_params = jax.tree_util.tree_map(
        lambda p: np.asarray(p, np.float32), init_params)
    self.fingerprint = {
        "private_data": checkpoint_lib.digest(self.private_x, self.private_y),
        "public_data": checkpoint_lib.digest(self.public_x, self.public_y),
        "init_params": checkpoint_lib.digest(
            *jax.tree_util.tree_leaves(init_params)),
        "config": repr(config), "subspace": repr(subspace),
        "flags": repr(flags), "steps": int(steps),
        "sampling_rate": self.sampling_rate,
        "average_tail": float(average_tail), **(fingerprint or {})}
    self.public = None
    if len(self.public_y):
      self.public = self.placement.replicate(
          (self.public_x, self.public_y.astype(np.int32)))
    self._step = placement_lib.cached_jit(
        mesh, _private_step, static_argnums=(0, 1, 2), donate_argnums=(3,))

  # --- fit's Program interface ----------------------------------------------

  def share_coins(self, coins):
    return self.placement.share_coins(coins)

  def put(self, array):
    return self.placement.replicate(array)

  def tx(self, key: jax.Array) -> optax.GradientTransformation:
    rank = self.spec.rank if self.spec.kind == "gradients" else 0
    return optax.chain(
        transform_lib.adamix(self.config, key=key, rank=rank,
                             refresh_every=self.spec.refresh_every,
                             anchor=self.anchor), self.optimizer)

  def init(self, coins: randomness.MechanismCoins
           ) -> train_state_lib.PrivateTrainState:
    key = self.placement.replicate_key(coins.noise_key())
    params = self.placement.replicate(self.init_params)
    create = functools.partial(train_state_lib.PrivateTrainState.create,
                               apply_fn=None, tx=self.tx(key),
                               loss_fn=self.loss_fn)
    return self.placement.jit(lambda p: create(params=p))(params)

  def step(self, t: int, state, batch: sampler_lib.PaddedBatch):
    x, y, mask = self.placement.shard_batch(
        (self.private_x[batch.indices],
         self.private_y[batch.indices].astype(np.int32), batch.mask))
    state = self._step(self.flags, self.mesh, self.model, state, x, y, mask,
                       self.public, self.average_from)
    return state, transform_lib.find_state(state.opt_state)

  def release(self, state) -> PyTree:
    params = state.average if self.average else state.params
    return jax.tree_util.tree_map(np.asarray, params)


def train_full_model(loss_fn: ExampleLoss,
                     init_params: PyTree,
                     private_x: np.ndarray,
                     private_y: np.ndarray,
                     public_x: np.ndarray,
                     public_y: np.ndarray,
                     config: StepConfig,
                     optimizer: optax.GradientTransformation,
                     *,
                     steps: int,
                     sampling_rate: float,
                     ledger: accounting.PrivacyLedger,
                     coins: Optional[randomness.MechanismCoins] = None,
                     subspace: SubspaceSpec = SubspaceSpec(),
                     flags: PerformanceFlags = PerformanceFlags(),
                     average_tail: float = 0.0,
                     anchor: Optional[PyTree] = None,
                     mesh: Optional[Mesh] = None,
                     checkpointer: Optional[
                         checkpoint_lib.RunCheckpointer] = None,
                     fingerprint: Optional[dict] = None,
                     progress: Optional[fit_lib.Progress] = None,
                     on_step: Optional[Callable[[int, Any], None]] = None,
                     model=None) -> PyTree:
  """Runs ``steps`` private steps of any model from ``init_params``.

  Args:
    loss_fn: per-example loss ``loss_fn(params, (x, y)) -> scalar`` (e.g.
      ``classification_loss(model)``).
    init_params: the starting parameters (e.g. the public model).
    private_x, private_y: the private set (stays on the host; each step
      ships its sharded batch).
    public_x, public_y: the public set (may be empty; DP-SGD passes none).
    config: the step's settings (``learning_rate`` stays 1.0: the optimiser
      sets the step).
    optimizer: any optax transformation (it sees the privatised gradient).
    steps, sampling_rate: T and the Poisson rate q.
    ledger: records each step; its target is enforced before starting and
      before each step.
    coins: the secret randomness of the sampler and the noise; None draws
      fresh OS entropy. A resumed run uses the coins in its checkpoint.
    subspace: ``SubspaceSpec("gradients", k, refresh_every=m)`` for AdaMix's
      projection; the default projects nothing.
    flags: performance flags (``microbatch_size``).
    average_tail: release the average of this final fraction of iterates.
    anchor: w_0, the pull target (``config.pull > 0``).
    mesh: data-parallel mesh (``parallel.make_data_mesh()``), or None.
    checkpointer: saves the whole train state (params, optimiser state with
      the basis and key, the tail average) with the coins and the ledger;
      the run first resumes from its latest checkpoint.
    fingerprint: extra fields a checkpoint must match, on top of digests of
      the data and the start, the config, steps and q. Sharp edge: the
      optimiser's hyperparameters are closures and cannot be digested here:
      put them in ``fingerprint`` (the experiment passes its config).
    progress: optional progress reporter (``fit.BarProgress()``).
    on_step: optional callback(step, metrics).
    model: the Flax model whose softmax cross-entropy ``loss_fn`` is
      (``classification_loss(model)``): enables ghost clipping and the
      ghost projection (``flags.clipping``/``projection`` "auto"), with no
      per-example gradients in memory. None: vmap per-example gradients.

  Returns:
    The final parameters (numpy leaves).
  """
  program = FullModelProgram(
      loss_fn, init_params, private_x, private_y, public_x, public_y, config,
      optimizer, steps=steps, sampling_rate=sampling_rate, subspace=subspace,
      flags=flags, average_tail=average_tail, anchor=anchor, mesh=mesh,
      fingerprint=fingerprint, model=model)
  return fit_lib.fit(program, steps=steps, ledger=ledger, coins=coins,
                     checkpointer=checkpointer, progress=progress,
                     on_step=on_step)


def train_private_model(model, params: PyTree, private: tuple, public: tuple,
                        *, target_epsilon: float, delta: float, steps: int,
                        sampling_rate: float,
                        optimizer: optax.GradientTransformation,
                        projection_rank: int = 0, refresh_every: int = 10,
                        threshold_quantile: float = 0.5,
                        clip_norm: float = 1.0,
                        mesh: Optional[Mesh] = None,
                        progress: Optional[fit_lib.Progress] = None
                        ) -> tuple[PyTree, accounting.PrivacyLedger]:
  """AdaMix (or, with no public examples, DP-SGD) on a Flax linen classifier.

  Calibrates sigma for (target_epsilon, delta, q, T), then trains from
  ``params`` (e.g. a model pre-trained on the public examples): each private
  gradient is projected onto the top ``projection_rank`` public gradient
  directions (0: no projection), clipped to the median public gradient norm
  (``threshold_quantile``; the fixed ``clip_norm`` without public examples),
  noised once and fed to ``optimizer``. Fresh secret coins; one jitted step.

  Args:
    model: a Flax linen module returning logits for a batch of inputs.
    params: its starting parameters (``model.init(...)["params"]``).
    private, public: (inputs, integer labels); ``public`` may be empty.
    target_epsilon, delta: the privacy budget of the whole run.
    steps, sampling_rate: T and the Poisson rate q.
    optimizer: any optax transformation (it sees the privatised gradient).

  Returns:
    (the final parameters, the privacy ledger of the steps taken).
  """
  private_x, private_y = private
  public_x, public_y = public
  sigma = accounting.calibrate_noise_multiplier(target_epsilon, delta,
                                                sampling_rate, steps)
  has_public = len(public_y) > 0
  config = StepConfig(noise_multiplier=sigma,
                      expected_batch_size=sampling_rate * len(private_y),
                      clip_norm=clip_norm, adaptive_threshold=has_public,
                      threshold_quantile=threshold_quantile)
  ledger = accounting.PrivacyLedger(delta, target_epsilon)
  subspace = SubspaceSpec()
  if projection_rank and has_public:
    subspace = SubspaceSpec("gradients", projection_rank, refresh_every)
  trained = train_full_model(
      classification_loss(model), params, private_x, private_y, public_x,
      public_y, config, optimizer, steps=steps, sampling_rate=sampling_rate,
      ledger=ledger, subspace=subspace, mesh=mesh, progress=progress,
      model=model)
  return trained, ledger


# --- non-private training (public init, paragon) -----------------------------


@functools.lru_cache(maxsize=None)
def _non_private_fn(loss_fn: ExampleLoss, steps: int, learning_rate: float,
                    weight_decay: float):
  tx = optax.adamw(learning_rate, weight_decay=weight_decay)

  def mean_loss(p, x, y):
    return jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0))(p, (x, y)))

  @jax.jit
  def run(params, x, y):
    def body(carry, _):
      p, s = carry
      grads = jax.grad(mean_loss)(p, x, y)
      updates, s = tx.update(grads, s, p)
      return (optax.apply_updates(p, updates), s), None
    (params, _), _ = jax.lax.scan(body, (params, tx.init(params)), None,
                                  length=steps)
    return params

  return run


def fit_non_private(loss_fn: ExampleLoss, params: PyTree, x: np.ndarray,
                    y: np.ndarray, *, steps: int, learning_rate: float,
                    weight_decay: float = 0.0) -> PyTree:
  """Full-batch AdamW on (x, y): the public model w_0, or the paragon.

  Non-private: use it on public data (w_0) or for the non-private paragon
  only.
  """
  run = _non_private_fn(loss_fn, int(steps), float(learning_rate),
                        float(weight_decay))
  params = jax.tree_util.tree_map(jnp.asarray, params)
  out = run(params, jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32))
  return jax.tree_util.tree_map(np.asarray, out)


@functools.lru_cache(maxsize=None)
def _predict_fn(model):
  return jax.jit(lambda p, xb: jnp.argmax(model.apply({"params": p}, xb), -1))


def error_rate(model, params: PyTree, x: np.ndarray, y: np.ndarray,
               batch_size: int = 1024) -> float:
  """Top-1 error of a Flax classifier (non-private evaluation)."""
  wrong = 0
  predict = _predict_fn(model)
  for start in range(0, len(y), batch_size):
    pred = np.asarray(predict(params, jnp.asarray(x[start:start + batch_size])))
    wrong += int(np.sum(pred != np.asarray(y[start:start + batch_size])))
  return wrong / max(len(y), 1)
