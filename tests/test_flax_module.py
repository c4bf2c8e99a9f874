"""AdaMix as a Flax/optax component, for a user's own linen model.

* The README's "AdaMix on your own Flax model" block runs as written, spends
  at most its epsilon and beats chance by far.
* ``adamix.transform.adamix`` is an optax transformation: chained with SGD
  inside ``PrivateTrainState.private_step`` (jitted) it gives the same update
  as the full-model trainer's step with the same key, refreshes its public
  basis every ``refresh_every`` updates, and its released gradient is the
  mechanism's (sigma = 0: the mapped-back clipped mean).
"""

from __future__ import annotations

import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adamix_jax.adamix import settings
from adamix_jax.adamix import train_state as train_state_lib
from adamix_jax.adamix import transform
from adamix_jax.privacy import per_example
from adamix_jax.privacy.randomness import MechanismCoins
from adamix_jax.privacy.sampler import PaddedBatch
from adamix_jax.train import full_model

README = os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")


def _flax_block() -> str:
  with open(README) as f:
    text = f.read()
  section = text[text.index("## AdaMix on your own Flax model"):]
  return re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]


def test_flax_module_readme_block_runs_within_budget(capsys):
  block = _flax_block()
  assert len(block.strip().splitlines()) <= 25
  namespace = {}
  exec(compile(block, "README.md Flax block", "exec"), namespace)
  ledger = namespace["ledger"]
  assert 0 < ledger.epsilon() <= 3.0
  assert ledger.total_steps == 200
  assert namespace["accuracy"] > 0.6  # chance is 1/3
  assert "epsilon spent" in capsys.readouterr().out


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Dense(16)(x)))


def _problem():
  rng = np.random.default_rng(0)
  y = rng.integers(0, 3, 64)
  x = (rng.normal(size=(64, 8)) + 2 * np.eye(8)[y]).astype(np.float32)
  return x, y.astype(np.int32)


def test_flax_module_train_state_step_equals_trainer_step():
  model = _MLP()
  x, y = _problem()
  params = model.init(jax.random.key(1), x[:1])["params"]
  config = settings.StepConfig(noise_multiplier=0.9, expected_batch_size=20.0,
                               adaptive_threshold=True, public_weight=0.2)
  coins = MechanismCoins.insecure_from_seed(4)
  mask = (np.arange(48) < 41).astype(np.float32)
  public = (jnp.asarray(x[48:]), jnp.asarray(y[48:]))
  # The user's way: their own TrainState and jitted step.
  tx = optax.chain(transform.adamix(config, key=coins.noise_key(), rank=4,
                                    refresh_every=2), optax.sgd(0.3))
  state = train_state_lib.PrivateTrainState.create(
      apply_fn=model.apply, params=params, tx=tx)
  step = jax.jit(lambda s, b, m, p: s.private_step(b, m, p))
  batch = (jnp.asarray(x[:48]), jnp.asarray(y[:48]))
  users = [state]
  for _ in range(3):
    users.append(step(users[-1], batch, jnp.asarray(mask), public))
  # The trainer's way: the same steps through FullModelProgram.
  program = full_model.FullModelProgram(
      full_model.classification_loss(model), params, x[:48], y[:48], x[48:],
      y[48:], config, optax.sgd(0.3), steps=3, sampling_rate=0.5,
      subspace=settings.SubspaceSpec("gradients", 4, refresh_every=2))
  ours = program.init(coins)
  padded = PaddedBatch(indices=np.arange(48), mask=mask, size=41)
  for t in range(3):
    ours, metrics = program.step(t, ours, padded)
    np.testing.assert_allclose(transform.flatten(ours.params),
                               transform.flatten(users[t + 1].params),
                               rtol=1e-5, atol=1e-6)
  assert int(metrics.batch_size) == 41
  # The basis was refreshed at updates 0 and 2 (not 1): it moved at 2.
  basis = [np.asarray(transform.find_state(s.opt_state).basis)
           for s in users[1:]]
  np.testing.assert_array_equal(basis[0], basis[1])
  assert np.abs(basis[2] - basis[1]).max() > 1e-4
  assert float(users[-1].threshold) > 0


def test_flax_module_transform_releases_the_clipped_projected_mean():
  """sigma = 0: the update is -lr V (sum of clipped V^T g_i) / (q N) / C,
  with C the median public norm in V (no public mixing)."""
  model = _MLP()
  x, y = _problem()
  params = model.init(jax.random.key(2), x[:1])["params"]
  loss = train_state_lib.classification_loss(model.apply)
  config = settings.StepConfig(noise_multiplier=0.0, expected_batch_size=8.0,
                               adaptive_threshold=True)
  tx = transform.adamix(config, key=jax.random.key(0), rank=3)
  grads = per_example.per_example_grads(loss, params, (x[:16], y[:16]))
  public = per_example.per_example_grads(loss, params, (x[48:], y[48:]))
  mask = jnp.ones(16)
  updates, state = tx.update(grads, tx.init(params), params, mask=mask,
                             public_grads=public)
  flat_public = np.asarray(jax.vmap(transform.flatten)(public), np.float64)
  basis = np.asarray(transform.gradient_basis(jnp.asarray(flat_public,
                                                          jnp.float32), 3))
  c = np.median(np.linalg.norm(flat_public @ basis, axis=1))
  assert float(state.threshold) == pytest.approx(c, rel=1e-5)
  coefficients = np.asarray(jax.vmap(transform.flatten)(grads)) @ basis
  norms = np.linalg.norm(coefficients, axis=1)
  clipped = coefficients * np.minimum(1, c / norms)[:, None]
  want = basis @ clipped.sum(0) / 8.0 / c
  np.testing.assert_allclose(transform.flatten(updates), want, rtol=1e-4,
                             atol=1e-6)
  # Teeth: without clipping the update would differ.
  assert np.abs(basis @ coefficients.sum(0) / 8.0 / c - want).max() > 1e-3
