"""DP class prototypes: a baseline of one Gaussian release.

The private class sums of the augmented features x~ = [x, 1] (their last
row is the class counts) are released ONCE through the one mechanism: each
example's contribution x~_i onehot(y_i)^T has norm ||x~_i|| = sqrt(2) after
the project's preprocessing (clipped at sqrt(2) all the same, so the bound
does not rest on the preprocessing), N(0, (sigma_1 sqrt(2))^2) is added to
every entry, and the sum is not divided (normaliser 1). The rest is
post-processing: the public class sums are added, each class sum is divided
by its (noisy) count, and an example is assigned to the nearest class mean,
a linear head: logits_c = x . m_c - ||m_c||^2 / 2.

The accounting is one full-batch Gaussian release (q = 1, T = 1) at the
noise multiplier sigma_1 calibrated for the whole (epsilon, delta).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from adamix_jax.adamix import linear_step
from adamix_jax.adamix import subspace as subspace_lib
from adamix_jax.data import validation
from adamix_jax.models import linear
from adamix_jax.privacy import accounting
from adamix_jax.privacy import mechanism
from adamix_jax.privacy import randomness
from adamix_jax.privacy import sampler as sampler_lib
from adamix_jax.train import checkpoint as checkpoint_lib
from adamix_jax.train import fit as fit_lib

CLIP_NORM = math.sqrt(2.0)


def _class_sums(x_aug, y, mask, key, noise_multiplier, num_classes):
  contributions = subspace_lib.OuterProducts.create(
      subspace_lib.identity(), x_aug, jax.nn.one_hot(y, num_classes))
  return mechanism.privatize(contributions, CLIP_NORM, mask, key,
                             noise_multiplier=noise_multiplier,
                             normalizer=1.0)


_class_sums_jit = jax.jit(_class_sums, static_argnums=(5,))


class PrototypesProgram:
  """The one-step program of DP class prototypes, as ``fit`` drives it."""

  sampling_rate = 1.0
  pad_multiple = 1

  def __init__(self, private_x, private_y, public_x, public_y,
               num_classes: int, noise_multiplier: float):
    dim = np.asarray(private_x).shape[1]
    anchor = linear.zeros(dim, num_classes)
    private_x, private_y, public_x, public_y = (
        validation.check_linear_head_inputs(private_x, private_y, public_x,
                                            public_y, anchor))
    self.x_aug = jnp.asarray(linear.augment(private_x))
    self.y = jnp.asarray(private_y, jnp.int32)
    self.public_sums = np.asarray(linear.augment(public_x), np.float64).T @ (
        np.eye(num_classes)[public_y])
    self.num_classes = num_classes
    self.noise_multiplier = float(noise_multiplier)
    self.num_examples = len(private_y)
    self.fingerprint = {
        "private_data": checkpoint_lib.digest(private_x, private_y),
        "public_data": checkpoint_lib.digest(public_x, public_y),
        "noise_multiplier": self.noise_multiplier}

  def share_coins(self, coins):
    return coins

  def put(self, array):
    return jnp.asarray(array)

  def init(self, coins: randomness.MechanismCoins):
    return (coins.noise_key(),
            jnp.zeros((self.x_aug.shape[1], self.num_classes), jnp.float32))

  def step(self, t: int, state, batch: sampler_lib.PaddedBatch):
    del t
    key, _ = state
    noise_key, next_key = jax.random.split(key)
    sums, stats = _class_sums_jit(self.x_aug[batch.indices],
                                  self.y[batch.indices],
                                  jnp.asarray(batch.mask), noise_key,
                                  jnp.float32(self.noise_multiplier),
                                  self.num_classes)
    return (next_key, sums), linear_step.StepMetrics(
        threshold=jnp.float32(CLIP_NORM), batch_size=stats.num_examples,
        num_clipped=stats.num_clipped, num_nonfinite=stats.num_nonfinite)

  def release(self, state) -> dict:
    sums = np.asarray(state[1], np.float64) + self.public_sums  # (D, c)
    counts = np.maximum(sums[-1], 1.0)
    means = sums[:-1] / counts  # (d, c): class means of x
    return {"kernel": means.astype(np.float32),
            "bias": (-0.5 * np.sum(means**2, axis=0)).astype(np.float32)}


def train_prototypes(private_x, private_y, public_x, public_y,
                     num_classes: int, *, noise_multiplier: float,
                     ledger: accounting.PrivacyLedger,
                     coins: Optional[randomness.MechanismCoins] = None
                     ) -> dict:
  """DP class prototypes as a linear head {"kernel", "bias"} (see the
  module doc); the ledger records one full-batch release."""
  program = PrototypesProgram(private_x, private_y, public_x, public_y,
                              num_classes, noise_multiplier)
  return fit_lib.fit(program, steps=1, ledger=ledger, coins=coins)
