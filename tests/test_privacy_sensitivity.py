"""Invariant 1 (docs/design.md): the clipped sum has L2 sensitivity C.

For neighbouring datasets D and D' = D + {x} (add/remove one example) the
released sum changes by at most C in L2 norm, whatever the gradients hold:
huge values, NaN/inf, padding, a pre-clip transform that inflates norms.
Every bound test has a control showing that the same check FAILS when
clipping is bypassed, so the checks have teeth.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adamix_jax import privacy

# Float32 scaling g * (C / |g|) can land a few ulps above C; the sums of the
# other (clipped) examples add rounding of the same order.
RTOL = 1e-5


def _tree_norm(tree) -> float:
  leaves = jax.tree_util.tree_leaves(tree)
  return float(np.sqrt(sum(np.sum(np.asarray(x, np.float64)**2)
                           for x in leaves)))


def _tree_sub(a, b):
  return jax.tree_util.tree_map(
      lambda x, y: np.asarray(x, np.float64) - np.asarray(y, np.float64), a, b)


def _assert_within(diff_norm: float, clip_norm: float) -> None:
  assert diff_norm <= clip_norm * (1 + RTOL), (diff_norm, clip_norm)


def _random_per_example(seed: int, batch: int = 6):
  """Two-leaf per-example gradients with norms spread from 0.01 to 100."""
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(batch, 5, 3)).astype(np.float32)
  b = rng.normal(size=(batch, 4)).astype(np.float32)
  scale = np.logspace(-2, 2, batch).astype(np.float32)
  a *= scale[:, None, None] / np.sqrt(15)
  b *= scale[:, None] / np.sqrt(4)
  return {"a": jnp.asarray(a), "b": jnp.asarray(b)}


def _clip_rows(per_example_grads, clip_norm, mask=None):
  """Each row scaled by the mechanism's clip scale (for per-row checks)."""
  norms = privacy.per_example_global_norms(per_example_grads)
  scales, _ = privacy.clip_scales(norms, clip_norm, mask)
  finite = jnp.isfinite(norms)
  return jax.tree_util.tree_map(
      lambda g: jnp.where(finite.reshape((-1,) + (1,) * (g.ndim - 1)),
                          g, 0.0) * scales.reshape((-1,) + (1,) * (g.ndim - 1)),
      per_example_grads)


def _remove_example(tree, i):
  return jax.tree_util.tree_map(lambda g: jnp.delete(g, i, axis=0), tree)


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(8)(x))
    return nn.Dense(3)(x)


MODEL = MLP()
DIM = 4


def _params():
  return MODEL.init(jax.random.key(0), jnp.zeros((DIM,)))


def _loss_fn(params, example):
  logits = MODEL.apply(params, example["x"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, example["y"])


# Jitted (as in training; also compiles faster than op-by-op dispatch).
_clipped_grad_sum = jax.jit(
    privacy.clipped_grad_sum, static_argnums=(0,),
    static_argnames=("microbatch_size", "pre_clip_transform"))


def _neighbouring_batches(padded: int, num_real: int, extra_scale: float,
                          seed: int = 0):
  """(batch, mask_D, mask_D'): D' adds the example at row num_real.

  The rows past num_real (padding in D) all hold the extra example, so D's
  padding also carries that example's data: only the mask differs.
  """
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(padded, DIM)).astype(np.float32)
  x[num_real:] = extra_scale * rng.normal(size=(DIM,)).astype(np.float32)
  y = rng.integers(0, 3, size=(padded,)).astype(np.int32)
  y[num_real:] = y[num_real]
  mask_d = np.zeros(padded, np.float32)
  mask_d[:num_real] = 1
  mask_d_prime = mask_d.copy()
  mask_d_prime[num_real] = 1
  batch = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
  return batch, jnp.asarray(mask_d), jnp.asarray(mask_d_prime)


@pytest.mark.parametrize("clip_norm", [0.05, 1.0, 7.5])
def test_sensitivity_clipped_sum_add_remove_within_clip_norm(clip_norm):
  grads = _random_per_example(seed=1)
  full, stats = privacy.clipped_sum(grads, clip_norm)
  assert int(stats.num_examples) == 6
  for i in range(6):
    smaller, _ = privacy.clipped_sum(_remove_example(grads, i), clip_norm)
    _assert_within(_tree_norm(_tree_sub(full, smaller)), clip_norm)
  # Each clipped row has norm <= C, too (the bound is per example).
  clipped = _clip_rows(grads, clip_norm)
  norms = privacy.per_example_global_norms(clipped)
  assert float(jnp.max(norms)) <= clip_norm * (1 + RTOL)


def test_sensitivity_check_has_teeth_without_clipping():
  """Control: with clipping bypassed (C = inf) the same check fails."""
  clip_norm = 1.0
  grads = _random_per_example(seed=1)
  unclipped, _ = privacy.clipped_sum(grads, jnp.inf)
  smaller, _ = privacy.clipped_sum(_remove_example(grads, 5), jnp.inf)
  diff = _tree_norm(_tree_sub(unclipped, smaller))
  assert diff > 10 * clip_norm  # the last example has norm ~100
  with pytest.raises(AssertionError):
    _assert_within(diff, clip_norm)


def test_sensitivity_masking_a_row_is_the_same_neighbour_as_removing_it():
  for clip_norm in (0.3, 2.0, 5):
    grads = _random_per_example(seed=2)
    mask = jnp.ones((6,))
    full, _ = privacy.clipped_sum(grads, clip_norm, mask)
    for i in range(6):
      smaller, _ = privacy.clipped_sum(_remove_example(grads, i),
                                       clip_norm, jnp.ones((5,)))
      _assert_within(_tree_norm(_tree_sub(full, smaller)), clip_norm)
      masked, _ = privacy.clipped_sum(grads, clip_norm, mask.at[i].set(0.0))
      for a, b in zip(jax.tree_util.tree_leaves(masked),
                      jax.tree_util.tree_leaves(smaller)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("microbatch_size", [None, 1, 2, 4, 8])
def test_sensitivity_clipped_grad_sum_microbatched(microbatch_size):
  clip_norm = 0.5
  params = _params()
  batch, mask_d, mask_d_prime = _neighbouring_batches(
      padded=8, num_real=5, extra_scale=30.0)
  kw = dict(microbatch_size=microbatch_size)
  sum_d, stats_d = _clipped_grad_sum(_loss_fn, params, batch, clip_norm,
                                     mask_d, **kw)
  sum_dp, stats_dp = _clipped_grad_sum(_loss_fn, params, batch,
                                       clip_norm, mask_d_prime, **kw)
  assert int(stats_d.num_examples) == 5
  assert int(stats_dp.num_examples) == 6
  diff = _tree_norm(_tree_sub(sum_dp, sum_d))
  _assert_within(diff, clip_norm)
  # The added example's raw gradient is far above C, so it was clipped to C.
  assert diff == pytest.approx(clip_norm, rel=1e-4)
  assert int(stats_dp.num_clipped) >= 1

  # Control: without clipping the same neighbours differ by far more than C.
  raw_d, _ = _clipped_grad_sum(_loss_fn, params, batch, jnp.inf,
                               mask_d, **kw)
  raw_dp, _ = _clipped_grad_sum(_loss_fn, params, batch, jnp.inf,
                                mask_d_prime, **kw)
  assert _tree_norm(_tree_sub(raw_dp, raw_d)) > 5 * clip_norm


def _inflating_linear_map(seed=3, dim=19):
  """A non-orthogonal map with singular values from 0.1 to 10."""
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
  v, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
  s = np.logspace(-1, 1, dim)
  return jnp.asarray((u * s) @ v.T, jnp.float32)


def test_sensitivity_pre_clip_transform_runs_before_clipping():
  clip_norm = 1.0
  matrix = _inflating_linear_map()

  def transform(g):  # one example's gradient -> transformed gradient
    flat = jnp.concatenate([g["a"].reshape(-1), g["b"].reshape(-1)])
    out = matrix @ flat
    return {"a": 10.0 * out[:15].reshape(5, 3), "b": 10.0 * out[15:]}

  grads = _random_per_example(seed=4)
  # Rows of norm exactly C: clipping leaves them alone, the map inflates them.
  norms = privacy.per_example_global_norms(grads)
  grads = jax.tree_util.tree_map(
      lambda g: g / norms.reshape((-1,) + (1,) * (g.ndim - 1)), grads)

  full, _ = privacy.clipped_sum(grads, clip_norm,
                                pre_clip_transform=transform)
  for i in range(6):
    smaller, _ = privacy.clipped_sum(_remove_example(grads, i), clip_norm,
                                     pre_clip_transform=transform)
    _assert_within(_tree_norm(_tree_sub(full, smaller)), clip_norm)

  # Control: the same map applied AFTER clipping breaks the bound.
  clipped = _clip_rows(grads, clip_norm)
  after = jax.vmap(transform)(clipped)
  worst = float(jnp.max(privacy.per_example_global_norms(after)))
  assert worst > 5 * clip_norm


@pytest.mark.parametrize("microbatch_size", [None, 2, 4])
def test_sensitivity_pre_clip_transform_microbatched(microbatch_size):
  clip_norm = 0.25

  def times_ten(g):  # would inflate every norm 10x if it ran after clipping
    return jax.tree_util.tree_map(lambda x: 10.0 * x, g)

  params = _params()
  batch, mask_d, mask_d_prime = _neighbouring_batches(
      padded=8, num_real=3, extra_scale=1.0, seed=5)
  kw = dict(microbatch_size=microbatch_size, pre_clip_transform=times_ten)
  sum_d, _ = _clipped_grad_sum(_loss_fn, params, batch, clip_norm,
                               mask_d, **kw)
  sum_dp, _ = _clipped_grad_sum(_loss_fn, params, batch, clip_norm,
                                mask_d_prime, **kw)
  _assert_within(_tree_norm(_tree_sub(sum_dp, sum_d)), clip_norm)

  # Control: scaling the clipped sum afterwards gives a difference of ~10 C.
  plain_d, _ = _clipped_grad_sum(_loss_fn, params, batch, clip_norm,
                                 mask_d,
                                 microbatch_size=microbatch_size)
  plain_dp, _ = _clipped_grad_sum(_loss_fn, params, batch, clip_norm,
                                  mask_d_prime,
                                  microbatch_size=microbatch_size)
  assert 10 * _tree_norm(_tree_sub(plain_dp, plain_d)) > 2 * clip_norm


def test_sensitivity_padding_rows_contribute_exactly_zero():
  clip_norm = 1.0
  grads = _random_per_example(seed=6, batch=8)
  mask = jnp.asarray([1, 1, 0, 1, 0, 1, 0, 0], jnp.float32)
  pad = ~np.asarray(mask, bool)
  zero_pad = jax.tree_util.tree_map(
      lambda g: jnp.where(pad.reshape((-1,) + (1,) * (g.ndim - 1)), 0.0, g),
      grads)
  huge = [1e30, -3e38, 1e15, jnp.inf, -jnp.inf, jnp.nan]
  for value in huge:
    poisoned = jax.tree_util.tree_map(
        lambda g: jnp.where(pad.reshape((-1,) + (1,) * (g.ndim - 1)),
                            jnp.asarray(value, g.dtype), g), grads)
    total, stats = privacy.clipped_sum(poisoned, clip_norm, mask)
    reference, _ = privacy.clipped_sum(zero_pad, clip_norm, mask)
    for leaf, ref in zip(jax.tree_util.tree_leaves(total),
                         jax.tree_util.tree_leaves(reference)):
      np.testing.assert_array_equal(leaf, ref)  # bit for bit
    assert int(stats.num_examples) == 4
    assert int(stats.num_nonfinite) == 0  # padding is not counted
    clipped = _clip_rows(poisoned, clip_norm, mask)
    for leaf in jax.tree_util.tree_leaves(clipped):
      assert np.all(np.asarray(leaf)[pad] == 0.0)


def test_sensitivity_padding_in_model_batch_contributes_zero():
  """Padding rows of a real model batch hold huge inputs; they add nothing."""
  params = _params()
  batch, mask_d, _ = _neighbouring_batches(padded=8, num_real=5,
                                           extra_scale=1e20)
  sane = {"x": batch["x"].at[5:].set(0.0), "y": batch["y"]}
  for microbatch_size in (None, 4):
    total, stats = _clipped_grad_sum(_loss_fn, params, batch, 1.0,
                                     mask_d,
                                     microbatch_size=microbatch_size)
    reference, _ = _clipped_grad_sum(_loss_fn, params, sane, 1.0,
                                     mask_d,
                                     microbatch_size=microbatch_size)
    for leaf, ref in zip(jax.tree_util.tree_leaves(total),
                         jax.tree_util.tree_leaves(reference)):
      np.testing.assert_array_equal(leaf, ref)
    assert int(stats.num_examples) == 5
    assert int(stats.num_nonfinite) == 0


def test_sensitivity_nonfinite_gradient_zeroed_and_counted():
  clip_norm = 1.0
  grads = _random_per_example(seed=7, batch=6)
  bad = jax.tree_util.tree_map(lambda g: g.at[1].set(jnp.nan).at[4].set(jnp.inf),
                               grads)
  # Only one leaf of row 2 non-finite: the whole row must still go.
  bad["b"] = bad["b"].at[2, 0].set(-jnp.inf)
  total, stats = privacy.clipped_sum(bad, clip_norm)
  assert int(stats.num_nonfinite) == 3
  assert int(stats.num_examples) == 6
  assert all(bool(jnp.all(jnp.isfinite(x)))
             for x in jax.tree_util.tree_leaves(total))
  assert np.isfinite(float(stats.mean_norm))
  keep = _remove_example(_remove_example(_remove_example(grads, 4), 2), 1)
  reference, _ = privacy.clipped_sum(keep, clip_norm)
  for leaf, ref in zip(jax.tree_util.tree_leaves(total),
                       jax.tree_util.tree_leaves(reference)):
    np.testing.assert_allclose(leaf, ref, rtol=1e-6, atol=1e-7)
  # The sum with the non-finite example is a neighbour of the sum without it.
  without, _ = privacy.clipped_sum(_remove_example(bad, 1), clip_norm)
  _assert_within(_tree_norm(_tree_sub(total, without)), clip_norm)


@pytest.mark.parametrize("microbatch_size", [None, 2])
def test_sensitivity_nonfinite_model_gradient_microbatched(microbatch_size):
  params = _params()
  batch, _, mask = _neighbouring_batches(padded=8, num_real=5,
                                         extra_scale=1.0)
  batch = {"x": batch["x"].at[5].set(jnp.nan), "y": batch["y"]}
  total, stats = _clipped_grad_sum(_loss_fn, params, batch, 1.0, mask,
                                   microbatch_size=microbatch_size)
  assert int(stats.num_nonfinite) == 1
  assert int(stats.num_examples) == 6
  assert all(bool(jnp.all(jnp.isfinite(x)))
             for x in jax.tree_util.tree_leaves(total))
  # dp_aggregate counts it cumulatively in its state.
  grads = jax.jit(privacy.per_example_grads, static_argnums=(0,))(
      _loss_fn, params, batch)
  tx = privacy.dp_aggregate(1.0, 1.0, 6.0, jax.random.key(0))
  state = tx.init(params)
  tx_update = jax.jit(tx.update)
  for step in range(2):
    update, state = tx_update(grads, state, params, mask=mask)
    assert int(state.num_nonfinite) == step + 1
    assert all(bool(jnp.all(jnp.isfinite(x)))
               for x in jax.tree_util.tree_leaves(update))


def test_sensitivity_adversarial_gigantic_gradient():
  clip_norm = 0.5
  grads = _random_per_example(seed=8, batch=5)
  honest, _ = privacy.clipped_sum(grads, clip_norm)
  for scale in (1e6, 1e15, 1e18, 1e25, 1e35):
    adversary = jax.tree_util.tree_map(
        lambda g: jnp.concatenate([g, scale * jnp.ones_like(g[:1])]), grads)
    total, stats = privacy.clipped_sum(adversary, clip_norm)
    diff = _tree_norm(_tree_sub(total, honest))
    _assert_within(diff, clip_norm)
    # Either clipped to exactly C or, if its norm overflows float32, dropped.
    assert (int(stats.num_clipped) + int(stats.num_nonfinite)) >= 1
    if int(stats.num_nonfinite) == 0:
      assert diff == pytest.approx(clip_norm, rel=1e-4)
  # Through a model: the adversary's loss is weighted by 1e6.
  def weighted_loss(params, example):
    return example["w"] * _loss_fn(params, example)

  params = _params()
  batch, mask_d, mask_d_prime = _neighbouring_batches(
      padded=8, num_real=6, extra_scale=1.0)
  batch["w"] = jnp.asarray([1, 1, 1, 1, 1, 1, 1e6, 1e6], jnp.float32)
  sum_d, _ = _clipped_grad_sum(weighted_loss, params, batch, clip_norm,
                               mask_d, microbatch_size=2)
  sum_dp, stats = _clipped_grad_sum(weighted_loss, params, batch,
                                    clip_norm, mask_d_prime,
                                    microbatch_size=2)
  _assert_within(_tree_norm(_tree_sub(sum_dp, sum_d)), clip_norm)
  assert float(stats.mean_norm) > 1e4 * clip_norm  # it really was gigantic


def test_sensitivity_dp_aggregate_update_within_c_over_normalizer():
  """The optax transform releases (sum + noise)/n: neighbours move <= C/n."""
  clip_norm, normalizer = 0.8, 4.0
  grads = _random_per_example(seed=9, batch=6)
  mask_d = jnp.asarray([1, 1, 1, 1, 1, 0], jnp.float32)
  mask_dp = jnp.ones((6,), jnp.float32)
  tx = privacy.dp_aggregate(clip_norm, 1.0, normalizer, jax.random.key(3))
  state = tx.init(grads)
  out_d, _ = tx.update(grads, state, mask=mask_d)
  out_dp, _ = tx.update(grads, state, mask=mask_dp)  # same key, same noise
  diff = _tree_norm(_tree_sub(out_dp, out_d))
  _assert_within(diff * normalizer, clip_norm)
  assert diff * normalizer == pytest.approx(clip_norm, rel=1e-4)
