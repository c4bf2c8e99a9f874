"""The one mechanism keeps its guarantees on every backend, one device or a mesh.

Each guarantee is checked once, parametrised over the backends that feed
``privacy.mechanism`` (materialised per-example gradients, with a pre-clip
projection, vmap on a model, microbatched, a shard-mapped batch on 8
devices, ghost norms (one device and shard-mapped), the ghost and JVP
projections, the linear head's closed forms in each subspace, the dual
form's kernel rows):

* invariant 1: neighbouring batches (one huge example added by its mask)
  give clipped sums within C of each other (a control without clipping
  fails), and each backend's sum equals the sum of explicitly clipped rows;
* padding rows contribute exactly zero, whatever they hold (NaN, inf, 1e30);
* a real row with NaN/inf is zeroed and counted, not propagated;
* invariant 2: the released noise is N(0, (sigma C)^2) per coordinate, added
  once per batch (not per example, not per device), divided by the fixed
  normaliser; KS tests reject 2/3 and 3/2 of the right scale.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from adamix_jax import parallel
from adamix_jax.adamix import linear_step
from adamix_jax.adamix import settings
from adamix_jax.adamix import subspace as subspace_lib
from adamix_jax.models import linear
from adamix_jax.privacy import ghost
from adamix_jax.privacy import mechanism
from adamix_jax.privacy import per_example
from adamix_jax.privacy import projection
from adamix_jax.train import linear_head
from multidevice_helpers import NUM_DEVICES

BATCH = 16  # a multiple of the 8 simulated devices and of the microbatches
DIM, CLASSES = 6, 4
RTOL = 1e-5


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(CLASSES)(nn.relu(nn.Dense(8)(x)))


_MODEL = _MLP()
_PARAMS = _MODEL.init(jax.random.key(0), jnp.zeros((DIM,)))


def _model_loss(params, example):
  x, y = example
  return optax.softmax_cross_entropy_with_integer_labels(
      _MODEL.apply(params, x), y)


def _flat_rows(tree) -> np.ndarray:
  leaves = jax.tree_util.tree_leaves(tree)
  return np.concatenate([np.asarray(x, np.float64).reshape(x.shape[0], -1)
                         for x in leaves], axis=1)


def _flat(tree) -> np.ndarray:
  return np.concatenate([np.asarray(x, np.float64).ravel()
                         for x in jax.tree_util.tree_leaves(tree)])


@dataclasses.dataclass(frozen=True)
class Backend:
  """How a batch (x (B, DIM), y (B,)) becomes contributions, and the same
  contributions as explicit rows (the reference)."""

  name: str
  make: Callable[[Any, Any], Any]  # (x, y) -> contributions
  rows: Callable[[Any, Any], np.ndarray]  # (x, y) -> (B, D) explicit
  mesh_devices: int = 0  # > 0: needs that many devices


def _public():
  rng = np.random.default_rng(1)
  x = linear.augment(jnp.asarray(rng.normal(size=(10, DIM)), jnp.float32))
  y = jnp.asarray(rng.integers(0, CLASSES, 10), jnp.int32)
  return linear_step.make_public_data(x, y)


_MATRIX = jnp.asarray(0.4 * np.random.default_rng(2).normal(
    size=(DIM + 1, CLASSES)), jnp.float32)


def _linear_subspace(kind: str):
  spec = settings.SubspaceSpec(kind, {"none": 0, "features": 3,
                                      "gradients": 5}[kind])
  return linear_head.initial_subspace(spec, _MATRIX, _public())


def _linear_backend(kind: str, path: str = "closed_form",
                    kernel: bool = False) -> Backend:
  subspace = _linear_subspace(kind)
  flags = settings.PerformanceFlags(path=path)

  def make(x, y):
    x_aug = linear.augment(x)
    if kernel:
      rows = x_aug @ subspace.public_x.T
      e = linear.residuals(_MATRIX, x_aug, y)
      return subspace_lib.closed_form_contributions(subspace, None, e, rows)
    return linear_step.matrix_contributions(subspace, _MATRIX, x_aug, y,
                                            flags)

  def rows(x, y):
    x_aug = linear.augment(jnp.asarray(x))
    grads = per_example.per_example_grads(
        linear_step._matrix_example_loss, _MATRIX,  # pylint: disable=protected-access
        (x_aug, jnp.asarray(y), jnp.zeros((len(y), CLASSES), jnp.float32)))
    return _flat_rows(jax.vmap(lambda g: subspace_lib.coefficients_of(
        subspace, g))(grads))

  suffix = {True: "_kernel_rows", False: ""}[kernel]
  return Backend(f"linear_{kind}_{path}{suffix}", make, rows)


def _model_rows(x, y):
  return _flat_rows(per_example.per_example_grads(_model_loss, _PARAMS, (x, y)))


_PROJECTION = jnp.asarray(np.linalg.qr(np.random.default_rng(3).normal(
    size=(_flat(_PARAMS).size, 7)))[0], jnp.float32)


def _project(g):
  return jax.flatten_util.ravel_pytree(g)[0] @ _PROJECTION


def _sharded(x, y):
  mesh = parallel.make_data_mesh(NUM_DEVICES)
  local = lambda batch, params: per_example.vmap_contributions(
      _model_loss, params, batch)
  return mechanism.ShardMapped(make=local, batch=(x, y), replicated=_PARAMS,
                               mesh=mesh)


def _ghost(x, y):
  return ghost.capture(_MODEL, _PARAMS["params"], (x, y))


def _sharded_ghost(x, y):
  mesh = parallel.make_data_mesh(NUM_DEVICES)
  local = lambda batch, params: ghost.capture(_MODEL, params, batch)
  return mechanism.ShardMapped(make=local, batch=(x, y),
                               replicated=_PARAMS["params"], mesh=mesh)


def _projected_rows(x, y):
  return _model_rows(x, y) @ np.asarray(_PROJECTION, np.float64)


BACKENDS = [
    Backend("per_example_grads", lambda x, y: per_example.PerExampleGradients
            .create(per_example.per_example_grads(_model_loss, _PARAMS,
                                                  (x, y))), _model_rows),
    Backend("projected_before_clipping", lambda x, y: per_example
            .vmap_contributions(_model_loss, _PARAMS, (x, y), _project),
            _projected_rows),
    Backend("microbatched", lambda x, y: per_example.vmap_contributions(
        _model_loss, _PARAMS, (x, y), microbatch_size=4), _model_rows),
    Backend("shard_mapped_8_devices", _sharded, _model_rows,
            mesh_devices=NUM_DEVICES),
    Backend("ghost_norms", _ghost, _model_rows),
    Backend("ghost_shard_mapped_8_devices", _sharded_ghost, _model_rows,
            mesh_devices=NUM_DEVICES),
    Backend("ghost_projection", lambda x, y: per_example.PerExampleGradients
            .create(_ghost(x, y).project(_PROJECTION)), _projected_rows),
    Backend("jvp_projection", lambda x, y: per_example.PerExampleGradients
            .create(projection.jvp_coefficients(_model_loss, _PARAMS, (x, y),
                                                _PROJECTION)),
            _projected_rows),
    _linear_backend("none"),
    _linear_backend("features"),
    _linear_backend("gradients"),
    _linear_backend("gradients", kernel=True),
    _linear_backend("gradients", path="vmap"),
]
IDS = [b.name for b in BACKENDS]


def _needs_devices(backend: Backend) -> None:
  if backend.mesh_devices and jax.device_count() < backend.mesh_devices:
    pytest.skip(f"needs {backend.mesh_devices} devices (conftest XLA_FLAGS)")


def _batch(seed: int = 0, huge_row: int = None):
  """Rows with norms spread over 2.5 decades; optionally one huge row."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(BATCH, DIM)) * np.logspace(-1, 1.5, BATCH)[:, None]
  if huge_row is not None:
    x[huge_row] = 1e3 * rng.normal(size=DIM)
  y = rng.integers(0, CLASSES, BATCH)
  return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)


@functools.lru_cache(maxsize=None)
def _clipped_sum_fn(index: int):
  backend = BACKENDS[index]
  return jax.jit(lambda x, y, c, mask: mechanism.clipped_sum(
      backend.make(x, y), c, mask))


def _clipped_sum(backend, x, y, clip_norm, mask):
  total, stats_ = _clipped_sum_fn(BACKENDS.index(backend))(
      x, y, jnp.float32(clip_norm), jnp.asarray(mask, jnp.float32))
  return _flat(total), stats_


def _median_norm(backend, x, y, mask) -> float:
  norms = np.linalg.norm(backend.rows(x, y), axis=1)
  return float(np.median(norms[np.asarray(mask) > 0]))


@pytest.mark.parametrize("backend", BACKENDS, ids=IDS)
def test_mechanism_sensitivity_within_clip_norm_on_every_backend(backend):
  _needs_devices(backend)
  x, y = _batch(huge_row=BATCH - 1)
  without = np.ones(BATCH, np.float32)
  without[BATCH - 1] = 0.0
  with_ = np.ones(BATCH, np.float32)
  c = _median_norm(backend, x, y, without)
  sum_d, stats_d = _clipped_sum(backend, x, y, c, without)
  sum_dp, stats_dp = _clipped_sum(backend, x, y, c, with_)
  assert int(stats_d.num_examples) == BATCH - 1
  assert int(stats_dp.num_examples) == BATCH
  assert 0 < int(stats_d.num_clipped) < BATCH - 1  # a real mix
  diff = np.linalg.norm(sum_dp - sum_d)
  assert diff <= c * (1 + RTOL) + 1e-6, (diff, c)
  assert diff >= 0.99 * c  # the huge example was clipped to exactly C
  # The backend's sum is the sum of the explicitly clipped rows.
  rows = backend.rows(x, y)
  norms = np.linalg.norm(rows, axis=1)
  scales = np.minimum(1.0, c / np.maximum(norms, 1e-30)) * with_
  np.testing.assert_allclose(sum_dp, scales @ rows, rtol=1e-4,
                             atol=1e-5 * max(1.0, c))
  # Control: without clipping the same neighbours differ by far more.
  raw_d, _ = _clipped_sum(backend, x, y, np.inf, without)
  raw_dp, _ = _clipped_sum(backend, x, y, np.inf, with_)
  assert np.linalg.norm(raw_dp - raw_d) > 10 * c


@pytest.mark.parametrize("backend", BACKENDS, ids=IDS)
def test_mechanism_padding_rows_contribute_exactly_zero(backend):
  _needs_devices(backend)
  x, y = _batch(seed=1)
  mask = np.ones(BATCH, np.float32)
  pad = [3, 7, 8, 12, 13, 15]
  mask[pad] = 0.0
  junk = np.asarray(x).copy()
  for row, value in zip(pad, (np.nan, np.inf, -np.inf, 1e30, -3e38, 1e15)):
    junk[row] = value
  zeros = np.asarray(x).copy()
  zeros[pad] = 0.0
  c = _median_norm(backend, x, y, mask)
  total, stats_ = _clipped_sum(backend, jnp.asarray(junk), y, c, mask)
  reference, _ = _clipped_sum(backend, jnp.asarray(zeros), y, c, mask)
  assert np.all(np.isfinite(total))
  np.testing.assert_allclose(total, reference, rtol=1e-6, atol=1e-7)
  assert int(stats_.num_examples) == BATCH - len(pad)
  assert int(stats_.num_nonfinite) == 0  # padding is not counted


@pytest.mark.parametrize("backend", BACKENDS, ids=IDS)
def test_mechanism_nonfinite_real_row_is_zeroed_and_counted(backend):
  _needs_devices(backend)
  x, y = _batch(seed=2)
  mask = np.ones(BATCH, np.float32)
  c = _median_norm(backend, x, y, mask)
  without = mask.copy()
  without[5] = 0.0
  reference, _ = _clipped_sum(backend, x, y, c, without)
  for bad in (np.nan, np.inf):
    poisoned = np.asarray(x).copy()
    poisoned[5] = bad
    total, stats_ = _clipped_sum(backend, jnp.asarray(poisoned), y, c, mask)
    assert np.all(np.isfinite(total)), bad
    assert int(stats_.num_nonfinite) == 1, bad
    assert int(stats_.num_examples) == BATCH
    np.testing.assert_allclose(total, reference, rtol=1e-6, atol=1e-6)


def _ks(samples: np.ndarray, std: float) -> float:
  return float(stats.kstest(samples / std, "norm").pvalue)


@pytest.mark.parametrize("backend", BACKENDS, ids=IDS)
def test_mechanism_noise_is_sigma_c_once_over_normalizer(backend):
  _needs_devices(backend)
  sigma, c, normalizer = 1.3, 0.7, 2.5
  x, y = _batch(seed=3)

  def release(mask, key):
    return mechanism.privatize(backend.make(x, y), c, mask, key,
                               noise_multiplier=sigma,
                               normalizer=normalizer)[0]

  many = jax.jit(jax.vmap(release, in_axes=(None, 0)))
  keys = jax.random.split(jax.random.key(4), 1000)
  # All padding: the release is pure noise / normaliser.
  samples = _flat_rows(many(jnp.zeros(BATCH), keys)).ravel() * normalizer
  std = sigma * c
  assert samples.size >= 5000
  assert _ks(samples, std) > 1e-3
  for wrong in (2 / 3 * std, 3 / 2 * std):
    assert _ks(samples, wrong) < 1e-6
  # With every row real the noise around the clipped sum is the same: once
  # per batch, not once per example (which would be sqrt(16) = 4x larger).
  clean, _ = _clipped_sum(backend, x, y, c, np.ones(BATCH))
  noisy = _flat_rows(many(jnp.ones(BATCH), keys))
  residual = (noisy * normalizer - clean[None, :]).ravel()
  assert _ks(residual, std) > 1e-3
  assert _ks(residual, 2 * std) < 1e-6
