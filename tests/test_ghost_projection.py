"""AdaMix's projection without per-example gradients, against the vmap path.

Two ways give the B x k coefficients c_ij = <g_i, v_j> of each example's
gradient on a public basis V (P x k, orthonormal columns): forward-mode
products (``projection.jvp_coefficients``, any model) and the ghost capture
(``ghost.GhostContributions.project``). Both must equal ``vmap(grad)``
followed by ``flatten(g_i) @ V``, and their clipped k-dimensional sums must
equal the vmap backend projected onto the basis (project, THEN clip),
with padding rows and a NaN row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adamix_jax import privacy
from adamix_jax.privacy import ghost
from adamix_jax.privacy import projection
from adamix_jax.adamix import transform
from adamix_jax.train import full_model

from test_ghost_clipping import assert_close
from test_ghost_clipping import batch_with_nan_and_padding
from test_ghost_clipping import cifar_cnn
from test_ghost_clipping import EmbedModel
from test_ghost_clipping import example_loss
from test_ghost_clipping import images
from test_ghost_clipping import init
from test_ghost_clipping import MixedModel
from test_ghost_clipping import nan_loss_for_negative_labels
from test_ghost_clipping import NormModel
from test_ghost_clipping import SharedLayers


def orthonormal_basis(params, k, seed=0):
  size = transform.flatten(params).shape[0]
  gaussian = jax.random.normal(jax.random.key(seed), (size, k))
  return jnp.linalg.qr(gaussian)[0]


def reference_coefficients(model, params, batch, basis):
  grads = privacy.per_example_grads(full_model.classification_loss(model),
                                    params, batch)
  return jax.vmap(transform.flatten)(grads) @ basis


@pytest.mark.parametrize("chunk_size,examples_per_pass",
                         [(None, None), (1, None), (3, 2), (2, 3)])
def test_ghost_jvp_coefficients_equal_vmap_projection(chunk_size,
                                                      examples_per_pass):
  model = NormModel()
  x, y = images(6, (8, 8, 3))
  params = init(model, x)
  basis = orthonormal_basis(params, k=5)  # 5 = 1 x 5 = 3 + 2 (padded chunk)
  loss_fn = full_model.classification_loss(model)
  got = jax.jit(lambda p, v: projection.jvp_coefficients(
      loss_fn, p, (x, y), v, chunk_size=chunk_size,
      examples_per_pass=examples_per_pass))(params, basis)
  assert got.shape == (6, 5)
  assert_close(got, reference_coefficients(model, params, (x, y), basis))


@pytest.mark.parametrize("model_fn,shape", [
    (NormModel, (8, 8, 3)), (MixedModel, (6, 6, 3)), (SharedLayers, (6, 6, 3)),
    (cifar_cnn, (32, 32, 3))], ids=["norm", "mixed", "shared", "cnn"])
@pytest.mark.parametrize("form", ["ghost", "direct"])
def test_ghost_capture_projection_equals_vmap_projection(model_fn, shape, form):
  model = model_fn()
  x, y = images(4, shape)
  params = init(model, x)
  basis = orthonormal_basis(params, k=6)
  got = jax.jit(lambda p, v: ghost.capture(model, p, (x, y), form=form).project(
      v))(params, basis)
  assert_close(got, reference_coefficients(model, params, (x, y), basis))


def test_ghost_embed_projection_equals_vmap_projection():
  model = EmbedModel()
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 4, size=(5, 7)), jnp.int32)
  y = jnp.asarray(rng.integers(0, 10, size=5), jnp.int32)
  params = init(model, tokens)
  basis = orthonormal_basis(params, k=4)
  for form in ("ghost", "direct"):
    got = ghost.capture(model, params, (tokens, y), form=form).project(basis)
    assert_close(got, reference_coefficients(model, params, (tokens, y),
                                             basis))


def test_ghost_stacked_basis_pytree_gives_the_same_coefficients():
  model = NormModel()
  x, y = images(3, (8, 8, 3))
  params = init(model, x)
  basis = orthonormal_basis(params, k=3)
  stacked = projection.stacked_basis(params, basis)
  loss_fn = full_model.classification_loss(model)
  from_matrix = projection.jvp_coefficients(loss_fn, params, (x, y), basis)
  assert_close(projection.jvp_coefficients(loss_fn, params, (x, y), stacked),
               from_matrix)
  assert_close(ghost.capture(model, params, (x, y)).project(stacked),
               from_matrix)


def test_ghost_and_jvp_clipped_projection_sums_equal_full_model_clipped_sum():
  model = cifar_cnn()
  x, y, mask = batch_with_nan_and_padding()  # a NaN row, two padding rows
  params = init(model, x)
  loss = nan_loss_for_negative_labels
  loss_fn = example_loss(model, loss)
  # The public basis as AdaMix builds it: top-k singular vectors of public
  # per-example gradients (here: other random images).
  public_x, public_y = images(8, (32, 32, 3), seed=7)
  public_grads = privacy.per_example_grads(loss_fn, params,
                                           (public_x, public_y))
  basis = transform.gradient_basis(
      jax.vmap(transform.flatten)(public_grads), 5)
  threshold = jnp.float32(0.3)
  ref_sum, ref_stats = jax.jit(
      lambda p, v: privacy.clipped_grad_sum(
          loss_fn, p, (x, y), threshold, mask,
          pre_clip_transform=transform.projector(v)))(params, basis)
  assert ref_sum.shape == (5,)
  ghost_sum, ghost_stats = jax.jit(
      lambda p, v: ghost.ghost_clipped_projection_sum(
          model, p, (x, y), v, threshold, mask, loss=loss))(params, basis)
  # Captured a few examples at a time: the same coefficients.
  sliced_sum, sliced_stats = jax.jit(
      lambda p, v: ghost.ghost_clipped_projection_sum(
          model, p, (x, y), v, threshold, mask, loss=loss,
          examples_per_pass=3))(params, basis)
  jvp_sum, jvp_stats = jax.jit(
      lambda p, v: projection.jvp_clipped_projection_sum(
          loss_fn, p, (x, y), v, threshold, mask, chunk_size=2,
          examples_per_pass=3))(params, basis)
  for got, stats in ((ghost_sum, ghost_stats), (sliced_sum, sliced_stats),
                     (jvp_sum, jvp_stats)):
    assert np.all(np.isfinite(got))
    assert_close(got, ref_sum)
    assert int(stats.num_nonfinite) == int(ref_stats.num_nonfinite) == 1
    assert int(stats.num_examples) == 4
    assert int(stats.num_clipped) == int(ref_stats.num_clipped) > 0


@pytest.mark.parametrize("method", ["ghost", "jvp"])
def test_ghost_and_jvp_full_model_backend_in_slices_equals_vmap(method):
  """The full-model step's backend (``full_model.contributions_fn``) with
  ``microbatch_size``: the projection is taken a few examples per pass,
  with the same coefficients as the vmap reference."""
  from adamix_jax.adamix import settings  # pylint: disable=g-import-not-at-top
  model = cifar_cnn()
  x, y = images(6, (32, 32, 3), seed=3)
  params = init(model, x)
  basis = orthonormal_basis(params, 4)
  want = reference_coefficients(model, params, (x, y), basis)
  for slice_size in (None, 2, 3):
    flags = settings.PerformanceFlags(projection=method,
                                      microbatch_size=slice_size)
    make = full_model.contributions_fn(full_model.classification_loss(model),
                                       params, (x, y), flags, model=model)
    weights = jnp.arange(1.0, 7.0)
    norms, summed = jax.jit(lambda v: (make(v).norms(),
                                       make(v).weighted_sum(weights)))(basis)
    assert_close(norms, jnp.linalg.norm(want, axis=1))
    assert_close(summed, weights @ want)
  with pytest.raises(ValueError, match="must divide"):
    full_model.contributions_fn(
        full_model.classification_loss(model), params, (x, y),
        settings.PerformanceFlags(projection=method, microbatch_size=4),
        model=model)(basis)
