"""Invariant 2 (docs/design.md): N(0, (sigma C)^2) added ONCE to the global sum.

The released gradient is (clipped sum + N(0, (sigma C)^2 I)) / normalizer:
its noise has standard deviation sigma * C / normalizer, never
sigma * C / sqrt(B) (noise per example) nor sigma * C (noise scaled for a
mean). Kolmogorov-Smirnov tests accept the right law and reject 2/3 and 3/2
of its scale, so a wrong sigma fails them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from adamix_jax import privacy

SIGMA = 1.3
CLIP = 0.7


def _zeros_tree(batch=None):
  lead = () if batch is None else (batch,)
  return {"w": jnp.zeros(lead + (100, 120), jnp.float32),
          "b": jnp.zeros(lead + (60,), jnp.float32),
          "c": jnp.zeros(lead + (40, 7, 3), jnp.float32)}


def _flat(tree) -> np.ndarray:
  return np.concatenate([np.asarray(x, np.float64).ravel()
                         for x in jax.tree_util.tree_leaves(tree)])


def _privatized_zeros(tree, key, clip_norm, noise_multiplier, normalizer):
  """The mechanism's release for a batch whose clipped sum is ``tree``-shaped
  zeros (one all-padding example): pure noise / normalizer."""
  one = jax.tree_util.tree_map(lambda x: x[None], tree)
  released, _ = privacy.privatize(
      privacy.PerExampleGradients.create(one), clip_norm, jnp.zeros(1), key,
      noise_multiplier=noise_multiplier, normalizer=normalizer)
  return released


def _ks_pvalue(samples: np.ndarray, std: float) -> float:
  return float(stats.kstest(samples / std, "norm").pvalue)


def test_noise_privatize_sum_is_gaussian_with_std_sigma_c():
  noisy = _privatized_zeros(_zeros_tree(), jax.random.key(11), CLIP, SIGMA,
                            normalizer=1.0)
  samples = _flat(noisy)
  assert samples.size == 12_000 + 60 + 840
  std = SIGMA * CLIP
  assert _ks_pvalue(samples, std) > 0.01
  assert abs(samples.mean()) < 5 * std / np.sqrt(samples.size)
  # The test has teeth: the law at 2/3 or 3/2 of the scale is rejected ...
  assert _ks_pvalue(samples, std * 2 / 3) < 1e-6
  assert _ks_pvalue(samples, std * 3 / 2) < 1e-6
  # ... and so is an engine that used 2/3 or 3/2 of the right sigma.
  for factor in (2 / 3, 3 / 2):
    wrong = _privatized_zeros(_zeros_tree(), jax.random.key(11), CLIP,
                              SIGMA * factor, normalizer=1.0)
    assert _ks_pvalue(_flat(wrong), std) < 1e-6


def test_noise_dp_aggregate_std_is_sigma_c_over_normalizer():
  """Noise once on the SUM, then divided by the fixed normaliser."""
  padded, real = 20, 16
  normalizer = float(real)
  mask = jnp.asarray([1.0] * real + [0.0] * (padded - real))
  tx = privacy.dp_aggregate(CLIP, SIGMA, normalizer, jax.random.key(5))
  per_example = _zeros_tree(batch=padded)
  out, _ = jax.jit(tx.update)(per_example, tx.init(None), mask=mask)
  samples = _flat(out)
  right = SIGMA * CLIP / normalizer
  assert _ks_pvalue(samples, right) > 0.01
  assert samples.std() == pytest.approx(right, rel=0.03)
  # Wrong placements of the noise, all rejected:
  wrong = {
      "per-example noise, then mean": SIGMA * CLIP / np.sqrt(real),
      "noise scaled for a mean, added after dividing": SIGMA * CLIP,
      "2/3 sigma": right * 2 / 3,
      "3/2 sigma": right * 3 / 2,
  }
  for name, std in wrong.items():
    assert _ks_pvalue(samples, std) < 1e-6, name


def test_noise_added_once_independent_of_batch_size():
  """Same key: the noise is the same whatever B is (not one draw per example)."""
  rng = np.random.default_rng(0)
  grads = {"w": jnp.asarray(rng.normal(size=(32, 50)), jnp.float32),
           "b": jnp.asarray(rng.normal(size=(32, 3)), jnp.float32)}
  normalizer = 10.0
  key = jax.random.key(7)
  noises = []
  clipped_sum = jax.jit(privacy.clipped_sum)
  for real in (0, 1, 5, 32):
    mask = jnp.asarray([1.0] * real + [0.0] * (32 - real))
    tx = privacy.dp_aggregate(CLIP, SIGMA, normalizer, key)
    out, _ = jax.jit(tx.update)(grads, tx.init(None), mask=mask)
    total, _ = clipped_sum(grads, CLIP, mask)
    noise = jax.tree_util.tree_map(lambda o, t: o * normalizer - t, out, total)
    noises.append(_flat(noise))
  for other in noises[1:]:
    np.testing.assert_allclose(other, noises[0], rtol=1e-4, atol=1e-5)
  # An empty batch (all padding) releases pure noise of the full scale.
  assert noises[0].std() == pytest.approx(SIGMA * CLIP, rel=0.2)


def test_noise_leaves_get_independent_draws():
  tree = {"a": jnp.zeros((4000,)), "b": jnp.zeros((4000,))}
  noisy = _privatized_zeros(tree, jax.random.key(0), 1.0, 1.0, 1.0)
  a, b = np.asarray(noisy["a"]), np.asarray(noisy["b"])
  assert not np.allclose(a, b)
  assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(4000)


def test_noise_successive_steps_differ_and_key_advances():
  tx = privacy.dp_aggregate(CLIP, SIGMA, 4.0, jax.random.key(3))
  grads = {"w": jnp.zeros((4, 500))}
  state = tx.init(None)
  keys, outs = [], []
  for step in range(3):
    keys.append(np.asarray(jax.random.key_data(state.noise_key)))
    out, state = tx.update(grads, state)
    outs.append(np.asarray(out["w"]))
    assert int(state.steps) == step + 1
  keys.append(np.asarray(jax.random.key_data(state.noise_key)))
  for i in range(len(keys)):
    for j in range(i + 1, len(keys)):
      assert not np.array_equal(keys[i], keys[j])
  for i in range(3):
    for j in range(i + 1, 3):
      assert abs(np.corrcoef(outs[i], outs[j])[0, 1]) < 5 / np.sqrt(500)
  # The key that noised a step is never the key carried on to the next.
  first_noise_key, next_key = jax.random.split(jax.random.key(3))
  np.testing.assert_array_equal(jax.random.key_data(next_key), keys[1])
  assert not np.array_equal(jax.random.key_data(first_noise_key), keys[1])


def test_noise_same_key_reproduces_same_noise():
  grads = {"w": jnp.ones((3, 200)), "b": jnp.ones((3, 2))}
  runs = []
  for _ in range(2):
    tx = privacy.dp_aggregate(CLIP, SIGMA, 3.0, jax.random.key(42))
    state = tx.init(None)
    outs = []
    for _ in range(2):
      out, state = tx.update(grads, state)
      outs.append(_flat(out))
    runs.append(outs)
  for a, b in zip(*runs):
    np.testing.assert_array_equal(a, b)
  other = privacy.dp_aggregate(CLIP, SIGMA, 3.0, jax.random.key(43))
  out, _ = other.update(grads, other.init(None))
  assert not np.allclose(_flat(out), runs[0][0])
  # The legacy uint32 key works too and is just as deterministic.
  legacy = [_privatized_zeros(grads, jax.random.PRNGKey(1), 1.0, 1.0, 1.0)
            for _ in range(2)]
  np.testing.assert_array_equal(_flat(legacy[0]), _flat(legacy[1]))


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Dense(6)(x)))


MODEL = MLP()


def _loss_fn(params, example):
  logits = MODEL.apply(params, example["x"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, example["y"])


def _data(batch=8, seed=0):
  rng = np.random.default_rng(seed)
  return {"x": jnp.asarray(rng.normal(size=(batch, 5)), jnp.float32),
          "y": jnp.asarray(rng.integers(0, 3, size=(batch,)), jnp.int32)}


def test_noise_zero_sigma_large_clip_reproduces_plain_sgd():
  batch_size = 8
  params0 = MODEL.init(jax.random.key(0), jnp.zeros((5,)))
  dp_tx = optax.chain(
      privacy.dp_aggregate(clip_norm=1e6, noise_multiplier=0.0,
                           normalizer=batch_size, key=jax.random.key(1)),
      optax.sgd(0.3))
  sgd = optax.sgd(0.3)
  p_dp, p_sgd, p_ref = params0, params0, params0
  s_dp, s_sgd, s_ref = dp_tx.init(params0), sgd.init(params0), sgd.init(params0)
  per_example = jax.jit(privacy.per_example_grads, static_argnums=(0,))
  dp_update, sgd_update = jax.jit(dp_tx.update), jax.jit(sgd.update)
  mean_loss = lambda p, b: jnp.mean(jax.vmap(_loss_fn, (None, 0))(p, b))
  for step in range(3):
    batch = _data(batch_size, seed=step)
    grads = per_example(_loss_fn, p_dp, batch)
    updates, s_dp = dp_update(grads, s_dp, p_dp)
    p_dp = optax.apply_updates(p_dp, updates)
    # Plain SGD on the same mean gradient: bit for bit the same.
    mean = jax.tree_util.tree_map(lambda g: jnp.sum(g, 0) / batch_size,
                                  per_example(_loss_fn, p_sgd, batch))
    updates, s_sgd = sgd_update(mean, s_sgd, p_sgd)
    p_sgd = optax.apply_updates(p_sgd, updates)
    # Plain SGD on the gradient of the mean loss: equal to float rounding.
    updates, s_ref = sgd_update(jax.jit(jax.grad(mean_loss))(p_ref, batch),
                                s_ref, p_ref)
    p_ref = optax.apply_updates(p_ref, updates)
  for a, b, c in zip(jax.tree_util.tree_leaves(p_dp),
                     jax.tree_util.tree_leaves(p_sgd),
                     jax.tree_util.tree_leaves(p_ref)):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)
  moved = _flat(jax.tree_util.tree_map(jnp.subtract, p_dp, params0))
  assert np.abs(moved).max() > 1e-3  # the steps did something


@pytest.mark.parametrize("microbatch_size", [None, 4])
def test_noise_private_gradient_matches_dp_aggregate(microbatch_size):
  params = MODEL.init(jax.random.key(0), jnp.zeros((5,)))
  key = jax.random.key(9)
  kw = dict(clip_norm=0.4, noise_multiplier=SIGMA, normalizer=6.0)
  tx = privacy.dp_aggregate(key=key, **kw)
  state = tx.init(params)
  tx_update = jax.jit(tx.update)
  mask = jnp.asarray([1, 1, 0, 1, 1, 1, 0, 1], jnp.float32)
  private = jax.jit(privacy.private_gradient, static_argnums=(0,),
                    static_argnames=("microbatch_size", "pre_clip_transform",
                                     "clip_norm", "noise_multiplier",
                                     "normalizer"))
  carried = key
  for step in range(2):
    batch = _data(8, seed=10 + step)
    grads = privacy.per_example_grads(_loss_fn, params, batch)
    expected, state = tx_update(grads, state, params, mask=mask)
    # dp_aggregate splits its carried key: the first half noises this step.
    noise_key, carried = jax.random.split(carried)
    got, clip_stats = private(_loss_fn, params, batch, mask, noise_key,
                              microbatch_size=microbatch_size, **kw)
    for a, b in zip(jax.tree_util.tree_leaves(got),
                    jax.tree_util.tree_leaves(expected)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(clip_stats.num_examples) == 6
  # Control: a different key gives a different gradient.
  other, _ = private(_loss_fn, params, batch, mask, jax.random.key(0),
                     microbatch_size=microbatch_size, **kw)
  assert not np.allclose(_flat(other), _flat(expected))


def test_noise_sharded_batch_adds_noise_once_not_per_device():
  """8 data-parallel devices release the same value as one device."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 (simulated) devices; see tests/conftest.py")
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  data_sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("data"))
  rng = np.random.default_rng(1)
  grads = {"w": jnp.asarray(rng.normal(size=(16, 300)), jnp.float32)}
  mask = jnp.asarray([1.0] * 13 + [0.0] * 3)
  tx = privacy.dp_aggregate(CLIP, SIGMA, 13.0, jax.random.key(2))
  state = tx.init(None)
  update = jax.jit(tx.update)
  single, _ = update(grads, state, mask=mask)
  sharded, _ = update(jax.device_put(grads, data_sharding), state,
                      mask=jax.device_put(mask, data_sharding))
  np.testing.assert_allclose(sharded["w"], single["w"], rtol=1e-5, atol=1e-6)
  total, _ = privacy.clipped_sum(grads, CLIP, mask)
  noise = np.asarray(sharded["w"]) * 13.0 - np.asarray(total["w"])
  # One draw of std sigma*C; eight draws would have std sqrt(8) sigma*C.
  assert noise.std() == pytest.approx(SIGMA * CLIP, rel=0.15)


def test_noise_invalid_arguments_raise():
  key = jax.random.key(0)
  with pytest.raises(ValueError):
    privacy.dp_aggregate(0.0, 1.0, 1.0, key)
  with pytest.raises(ValueError):
    privacy.dp_aggregate(1.0, -0.1, 1.0, key)
  with pytest.raises(ValueError):
    privacy.dp_aggregate(1.0, 1.0, 0.0, key)
