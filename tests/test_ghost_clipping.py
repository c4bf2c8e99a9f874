"""Ghost clipping (``privacy.ghost``) against the vmap reference.

The guarantee: without materialising per-example gradients, the capture
returns (a) each example's gradient norm and (b) the weighted sum
sum_i w_i g_i, both equal to what ``vmap(grad)`` gives, for every supported
layer (Dense, Conv, Embed, LayerNorm, GroupNorm, RMSNorm) in both of its
forms (Gram "ghost" and materialised "direct"), for layers called several
times, and for parameters that fall back to vmap. Every test compares the
squared norm of EACH module separately, so a dropped or wrong layer
contribution fails even when another layer dominates the total. Padding
rows and non-finite rows must contribute exactly zero, and layers with batch
statistics must be refused.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from adamix_jax import privacy
from adamix_jax.models.cnn import SmallCNN
from adamix_jax.privacy import ghost
from adamix_jax.train import full_model

RTOL = 1e-5


def assert_close(actual, expected, rtol=RTOL):
  """Every leaf within rtol x (the leaf's largest magnitude) of expected."""
  for a, b in zip(jax.tree_util.tree_leaves(actual),
                  jax.tree_util.tree_leaves(expected)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    scale = max(np.max(np.abs(b)), 1e-12)
    np.testing.assert_allclose(a, b, rtol=0, atol=rtol * scale)


def reference_grads(model, params, batch):
  loss_fn = full_model.classification_loss(model)
  return jax.jit(privacy.per_example_grads, static_argnums=0)(loss_fn, params,
                                                              batch)


def reference_sq_norms_by_module(grads) -> dict:
  """{module path: (B,) squared norm of that module's parameters' gradient}."""
  flat = traverse_util.flatten_dict(grads)
  out: dict[Any, Any] = {}
  for path, g in flat.items():
    sq = np.sum(np.reshape(np.asarray(g, np.float64), (g.shape[0], -1))**2, 1)
    out[path[:-1]] = out.get(path[:-1], 0.0) + sq
  return out


def check_against_vmap(model, params, batch, form="auto", weights=None):
  """Norms (total and per module) and a weighted sum equal the reference."""
  grads = reference_grads(model, params, batch)
  size = batch[0].shape[0]
  if weights is None:
    weights = jnp.asarray(np.random.default_rng(0).uniform(size=size),
                          jnp.float32)

  @jax.jit
  def run(params, batch, weights):
    contributions = ghost.capture(model, params, batch, form=form)
    by_layer = contributions.squared_norms_by_layer()
    return (contributions.norms(), by_layer,
            contributions.weighted_sum(weights))

  norms, by_layer, total = run(params, batch, weights)
  expected_by_module = reference_sq_norms_by_module(grads)
  got_by_module: dict[Any, Any] = {}
  for path, sq in by_layer.items():
    module = path if path in expected_by_module else path[:-1]  # fallback leaf
    got_by_module[module] = got_by_module.get(module, 0.0) + np.asarray(sq)
  assert set(got_by_module) == set(expected_by_module)
  for module, sq in expected_by_module.items():
    assert_close(got_by_module[module], sq)
  assert_close(norms, privacy.per_example_global_norms(grads))
  assert_close(total, jax.tree_util.tree_map(
      lambda g: jnp.tensordot(weights, g, axes=1), grads))
  return capture_info(model, params, batch, form)


def capture_info(model, params, batch, form="auto") -> ghost.CaptureInfo:
  """What the capture chose per module (traced only, nothing computed)."""
  box = {}

  def f(p, b):
    box["info"] = ghost.capture(model, p, b, form=form).info
    return 0

  jax.eval_shape(f, params, batch)
  return box["info"]


def init(model, x):
  return model.init(jax.random.key(1), x[:1])["params"]


def images(size, shape, seed=0, classes=10):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(size,) + shape), jnp.float32)
  y = jnp.asarray(rng.integers(0, classes, size=size), jnp.int32)
  return x, y


# --- one supported layer at a time -------------------------------------------


class DenseModel(nn.Module):
  """Dense on flat inputs (T = 1) and on a sequence (T = 5 positions)."""

  @nn.compact
  def __call__(self, x):  # x: (B, 5, 6)
    h = nn.tanh(nn.Dense(7)(x))  # T = 5
    h = nn.Dense(4, use_bias=False)(h.reshape(h.shape[0], -1))  # T = 1
    return nn.Dense(10)(nn.relu(h))


@pytest.mark.parametrize("form", ["ghost", "direct"])
def test_ghost_dense_norms_and_weighted_sum_equal_vmap(form):
  model = DenseModel()
  x, y = images(6, (5, 6))
  info = check_against_vmap(model, init(model, x), (x, y), form)
  assert len(info.captured) == 3 and not info.fallback


class ConvModel(nn.Module):
  """One Conv (the layer under test) and a Dense readout."""

  conv: tuple  # (name, value) pairs: the module must be hashable

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(**dict(self.conv))(x)
    return nn.Dense(10)(jnp.tanh(h).reshape(h.shape[0], -1))


CONV_CASES = [
    dict(features=4, kernel_size=(3, 3)),  # stride 1, SAME
    dict(features=4, kernel_size=(3, 3), strides=2),  # stride 2, SAME
    dict(features=3, kernel_size=(3, 3), padding="VALID"),
    dict(features=3, kernel_size=(5, 5), strides=2, padding="VALID"),
    dict(features=5, kernel_size=(1, 1)),
    dict(features=4, kernel_size=(2, 3), strides=(2, 1), use_bias=False),
    dict(features=4, kernel_size=(3, 3), kernel_dilation=2),
    dict(features=4, kernel_size=(3, 3), padding=((1, 2), (0, 1))),
    dict(features=4, kernel_size=(3, 3), padding="CIRCULAR"),
]


@pytest.mark.parametrize("form", ["ghost", "direct"])
@pytest.mark.parametrize("conv", CONV_CASES, ids=lambda c: str(sorted(
    c.items())))
def test_ghost_conv_norms_and_weighted_sum_equal_vmap(conv, form):
  model = ConvModel(conv=tuple(conv.items()))
  x, y = images(5, (9, 8, 3))
  info = check_against_vmap(model, init(model, x), (x, y), form)
  assert info.captured["Conv_0"][:2] == ("conv", form) and not info.fallback


def test_ghost_conv1d_causal_equals_vmap():
  model = ConvModel(conv=(("features", 4), ("kernel_size", (3,)),
                          ("padding", "CAUSAL")))
  x, y = images(5, (10, 3))
  info = check_against_vmap(model, init(model, x), (x, y), "ghost")
  assert "Conv_0" in info.captured


class EmbedModel(nn.Module):

  @nn.compact
  def __call__(self, tokens):  # (B, T) integers
    h = nn.Embed(11, 6)(tokens)
    return nn.Dense(10)(jnp.mean(jnp.tanh(h), axis=1))


@pytest.mark.parametrize("form", ["ghost", "direct"])
def test_ghost_embed_norms_and_weighted_sum_equal_vmap(form):
  model = EmbedModel()
  rng = np.random.default_rng(0)
  # Few ids, many positions: repeated ids within an example must add up.
  tokens = jnp.asarray(rng.integers(0, 4, size=(6, 9)), jnp.int32)
  y = jnp.asarray(rng.integers(0, 10, size=6), jnp.int32)
  info = check_against_vmap(model, init(model, tokens), (tokens, y), form)
  assert info.captured["Embed_0"][:2] == ("embed", form)


class NormModel(nn.Module):
  """LayerNorm, GroupNorm and RMSNorm between convolutions."""

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(8, (3, 3))(x)
    h = nn.GroupNorm(num_groups=4)(h)
    h = nn.Conv(6, (3, 3), strides=2)(nn.relu(h))
    h = nn.LayerNorm()(h)
    h = nn.RMSNorm()(nn.relu(h).reshape(h.shape[0], -1))
    return nn.Dense(10)(h)


def test_ghost_layernorm_groupnorm_rmsnorm_equal_vmap():
  model = NormModel()
  x, y = images(5, (8, 8, 3))
  info = check_against_vmap(model, init(model, x), (x, y))
  kinds = {path: kind for path, (kind, _, _) in info.captured.items()}
  assert kinds == {"Conv_0": "conv", "Conv_1": "conv", "GroupNorm_0": "norm",
                   "LayerNorm_0": "norm", "RMSNorm_0": "norm",
                   "Dense_0": "dense"}
  assert not info.fallback


# --- whole models ------------------------------------------------------------


def cifar_cnn():
  """The CNN of issue #16: 545,098 parameters on 32x32x3 inputs."""
  return SmallCNN(num_classes=10, channels=(32, 64), hidden=128)


def test_ghost_cifar_cnn_equals_vmap():
  model = cifar_cnn()
  x, y = images(4, (32, 32, 3))
  params = init(model, x)
  assert sum(p.size for p in jax.tree_util.tree_leaves(params)) == 545_098
  info = check_against_vmap(model, params, (x, y))
  # The static choice: the convolutions' unfolded gradients are cheaper than
  # their T x T Grams (T = 1024, 256), the dense layers' Grams (T = 1) win.
  assert {p: f for p, (_, f, _) in info.captured.items()} == {
      "Conv_0": "direct", "Conv_1": "direct", "Dense_0": "ghost",
      "Dense_1": "ghost"}


class ScaleShift(nn.Module):
  """A custom layer with its own parameters: not supported, falls back."""

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    return x * scale + self.param("shift", nn.initializers.zeros, ())


class MixedModel(nn.Module):
  """Supported layers around fallbacks (custom params, grouped conv, remat).

  ``grouped=False`` leaves out the grouped convolution: under vmap, XLA's
  per-example kernel gradient of a grouped convolution spreads one
  example's NaN to every example (the reference path does the same), which
  the non-finite-row test must not depend on.
  """

  grouped: bool = True

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(6, (3, 3))(x)
    h = ScaleShift()(nn.relu(h))
    if self.grouped:
      h = nn.Conv(6, (3, 3), feature_group_count=2)(h)  # fallback: groups
    h = nn.LayerNorm()(h)
    h = h.reshape(h.shape[0], -1)
    h = nn.remat(nn.Dense)(8)(h)  # fallback: inside a lifted transform
    bias = self.param("logit_bias", nn.initializers.zeros, (10,))
    return nn.Dense(10)(nn.relu(h)) + bias


def test_ghost_mixed_supported_and_fallback_layers_equal_vmap():
  model = MixedModel()
  x, y = images(5, (6, 6, 3))
  info = check_against_vmap(model, init(model, x), (x, y))
  assert set(info.captured) == {"Conv_0", "LayerNorm_0", "Dense_0"}
  assert set(info.fallback) == {
      "ScaleShift_0/scale", "ScaleShift_0/shift", "Conv_1/kernel",
      "Conv_1/bias", "CheckpointDense_0/kernel", "CheckpointDense_0/bias",
      "logit_bias"}
  assert "feature_group_count" in info.fallback["Conv_1/kernel"]


class SharedLayers(nn.Module):
  """Each supported layer type called twice with the same parameters."""

  @nn.compact
  def __call__(self, x):
    conv = nn.Conv(4, (3, 3))
    h1 = conv(x)
    h2 = conv(x[:, ::2, ::2, :])  # the same kernel at another resolution
    norm = nn.LayerNorm()
    h = jnp.concatenate([norm(h1).reshape(h1.shape[0], -1),
                         norm(h2).reshape(h2.shape[0], -1)], axis=-1)
    dense = nn.Dense(h.shape[-1])
    h = dense(nn.relu(dense(h)))  # a Dense applied twice in a row
    return nn.Dense(10)(h)


@pytest.mark.parametrize("form", ["ghost", "direct"])
def test_ghost_layer_called_twice_equals_vmap(form):
  model = SharedLayers()
  x, y = images(5, (6, 6, 3))
  info = check_against_vmap(model, init(model, x), (x, y), form)
  assert info.captured["Conv_0"][2] == 2
  assert info.captured["LayerNorm_0"][2] == 2
  assert info.captured["Dense_0"][2] == 2
  assert not info.fallback


class TiedEmbedding(nn.Module):
  """Embed used by lookup AND by ``attend``: its table falls back to vmap."""

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(10, 6)
    h = jnp.mean(embed(tokens), axis=1)
    return embed.attend(nn.Dense(6)(h))


def test_ghost_tied_embedding_falls_back_and_equals_vmap():
  model = TiedEmbedding()
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(0, 10, size=(5, 4)), jnp.int32)
  y = jnp.asarray(rng.integers(0, 10, size=5), jnp.int32)
  info = check_against_vmap(model, init(model, tokens), (tokens, y))
  assert "attend" in info.fallback["Embed_0/embedding"]
  assert set(info.captured) == {"Dense_0"}


# --- clipping: padding, non-finite rows, the reference's clipped sum ---------


def nan_loss_for_negative_labels(logits, label):
  """Cross-entropy, but NaN (with a NaN gradient) for a label of -1.

  The robust way to give ONE example a non-finite gradient: a NaN input
  image is not, because XLA:CPU's convolution does not always propagate NaN
  (under jit a NaN image can come out of the first conv as finite numbers).
  """
  cross_entropy = ghost.softmax_cross_entropy(logits, jnp.maximum(label, 0))
  # A selected factor, not jnp.where(label < 0, nan * ..., ...): the unused
  # branch of a where still back-propagates 0 * nan = nan.
  return cross_entropy * jnp.where(label < 0, jnp.nan, 1.0)


def example_loss(model, loss):
  """The reference's per-example loss ``loss_fn(params, (x, y))``."""
  def loss_fn(params, example):
    x, y = example
    return loss(model.apply({"params": params}, x[None])[0], y)
  return loss_fn


def batch_with_nan_and_padding(size=6):
  """Row 1: a real example with a NaN gradient; rows 4, 5: padding."""
  x, y = images(size, (32, 32, 3), seed=3)
  y = y.at[1].set(-1)
  x = x.at[size - 1].set(1e30)  # padding with absurd values: still exactly 0
  mask = jnp.ones((size,), jnp.float32).at[size - 1].set(0.0).at[
      size - 2].set(0.0)
  return x, y, mask


def test_ghost_clipped_grad_sum_equals_reference_with_padding_and_nan_row():
  model = cifar_cnn()
  x, y, mask = batch_with_nan_and_padding()
  params = init(model, x)
  loss = nan_loss_for_negative_labels
  loss_fn = example_loss(model, loss)
  for clip_norm in (0.5, 1e3):  # most rows clipped / none clipped
    ref_sum, ref_stats = jax.jit(
        privacy.clipped_grad_sum, static_argnums=0)(loss_fn, params, (x, y),
                                                    clip_norm, mask)
    got_sum, got_stats = jax.jit(
        lambda p, x, y, m, c=clip_norm: ghost.ghost_clipped_grad_sum(
            model, p, (x, y), c, m, loss=loss))(params, x, y, mask)
    assert all(np.all(np.isfinite(leaf))
               for leaf in jax.tree_util.tree_leaves(got_sum))
    assert_close(got_sum, ref_sum)
    assert int(got_stats.num_nonfinite) == int(ref_stats.num_nonfinite) == 1
    assert int(got_stats.num_examples) == 4
    assert int(got_stats.num_clipped) == int(ref_stats.num_clipped)
    np.testing.assert_allclose(got_stats.mean_norm, ref_stats.mean_norm,
                               rtol=RTOL)


@pytest.mark.parametrize("where", ["input", "loss"])
@pytest.mark.parametrize("form", ["ghost", "direct"])
def test_ghost_weighted_sum_is_exactly_zero_from_nan_and_padding_rows(where,
                                                                     form):
  # NaN in the forward pass (a layer input: no conv first, whose NaN handling
  # on XLA:CPU is unreliable) or in the backward pass (output cotangents).
  if where == "input":
    model = DenseModel()
    x, y = images(4, (5, 6))
    x = x.at[0, 2].set(jnp.nan)
  else:
    model = MixedModel(grouped=False)  # captured AND fallback leaves
    x, y = images(4, (6, 6, 3))
    y = y.at[0].set(-1)
  params = init(model, x)

  @jax.jit
  def run(weights):
    contributions = ghost.capture(model, params, (x, y), form=form,
                                  loss=nan_loss_for_negative_labels)
    return contributions.norms(), contributions.weighted_sum(weights)

  # Row 0 has a NaN norm: even with weight 1 it contributes exactly 0. Rows
  # 1-3 have weight 0 (padding): exactly 0.
  norms, total = run(jnp.asarray([1.0, 0.0, 0.0, 0.0]))
  assert not np.isfinite(norms[0]) and np.all(np.isfinite(norms[1:]))
  for leaf in jax.tree_util.tree_leaves(total):
    assert np.all(np.asarray(leaf) == 0.0)
  # And the NaN row does not leak into the others' sum.
  _, total = run(jnp.asarray([1.0, 1.0, 0.0, 1.0]))
  _, expected = run(jnp.asarray([0.0, 1.0, 0.0, 1.0]))
  for a, b in zip(jax.tree_util.tree_leaves(total),
                  jax.tree_util.tree_leaves(expected)):
    np.testing.assert_array_equal(a, b)
    assert np.all(np.isfinite(a))


def test_ghost_clipped_rows_are_bounded_by_the_clip_norm():
  """Each example's contribution, as released, has norm <= C."""
  model = NormModel()
  x, y = images(5, (8, 8, 3))
  params = init(model, x)
  clip_norm = 0.05

  def one_row(i):
    mask = jnp.zeros((5,)).at[i].set(1.0)
    total, _ = ghost.ghost_clipped_grad_sum(model, params, (x, y), clip_norm,
                                            mask)
    return privacy.per_example_global_norms(
        jax.tree_util.tree_map(lambda g: g[None], total))[0]

  norms = jax.jit(jax.vmap(one_row))(jnp.arange(5))
  assert np.all(np.asarray(norms) <= clip_norm * (1 + 1e-5))
  assert np.all(np.asarray(norms) >= clip_norm * (1 - 1e-5))  # all clipped


# --- refused layers ----------------------------------------------------------


class WithBatchNorm(nn.Module):
  train: bool

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(8)(x)
    h = nn.BatchNorm(use_running_average=not self.train)(h)
    return nn.Dense(10)(h)


def test_ghost_refuses_batchnorm_with_batch_statistics():
  model = WithBatchNorm(train=True)
  x, y = images(4, (5,))
  variables = model.init(jax.random.key(0), x[:2])
  with pytest.raises(ValueError, match="BatchNorm at 'BatchNorm_0'"):
    ghost.capture(model, variables["params"], (x, y))


def test_ghost_batchnorm_with_frozen_statistics_falls_back_exactly():
  model = WithBatchNorm(train=False)
  x, y = images(4, (5,))
  variables = model.init(jax.random.key(0), x[:2])
  params, frozen = variables["params"], {"batch_stats": variables[
      "batch_stats"]}

  def loss_fn(p, example):
    logits = model.apply({"params": p, **frozen}, example[0][None])[0]
    return ghost.softmax_cross_entropy(logits, example[1])

  grads = privacy.per_example_grads(loss_fn, params, (x, y))
  weights = jnp.asarray([0.5, 1.0, 0.0, 2.0])

  @jax.jit
  def run(params):
    contributions = ghost.capture(model, params, (x, y), variables=frozen)
    return contributions.norms(), contributions.weighted_sum(weights)

  norms, total = run(params)
  assert_close(norms, privacy.per_example_global_norms(grads))
  assert_close(total, jax.tree_util.tree_map(
      lambda g: jnp.tensordot(weights, g, axes=1), grads))
