"""Full-model DP fine-tuning: the DP engine trains any Flax model end to end.

One private step, given parameters w_t, the public set P and a
Poisson-sampled, padded private batch B:

1. (optional, AdaMix) a public gradient basis V_t (P x k, orthonormal
   columns): the top-k right singular vectors of the n_pub x P matrix of
   PUBLIC per-example gradients at w_t (flattened with ``ravel_pytree``),
   recomputed every ``refresh_every`` steps by the host loop;
2. the threshold C_t: a quantile of the public per-example gradient norms,
   measured in V_t (or in the full space without projection); or the fixed
   ``clip_norm`` (DP-SGD);
3. private per-example gradients (``jax.vmap`` of ``jax.grad``,
   microbatched), each mapped to its coefficients c_i = V_t^T g_i
   (``pre_clip_transform``: project THEN clip, so the projection cannot
   carry an example past the bound), clipped to C_t and summed;
4. noise N(0, sigma^2 C_t^2 I_k) is added ONCE to that k-dimensional sum
   (``privacy.privatize_sum``), divided by the expected batch size q N, and
   mapped back: g = V_t (sum + noise) / (q N). This is the Gaussian
   mechanism on the coefficient sum, whose L2 sensitivity is C_t; mapping
   back is post-processing. (Noise drawn in the full space and then
   projected would have the same law V V^T-covariance and the same privacy;
   drawing k numbers instead of P is cheaper.) Since V_t has orthonormal
   columns, each example moves the released parameter-space sum by at most
   C_t too.
   Without projection it is plain DP-SGD: clip the full gradient, noise
   N(0, sigma^2 C_t^2 I_P);
5. optionally mixed with the exact mean public gradient (weight
   ``public_weight``), divided by C_t (``normalize_by_threshold``), and fed
   to an optax optimiser.

V_t and C_t are computed from public data and the current parameters (a
post-processing of earlier noisy releases) only (DESIGN.md invariant 3).

Data parallel: pass a ``mesh`` (see ``adamix_jax.parallel``); the batch is
sharded on its ``data`` axis, everything else replicated. The per-example
section (gradients, projection, clipping, the per-device sum) is a
``shard_map`` whose ``psum`` gives the global clipped sum; the noise is
then drawn from the replicated key and added once, outside it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from adamix_jax import parallel
from adamix_jax import privacy
from adamix_jax.adamix import step as step_lib
from adamix_jax.privacy import clipping
from adamix_jax.privacy import randomness
from adamix_jax.train import checkpoint as checkpoint_lib

PyTree = Any
ExampleLoss = Callable[[PyTree, PyTree], jax.Array]
MIN_THRESHOLD = 1e-6


@dataclasses.dataclass(frozen=True)
class FullModelConfig:
  """Static hyperparameters of the full-model private step.

  Attributes:
    noise_multiplier: sigma, calibrated by the accountant before training.
    expected_batch_size: q * N, the fixed normaliser of the noisy sum.
    clip_norm: the fixed threshold (DP-SGD, or no public examples).
    adaptive_threshold: C_t = quantile of public per-example gradient norms
      (in the projection subspace when there is one).
    threshold_quantile: which quantile (1.0 = max).
    normalize_by_threshold: divide the private gradient by C_t before the
      optimiser (a shrinking threshold then does not shrink the step).
    projection_rank: k > 0 projects private gradients onto the top-k public
      gradient directions (AdaMix); 0 = no projection.
    refresh_every: recompute the basis every m steps.
    public_weight: alpha in (1 - alpha) g_private + alpha g_public.
    microbatch_size: examples per vmap on each device (must divide the
      per-device padded batch); None = the whole (per-device) batch at once.
  """

  noise_multiplier: float
  expected_batch_size: float
  clip_norm: float = 1.0
  adaptive_threshold: bool = False
  threshold_quantile: float = 0.5
  normalize_by_threshold: bool = False
  projection_rank: int = 0
  refresh_every: int = 10
  public_weight: float = 0.0
  microbatch_size: Optional[int] = None

  def __post_init__(self):
    step_lib.check_private_step_settings(self)
    if self.projection_rank < 0:
      raise ValueError("projection_rank must be >= 0 (0: no projection).")
    if self.refresh_every <= 0:
      raise ValueError("refresh_every must be > 0.")


@flax.struct.dataclass
class PublicSet:
  """The public examples on device (may be empty: leading size 0)."""

  x: jax.Array
  y: jax.Array


@flax.struct.dataclass
class State:
  params: PyTree
  opt_state: PyTree
  key: jax.Array
  step: jax.Array


class Metrics(NamedTuple):
  threshold: jax.Array
  batch_size: jax.Array
  num_clipped: jax.Array
  num_nonfinite: jax.Array


# --- losses ------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def classification_loss(model) -> ExampleLoss:
  """Cross-entropy of ONE example (x, y) under a Flax ``model``'s params.

  Cached per model, so that jitted steps built on it are reused.
  """

  def loss_fn(params, example):
    x, y = example
    logits = model.apply({"params": params}, x[None])[0]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)

  return loss_fn


def flatten(tree: PyTree) -> jax.Array:
  return ravel_pytree(tree)[0]


# --- public quantities -------------------------------------------------------


def public_flat_grads(loss_fn: ExampleLoss, params: PyTree,
                      public: PublicSet) -> jax.Array:
  """The n_pub x P matrix of flattened public per-example gradients."""
  grads = privacy.per_example_grads(loss_fn, params, (public.x, public.y))
  return jax.vmap(flatten)(grads)


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


def public_basis(loss_fn: ExampleLoss, params: PyTree, public: PublicSet,
                 rank: int) -> jax.Array:
  """AdaMix's projection basis at ``params``, from public data only."""
  return gradient_basis(public_flat_grads(loss_fn, params, public), rank)


def public_threshold(config: FullModelConfig, flat_public: Optional[jax.Array],
                     basis: Optional[jax.Array]) -> jax.Array:
  """C_t: a quantile of public gradient norms (in the subspace) or clip_norm."""
  if (not config.adaptive_threshold or flat_public is None or
      flat_public.shape[0] == 0):
    return jnp.float32(config.clip_norm)
  coords = flat_public if basis is None else flat_public @ basis
  norms = jnp.linalg.norm(coords, axis=1)
  return jnp.maximum(jnp.quantile(norms, config.threshold_quantile),
                     MIN_THRESHOLD)


def projector(basis: Optional[jax.Array]
              ) -> Optional[clipping.PerExampleTransform]:
  """g -> V^T flatten(g): the per-example map applied BEFORE clipping."""
  if basis is None:
    return None
  return lambda g: flatten(g) @ basis


# --- the clipped sum ---------------------------------------------------------


def clipped_sum(loss_fn: ExampleLoss, params: PyTree, batch: PyTree,
                mask: jax.Array, threshold: jax.Array,
                basis: Optional[jax.Array] = None,
                microbatch_size: Optional[int] = None,
                mesh: Optional[Mesh] = None
                ) -> tuple[PyTree, clipping.ClipStats]:
  """sum_i clip_C(transform(g_i)) over real rows: L2 sensitivity C.

  With ``basis`` the result is the k-vector of clipped coefficients;
  without, a pytree like ``params``.

  With a ``mesh`` the per-example section runs under ``jax.shard_map``:
  each device computes the clipped sum of ITS rows (microbatched locally)
  and a ``psum`` over ``data`` makes the global sum, replicated. Why not let
  GSPMD partition it: in jax 0.10.2 the SPMD partitioner returned wrong
  per-example kernel gradients for a vmapped convolution whose batch is
  sharded (a grouped convolution; only the first shard was right), while
  the explicit per-device program is exact. ``microbatch_size`` then
  applies per device and must divide the per-device batch.

  ``check_vma=False`` is REQUIRED for privacy here: with jax 0.10's default
  (varying-manual-axes checking on), ``jax.grad`` with respect to the
  replicated params inside ``shard_map`` psums the cotangent over ``data``,
  so each "per-example" gradient would be the sum of one example from
  every device, clipped together, then multiplied by the device count in
  the psum (tests/test_multidevice.py catches both).
  """
  transform = projector(basis)

  def local(params, batch, mask, threshold):
    return privacy.clipped_grad_sum(loss_fn, params, batch, threshold, mask,
                                    microbatch_size=microbatch_size,
                                    pre_clip_transform=transform)

  if mesh is None:
    return local(params, batch, mask, threshold)

  def sharded(params, batch, mask, threshold):
    total, stats = local(params, batch, mask, threshold)
    psum = functools.partial(jax.lax.psum, axis_name=parallel.DATA_AXIS)
    num = psum(stats.num_examples)
    return psum(total), clipping.ClipStats(
        num_examples=num, num_clipped=psum(stats.num_clipped),
        num_nonfinite=psum(stats.num_nonfinite),
        mean_norm=psum(stats.mean_norm * stats.num_examples) /
        jnp.maximum(num, 1))

  data, repl = P(parallel.DATA_AXIS), P()
  return jax.shard_map(sharded, mesh=mesh,
                       in_specs=(repl, data, data, repl),
                       out_specs=(repl, repl), check_vma=False)(
                           params, batch, mask, threshold)


# --- the step ----------------------------------------------------------------


def train_step(config: FullModelConfig, loss_fn: ExampleLoss,
               optimizer: optax.GradientTransformation, state: State,
               public: PublicSet, basis: Optional[jax.Array], x: jax.Array,
               y: jax.Array, mask: jax.Array, mesh: Optional[Mesh] = None
               ) -> tuple[State, Metrics]:
  """One private step on a padded batch (``mask``: 1 real, 0 padding). Pure."""
  params = state.params
  n_public = public.y.shape[0]
  flat_public = None
  if n_public and (config.adaptive_threshold or config.public_weight > 0):
    flat_public = public_flat_grads(loss_fn, params, public)
  threshold = public_threshold(config, flat_public, basis)
  noise_key, next_key = jax.random.split(state.key)
  total, stats = clipped_sum(loss_fn, params, (x, y), mask, threshold, basis,
                             config.microbatch_size, mesh)
  # Noise ONCE on the global (k- or P-dimensional) sum, then / (q N).
  noisy = privacy.privatize_sum(total, noise_key, threshold,
                                config.noise_multiplier,
                                config.expected_batch_size)
  flat_params, unravel = ravel_pytree(params)
  if basis is None:
    flat_grad = flatten(noisy)
  else:
    flat_grad = basis @ noisy
  if config.public_weight > 0 and flat_public is not None:
    flat_grad = ((1.0 - config.public_weight) * flat_grad +
                 config.public_weight * jnp.mean(flat_public, axis=0))
  if config.normalize_by_threshold:
    flat_grad = flat_grad / threshold
  grad = unravel(flat_grad.astype(flat_params.dtype))
  updates, opt_state = optimizer.update(grad, state.opt_state, params)
  new_state = State(params=optax.apply_updates(params, updates),
                    opt_state=opt_state, key=next_key, step=state.step + 1)
  return new_state, Metrics(threshold=threshold, batch_size=stats.num_examples,
                            num_clipped=stats.num_clipped,
                            num_nonfinite=stats.num_nonfinite)


@functools.lru_cache(maxsize=None)
def make_train_step(config: FullModelConfig, loss_fn: ExampleLoss,
                    optimizer: optax.GradientTransformation,
                    mesh: Optional[Mesh] = None) -> Callable:
  """``train_step`` jitted: (state, public, basis, x, y, mask) -> (state,
  metrics).

  With a mesh: x, y, mask sharded on ``data``; state, public and basis
  replicated; the state is donated. Cached per argument tuple.
  """
  fn = functools.partial(train_step, config, loss_fn, optimizer, mesh=mesh)
  if mesh is None:
    return jax.jit(fn, donate_argnums=(0,))
  repl, data = parallel.replicated_sharding(mesh), parallel.data_sharding(mesh)
  return jax.jit(fn, in_shardings=(repl, repl, repl, data, data, data),
                 out_shardings=(repl, repl), donate_argnums=(0,))


@functools.lru_cache(maxsize=None)
def _basis_fn(loss_fn: ExampleLoss, rank: int, mesh: Optional[Mesh]):
  fn = functools.partial(public_basis, loss_fn, rank=rank)
  if mesh is None:
    return jax.jit(fn)
  return jax.jit(fn, out_shardings=parallel.replicated_sharding(mesh))


def init_state(params: PyTree, optimizer: optax.GradientTransformation,
               key: jax.Array, mesh: Optional[Mesh] = None) -> State:
  """(params, optimizer state, noise key, step 0); replicated on ``mesh``."""
  params = jax.tree_util.tree_map(lambda p: np.asarray(p, np.float32), params)
  if mesh is None:
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return State(params=params, opt_state=optimizer.init(params),
                 key=key, step=jnp.zeros((), jnp.int32))
  params = parallel.replicate(params, mesh)
  opt_state = jax.jit(optimizer.init,
                      out_shardings=parallel.replicated_sharding(mesh))(params)
  return State(params=params, opt_state=opt_state,
               key=parallel.replicated_key(key, mesh),
               step=parallel.replicate(np.int32(0), mesh))


def place_public(x: np.ndarray, y: np.ndarray,
                 mesh: Optional[Mesh] = None) -> PublicSet:
  public = PublicSet(x=np.asarray(x, np.float32), y=np.asarray(y, np.int32))
  if mesh is None:
    return jax.tree_util.tree_map(jnp.asarray, public)
  return parallel.replicate(public, mesh)


def place_batch(x: np.ndarray, y: np.ndarray, mask: np.ndarray,
                mesh: Optional[Mesh] = None):
  arrays = (np.asarray(x, np.float32), np.asarray(y, np.int32),
            np.asarray(mask, np.float32))
  if mesh is None:
    return tuple(jnp.asarray(a) for a in arrays)
  return parallel.shard_batch(arrays, mesh)


# --- the loop ----------------------------------------------------------------


def train_full_model(loss_fn: ExampleLoss,
                     init_params: PyTree,
                     private_x: np.ndarray,
                     private_y: np.ndarray,
                     public_x: np.ndarray,
                     public_y: np.ndarray,
                     config: FullModelConfig,
                     optimizer: optax.GradientTransformation,
                     *,
                     steps: int,
                     sampling_rate: float,
                     ledger: privacy.PrivacyLedger,
                     coins: Optional[randomness.MechanismCoins] = None,
                     mesh: Optional[Mesh] = None,
                     on_step: Optional[Callable[[int, Metrics], None]] = None,
                     checkpointer: Optional[
                         checkpoint_lib.RunCheckpointer] = None,
                     fingerprint: Optional[dict] = None
                     ) -> PyTree:
  """Runs ``steps`` private steps of any model from ``init_params``.

  Host side: the Poisson sampler (padded to a multiple of the device count
  and the microbatch size), the budget guard (the whole run approved before
  the first step, each step checked before it is taken), the ledger record
  after each applied step. The private set stays on the host;
  each step ships its (sharded) batch.

  Args:
    loss_fn: per-example loss ``loss_fn(params, (x, y)) -> scalar`` (e.g.
      ``classification_loss(model)``).
    init_params: the starting parameters (e.g. the public model).
    private_x, private_y: the private set.
    public_x, public_y: the public set (may be empty; DP-SGD passes none).
    config: the step's hyperparameters.
    optimizer: any optax transformation (it sees the privatised gradient).
    steps, sampling_rate: T and the Poisson rate q.
    ledger: records each step; its target is enforced before starting and
      before each step.
    coins: the secret randomness of the sampler and the noise
      (``privacy.randomness``); None draws fresh OS entropy. A resumed run
      uses the coins in its checkpoint.
    mesh: data-parallel mesh (``parallel.make_data_mesh()``), or None.
    on_step: optional callback(step, metrics).
    checkpointer: saves (params, optimiser state, noise key, step, public
      basis) with the ledger every few steps and at the end; the run first
      resumes from its latest checkpoint (see ``train.checkpoint``).
    fingerprint: extra fields a checkpoint must match, on top of digests of
      the data and the start, the config, steps and q. Sharp edge: the
      optimiser's hyperparameters are closures and cannot be digested here:
      put them in ``fingerprint`` (the experiment passes its config).

  Returns:
    The final parameters (numpy leaves).
  """
  run_fingerprint = None
  if checkpointer is not None:
    run_fingerprint = {
        "private_data": checkpoint_lib.digest(private_x, private_y),
        "public_data": checkpoint_lib.digest(public_x, public_y),
        "init_params": checkpoint_lib.digest(
            *jax.tree_util.tree_leaves(init_params)),
        "config": repr(config), "steps": int(steps),
        "sampling_rate": float(sampling_rate),
        **(fingerprint or {})}
  # Padded sizes: a multiple of (devices x microbatch), so that every
  # device gets a whole number of microbatches.
  pad_multiple = (1 if mesh is None else mesh.size) * (
      config.microbatch_size or 1)
  coins = randomness.MechanismCoins.fresh() if coins is None else coins
  if mesh is not None:
    coins = parallel.share_coins(coins)
  private_x = np.asarray(private_x, np.float32)
  private_y = np.asarray(private_y, np.int32)
  public = place_public(public_x, public_y, mesh)
  state = init_state(init_params, optimizer, coins.noise_key(), mesh)
  step_fn = make_train_step(config, loss_fn, optimizer, mesh)
  use_basis = config.projection_rank > 0 and len(public_y) > 0
  refresh = lambda params: _basis_fn(loss_fn, config.projection_rank,
                                     mesh)(params, public)
  basis = refresh(state.params) if use_basis else None
  start = 0
  if checkpointer is not None:
    put = ((lambda a: jnp.asarray(a)) if mesh is None else
           (lambda a: parallel.replicate(a, mesh)))
    # The coins travel with the state (the only place they are written).
    restored = checkpointer.restore((state, basis), ledger, run_fingerprint,
                                    put=put)
    if restored is not None:
      start, (state, basis) = restored.step, restored.tree
      coins = restored.coins
  sampler = privacy.PoissonSampler(len(private_y), sampling_rate,
                                   coins.sampler_seed,
                                   pad_multiple=pad_multiple)
  ledger.approve(config.noise_multiplier, sampling_rate, steps - start)
  for t in range(start, steps):
    if use_basis and t % config.refresh_every == 0 and t:
      basis = refresh(state.params)
    batch = sampler.batch(t)
    x, y, mask = place_batch(private_x[batch.indices],
                             private_y[batch.indices], batch.mask, mesh)
    ledger.check_step(config.noise_multiplier, sampling_rate)
    state, metrics = step_fn(state, public, basis, x, y, mask)
    ledger.record(config.noise_multiplier, sampling_rate)
    if checkpointer is not None:
      checkpointer.maybe_save(t + 1, (state, basis), ledger, run_fingerprint,
                              force=t + 1 == steps, coins=coins)
    if on_step is not None:
      on_step(t, metrics)
  return jax.tree_util.tree_map(np.asarray, state.params)


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
