"""Full-model DP on 8 simulated devices: noise once, sensitivity, ledger.

* Invariant 2: the noise of the 8-device full-model step has std sigma * C,
  not sigma * C / sqrt(8) nor sigma * C * sqrt(8) (KS tests accept the
  right law and reject both wrong ones).
* Invariant 1 through a full model: a small CNN trained on digits with
  DP-SGD on 8 devices; neighbouring batches (one outlier example masked
  out) give clipped sums within C of each other, with and without the
  AdaMix projection, and a control fails without clipping.
* Invariant 5: the ledger records the steps the loop ran, within budget.

The step-equality tests (8 devices vs 1) are in tests/test_multidevice.py;
this file is separate to keep each file's run time short.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn import datasets

from adamix_jax import parallel
from adamix_jax.adamix import settings
from adamix_jax.adamix import transform
from adamix_jax.models import cnn
from adamix_jax.privacy import accounting
from adamix_jax.privacy import mechanism
from adamix_jax.privacy.randomness import MechanismCoins
from adamix_jax.privacy.sampler import PaddedBatch
from adamix_jax.train import full_model
from multidevice_helpers import assert_noise_std as _assert_noise_std
from multidevice_helpers import flat as _flat

SIGMA, CLIP = 1.3, 0.7
TINY_CNN = cnn.SmallCNN(channels=(4, 8), hidden=16)


def _digits_images():
  digits = datasets.load_digits()
  return ((digits.images / 16.0).astype(np.float32)[..., None],
          digits.target.astype(np.int64))


class _Wide(nn.Module):
  """~60k parameters: many noise coordinates, quick to compile."""

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(10)(nn.tanh(nn.Dense(900)(x)))


def test_multidevice_full_model_noise_std_is_sigma_c(meshes):
  """All-padding batch on 8 devices: the SGD(1) update is -noise/(qN), qN=1."""
  _, eight = meshes
  model = _Wide()
  x, y = _digits_images()
  params = model.init(jax.random.key(0), x[:1])["params"]
  config = settings.StepConfig(noise_multiplier=SIGMA, expected_batch_size=1.0,
                               clip_norm=CLIP, normalize_by_threshold=False)
  program = full_model.FullModelProgram(
      full_model.classification_loss(model), params, x[:64], y[:64], x[:0],
      y[:0], config, optax.sgd(1.0), steps=1, sampling_rate=0.5, mesh=eight)
  state = program.init(MechanismCoins.insecure_from_seed(11))
  new, metrics = program.step(0, state, PaddedBatch(
      indices=np.arange(64), mask=np.zeros(64, np.float32), size=0))
  assert int(metrics.batch_size) == 0
  _assert_noise_std(_flat(params) - _flat(new.params), SIGMA * CLIP)


def _tree_norm_diff(a, b) -> float:
  return float(np.linalg.norm(_flat(a) - _flat(b)))


def test_multidevice_cnn_digits_dp_sgd_sensitivity_and_ledger(meshes):
  _, eight = meshes
  x, y = _digits_images()
  loss_fn = full_model.classification_loss(TINY_CNN)
  params = TINY_CNN.init(jax.random.key(1), x[:1])["params"]
  private_x, private_y = x[100:500], y[100:500]
  steps, q, delta, target = 4, 0.1, 1e-5, 3.0
  sigma = accounting.calibrate_noise_multiplier(target, delta, q, steps)
  config = settings.StepConfig(noise_multiplier=sigma,
                               expected_batch_size=q * len(private_y),
                               clip_norm=CLIP)
  ledger = accounting.PrivacyLedger(delta, target)
  seen = []
  trained = full_model.train_full_model(
      loss_fn, params, private_x, private_y, x[:0], y[:0], config,
      optax.sgd(0.5), steps=steps, sampling_rate=q, ledger=ledger,
      coins=MechanismCoins.insecure_from_seed(0),
      mesh=eight, on_step=lambda t, m: seen.append(int(m.batch_size)))
  # Invariant 5: the ledger holds exactly the steps that ran, within budget.
  assert ledger.total_steps == steps == len(seen)
  assert all(s > 0 for s in seen)
  assert ledger.epsilon() <= target
  assert np.abs(_flat(trained) - _flat(params)).max() > 0
  # Invariant 1 through the trained CNN on 8 devices: a batch with an
  # outlier (huge gradient) and its neighbour without it (masked out).
  batch_x = private_x[:64].copy()
  batch_x[5] *= 1e3
  batch = (jnp.asarray(batch_x), jnp.asarray(private_y[:64], jnp.int32))
  with_x = np.ones(64, np.float32)
  without_x = with_x.copy()
  without_x[5] = 0.0
  public = parallel.replicate(
      (private_x[300:330], private_y[300:330].astype(np.int32)), eight)
  replicated = parallel.replicate(trained, eight)
  public_grads = jax.jit(lambda p, pub: jax.vmap(transform.flatten)(
      full_model.per_example.per_example_grads(loss_fn, p, pub)))(
          replicated, public)
  basis = transform.gradient_basis(public_grads, 6)
  sharded = lambda tree: parallel.shard_batch(
      jax.tree_util.tree_map(np.asarray, tree), eight)
  flags = settings.PerformanceFlags(microbatch_size=4)

  @jax.jit
  def clipped(params, batch, mask, clip, basis):
    make = full_model.contributions_fn(loss_fn, params, batch, flags, eight)
    return mechanism.clipped_sum(make(basis), clip, mask)

  for b in (None, basis):
    for clip, bounded in ((CLIP, True), (1e6, False)):
      sums = [clipped(replicated, sharded(batch), sharded(m),
                      jnp.float32(clip), b)[0]
              for m in (with_x, without_x)]
      if b is not None:  # the released parameter-space sums: V c
        sums = [np.asarray(b) @ np.asarray(s) for s in sums]
      diff = _tree_norm_diff(sums[0], sums[1])
      if bounded:
        assert diff <= clip * (1 + 1e-5), (b is not None, diff)
        assert diff > 0.5 * clip  # the outlier was clipped, not dropped
      else:  # control: without clipping the outlier moves the sum far more
        assert diff > 10 * CLIP, (b is not None, diff)
