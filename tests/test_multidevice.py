"""Data parallelism keeps the privacy invariants (8 simulated CPU devices).

* The same private step (linear-head AdaMix; full-model DP-SGD and AdaMix on
  a small CNN) on 8 devices and on 1 device, with the same key and batch,
  gives the same update: the clipped sum over a sharded batch is the global
  sum, and the noise is the same draw.
* Invariant 2: the noise on the 8-device linear-head step has std
  sigma * C, not sigma * C / sqrt(8) (noise split over devices) nor
  sigma * C * sqrt(8) (noise added once per device); Kolmogorov-Smirnov
  tests accept the right law and reject both wrong ones.

The full-model noise, sensitivity and ledger tests are in
tests/test_multidevice_full_model.py (kept apart for run time).

tests/conftest.py sets XLA_FLAGS=--xla_force_host_platform_device_count=8
before jax is imported.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn import datasets

from adamix_jax.adamix import settings
from adamix_jax.models import cnn
from adamix_jax.models import linear
from adamix_jax.privacy import accounting
from adamix_jax.privacy.randomness import MechanismCoins
from adamix_jax.privacy.sampler import PaddedBatch
from adamix_jax.train import full_model
from adamix_jax.train import linear_head
from multidevice_helpers import assert_noise_std as _assert_noise_std
from multidevice_helpers import flat as _flat

ATOL = 1e-5
SIGMA, CLIP = 1.3, 0.7


# --- the linear head (step.train_step under jit + NamedSharding) -------------


def _linear_problem(seed=0, n=300, d=16, c=4, n_pub=20):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, c, n)
  x = rng.normal(size=(n, d)).astype(np.float32) + 2 * np.eye(c, d)[y]
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  yp = rng.integers(0, c, n_pub)
  xp = rng.normal(size=(n_pub, d)).astype(np.float32) + 2 * np.eye(c, d)[yp]
  xp /= np.linalg.norm(xp, axis=1, keepdims=True)
  w0 = {"kernel": 0.1 * rng.normal(size=(d, c)).astype(np.float32),
        "bias": np.zeros(c, np.float32)}
  return x, y, xp, yp, w0


def _linear_step(mesh, config, spec, x, y, xp, yp, w0, indices, mask,
                 flags=settings.PerformanceFlags()):
  """One step of the linear-head program on ``mesh``; returns W~_1."""
  program = linear_head.LinearHeadProgram(
      x, y, xp, yp, w0, config, steps=1, sampling_rate=0.5, subspace=spec,
      flags=flags, mesh=mesh)
  state = program.init(MechanismCoins.insecure_from_seed(3))
  batch = PaddedBatch(indices=indices, mask=mask, size=int(mask.sum()))
  (head, _), metrics = program.step(0, state, batch)
  return np.asarray(head.matrix), metrics


@pytest.mark.parametrize("path", ["closed_form", "vmap"])
def test_multidevice_linear_adamix_step_matches_single_device(meshes, path):
  one, eight = meshes
  x, y, xp, yp, w0 = _linear_problem()
  config = settings.StepConfig(
      noise_multiplier=SIGMA, expected_batch_size=40.0, learning_rate=1.0,
      adaptive_threshold=True, public_weight=0.1, pull=0.01)
  flags = settings.PerformanceFlags(path=path, representation="matrix")
  spec = settings.SubspaceSpec("gradients", 6)
  rng = np.random.default_rng(1)
  indices = np.zeros(64, np.int64)
  indices[:57] = rng.choice(len(y), 57, replace=False)
  mask = (np.arange(64) < 57).astype(np.float32)
  w_one, m_one = _linear_step(one, config, spec, x, y, xp, yp, w0, indices,
                              mask, flags)
  w_eight, m_eight = _linear_step(eight, config, spec, x, y, xp, yp, w0,
                                  indices, mask, flags)
  start = np.asarray(linear.stack(w0))
  assert np.abs(w_one - start).max() > 1e-3  # the step did something
  np.testing.assert_allclose(w_eight, w_one, atol=ATOL)
  assert int(m_eight.batch_size) == int(m_one.batch_size) == 57
  assert int(m_eight.num_clipped) == int(m_one.num_clipped)
  assert float(m_eight.threshold) == pytest.approx(float(m_one.threshold))


@pytest.mark.parametrize("method,cache_kernel", [("eigh", False),
                                                 ("iterative", True)])
def test_multidevice_train_private_head_sharded_matches_single_device(
    meshes, method, cache_kernel):
  """The whole loop: same sampler indices, same noise; only padding differs."""
  _, eight = meshes
  x, y, xp, yp, w0 = _linear_problem(n=203)
  config = settings.StepConfig(noise_multiplier=SIGMA,
                               expected_batch_size=0.3 * 203,
                               learning_rate=1.0, adaptive_threshold=True)
  kwargs = dict(steps=6, sampling_rate=0.3, average_tail=0.5,
                coins=MechanismCoins.insecure_from_seed(5),
                lr_schedule="cosine",
                subspace=settings.SubspaceSpec("gradients", 5, 2,
                                               method=method),
                flags=settings.PerformanceFlags(
                    representation="matrix",
                    cache_private_kernel=cache_kernel))
  ledgers = [accounting.PrivacyLedger(1e-5) for _ in range(2)]
  single = linear_head.train_private_head(x, y, xp, yp, w0, config,
                                          ledger=ledgers[0], **kwargs)
  sharded = linear_head.train_private_head(x, y, xp, yp, w0, config,
                                           ledger=ledgers[1], mesh=eight,
                                           **kwargs)
  for key in ("kernel", "bias"):
    np.testing.assert_allclose(sharded[key], single[key], atol=ATOL)
  assert ledgers[0].total_steps == ledgers[1].total_steps == 6


def test_multidevice_linear_noise_std_is_sigma_c(meshes):
  """All-padding batch on 8 devices: W~_1 - W~_0 is the noise alone."""
  _, eight = meshes
  d, c = 499, 100  # (d+1) * c = 50,000 noise coordinates
  config = settings.StepConfig(noise_multiplier=SIGMA, expected_batch_size=1.0,
                               learning_rate=1.0, clip_norm=CLIP,
                               normalize_by_threshold=False)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, d)).astype(np.float32)
  w0 = {"kernel": np.zeros((d, c), np.float32),
        "bias": np.zeros(c, np.float32)}
  no_labels = np.zeros(0, np.int64)
  w1, metrics = _linear_step(eight, config, settings.SubspaceSpec(),
                             x, np.zeros(64, np.int64), x[:0], no_labels,
                             w0, np.arange(64), np.zeros(64, np.float32))
  assert int(metrics.batch_size) == 0
  _assert_noise_std(-w1.ravel(), SIGMA * CLIP)


# --- the full model (shard_map per-example section + jit) --------------------


def _digits_images():
  digits = datasets.load_digits()
  return ((digits.images / 16.0).astype(np.float32)[..., None],
          digits.target.astype(np.int64))


TINY_CNN = cnn.SmallCNN(channels=(4, 8), hidden=16)


def _cnn_step(mesh, config, subspace, flags, optimizer, params, public,
              batch, model=None):
  x, y, mask = batch
  program = full_model.FullModelProgram(
      full_model.classification_loss(TINY_CNN), params, x, y, *public, config,
      optimizer, steps=1, sampling_rate=0.5, subspace=subspace, flags=flags,
      mesh=mesh, model=model)
  state = program.init(MechanismCoins.insecure_from_seed(7))
  padded = PaddedBatch(indices=np.arange(len(y)), mask=mask,
                       size=int(mask.sum()))
  state, metrics = program.step(0, state, padded)
  return _flat(state.params), metrics


@pytest.mark.parametrize("method", ["dp_sgd", "adamix", "dp_sgd_ghost",
                                    "adamix_ghost"])
def test_multidevice_full_model_step_matches_single_device(meshes, method):
  one, eight = meshes
  x, y = _digits_images()
  params = TINY_CNN.init(jax.random.key(0), x[:1])["params"]
  optimizer = optax.sgd(0.5)
  batch_size, real = 64, 59
  mask = (np.arange(batch_size) < real).astype(np.float32)
  batch = (x[100:100 + batch_size], y[100:100 + batch_size], mask)
  public = (x[:30], y[:30])
  flags = settings.PerformanceFlags()
  subspace = settings.SubspaceSpec()
  # ghost: norms and sums (and AdaMix's coefficients) from the ghost capture
  # inside each device's shard_map, no per-example gradients.
  model = TINY_CNN if method.endswith("ghost") else None
  method = method.replace("_ghost", "")
  if method == "dp_sgd":
    config = settings.StepConfig(noise_multiplier=SIGMA,
                                 expected_batch_size=60.0, clip_norm=0.5,
                                 normalize_by_threshold=False)
    public = (x[:0], y[:0])
  else:  # projection, adaptive threshold, public gradient, microbatches
    config = settings.StepConfig(
        noise_multiplier=SIGMA, expected_batch_size=60.0,
        adaptive_threshold=True, public_weight=0.1,
        normalize_by_threshold=True)
    subspace = settings.SubspaceSpec("gradients", 8)
    flags = settings.PerformanceFlags(microbatch_size=4)
  run = lambda mesh: _cnn_step(mesh, config, subspace, flags, optimizer,
                               params, public, batch, model)
  p_one, m_one = run(one)
  p_eight, m_eight = run(eight)
  assert np.abs(p_one - _flat(params)).max() > 1e-3
  np.testing.assert_allclose(p_eight, p_one, atol=ATOL)
  if method == "adamix":  # and the plain-jit path (no mesh, no shard_map)
    p_none, _ = run(None)
    np.testing.assert_allclose(p_none, p_one, atol=ATOL)
  assert int(m_eight.batch_size) == int(m_one.batch_size) == real
  assert int(m_eight.num_clipped) == int(m_one.num_clipped) > 0
