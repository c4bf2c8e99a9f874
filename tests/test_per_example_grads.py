"""``per_example_grads`` (vmap) and the microbatched ``clipped_grad_sum``.

The per-example gradients must be exactly the gradients of each example's
own loss (no cross-example mixing, e.g. through a batch mean), and
microbatching must not change the clipped sum.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adamix_jax import privacy


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(16)(x))
    return nn.Dense(4)(x)


MODEL = MLP()
BATCH, DIM = 12, 6


def _loss_fn(params, example):
  logits = MODEL.apply(params, example["x"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, example["y"])


def _setup(seed=0):
  rng = np.random.default_rng(seed)
  params = MODEL.init(jax.random.key(seed), jnp.zeros((DIM,)))
  batch = {"x": jnp.asarray(rng.normal(size=(BATCH, DIM)), jnp.float32),
           "y": jnp.asarray(rng.integers(0, 4, size=(BATCH,)), jnp.int32)}
  return params, batch


def _example(batch, i):
  return jax.tree_util.tree_map(lambda x: x[i], batch)


def test_per_example_grads_match_loop_of_single_example_grads():
  params, batch = _setup()
  vmapped = jax.jit(privacy.per_example_grads, static_argnums=(0,))(
      _loss_fn, params, batch)
  single = jax.jit(jax.grad(_loss_fn))
  for leaf, p in zip(jax.tree_util.tree_leaves(vmapped),
                     jax.tree_util.tree_leaves(params)):
    assert leaf.shape == (BATCH,) + p.shape
  for i in range(BATCH):
    expected = single(params, _example(batch, i))
    got = jax.tree_util.tree_map(lambda g: g[i], vmapped)
    for a, b in zip(jax.tree_util.tree_leaves(got),
                    jax.tree_util.tree_leaves(expected)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  # Control: the gradient of the batch mean is not any example's gradient.
  mean_grad = jax.grad(lambda p: jnp.mean(
      jax.vmap(_loss_fn, (None, 0))(p, batch)))(params)
  first = jax.tree_util.tree_map(lambda g: g[0], vmapped)
  assert not all(np.allclose(a, b, atol=1e-6) for a, b in zip(
      jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(mean_grad)))


@pytest.mark.parametrize("microbatch_size", [1, 3, 4, 24])
def test_per_example_microbatched_clipped_sum_matches_full(microbatch_size):
  params, batch = _setup(seed=1)
  mask = jnp.asarray([1, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 0], jnp.float32)
  fn = jax.jit(privacy.clipped_grad_sum, static_argnums=(0,),
               static_argnames=("microbatch_size",))
  full, full_stats = fn(_loss_fn, params, batch, 0.3, mask)
  micro, micro_stats = fn(_loss_fn, params, batch, 0.3, mask,
                          microbatch_size=microbatch_size)
  for a, b in zip(jax.tree_util.tree_leaves(micro),
                  jax.tree_util.tree_leaves(full)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert int(micro_stats.num_examples) == int(full_stats.num_examples) == 9
  assert int(micro_stats.num_clipped) == int(full_stats.num_clipped)
  assert int(micro_stats.num_nonfinite) == 0
  np.testing.assert_allclose(micro_stats.mean_norm, full_stats.mean_norm,
                             rtol=1e-5)
  # And both equal clipping the vmapped per-example gradients directly.
  direct, _ = privacy.clipped_sum(
      privacy.per_example_grads(_loss_fn, params, batch), 0.3, mask)
  for a, b in zip(jax.tree_util.tree_leaves(micro),
                  jax.tree_util.tree_leaves(direct)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("microbatch_size", [5, 7, 9])
def test_per_example_microbatch_not_dividing_batch_pads_masked_rows(
    microbatch_size):
  """The last slice is padded with masked zero rows: the same sum and stats
  as all at once (the padding adds nothing and is not counted)."""
  params, batch = _setup()
  size = batch["y"].shape[0]
  assert size % microbatch_size
  mask = jnp.asarray((np.arange(size) % 3 != 1).astype(np.float32))
  micro, micro_stats = privacy.clipped_grad_sum(
      _loss_fn, params, batch, 0.3, mask, microbatch_size=microbatch_size)
  direct, stats = privacy.clipped_grad_sum(_loss_fn, params, batch, 0.3, mask)
  for a, b in zip(jax.tree_util.tree_leaves(micro),
                  jax.tree_util.tree_leaves(direct)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert int(micro_stats.num_examples) == int(stats.num_examples)
  assert int(micro_stats.num_clipped) == int(stats.num_clipped)


def test_per_example_mismatched_batch_leaves_raise():
  params, batch = _setup()
  bad = {"x": batch["x"], "y": batch["y"][:5]}
  with pytest.raises(ValueError):
    privacy.clipped_grad_sum(_loss_fn, params, bad, 1.0, microbatch_size=2)
