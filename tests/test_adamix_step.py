"""The AdaMix step on a linear head keeps the privacy invariants
(docs/design.md); what every backend of the mechanism shares (sensitivity,
padding, non-finite rows, the noise law) is in tests/test_mechanism.py.

* Invariant 1 (sensitivity): each private example's contribution to the
  released sum is bounded by C_t AFTER projection onto the public subspace,
  in coefficient space and (the maps being isometries) in parameter space.
* Invariant 2 (noise): through a whole step, N(0, (sigma C_t)^2) with C_t
  the adaptive public threshold computed inside the step.
* Invariant 3 (public only): C_t and the subspace do not depend on private
  data; DP-SGD touches no public data at all.
* Invariant 5 (ledger): the loop records the steps it ran and refuses a run
  that would exceed the target before taking any step.

The closed-form path (never forms a per-example (d+1)*c gradient) is held
equal to the explicit ``jax.vmap(jax.grad)`` path, so the bounds proved by
the simple path carry over. Bound checks have controls that fail without
clipping, so the checks have teeth.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from adamix_jax.adamix import linear_step as step_lib
from adamix_jax.adamix import settings
from adamix_jax.adamix import subspace as subspace_lib
from adamix_jax.adamix import threshold as threshold_lib
from adamix_jax.configs import base
from adamix_jax.experiment import recipe as recipe_lib
from adamix_jax.models import linear
from adamix_jax.privacy import accounting
from adamix_jax.privacy import mechanism
from adamix_jax.privacy.randomness import MechanismCoins
from adamix_jax.train import linear_head
from adamix_jax.train import placement as placement_lib

DIM, CLASSES = 5, 4  # d, c: (d+1)*c = 24 parameters
NUM_PUBLIC = 12
RANKS = {"none": 0, "features": 3, "gradients": 5}
# float32 scaling g * (C / |g|) lands a few ulps off C, and the other
# examples' clipped terms add rounding of the same order to the difference.
ATOL = 1e-5



def _rng(seed):
  return np.random.default_rng(seed)


def _public(seed: int = 0, n: int = NUM_PUBLIC) -> step_lib.PublicData:
  rng = _rng(seed)
  x = rng.normal(size=(n, DIM)).astype(np.float32)
  y = rng.integers(0, CLASSES, n)
  return step_lib.PublicData(x_aug=linear.augment(jnp.asarray(x)),
                             y=jnp.asarray(y, jnp.int32))


def _matrix(seed: int = 1, scale: float = 0.5) -> jax.Array:
  rng = _rng(seed)
  return jnp.asarray(scale * rng.normal(size=(DIM + 1, CLASSES)), jnp.float32)


def _subspace(kind: str, matrix, public) -> subspace_lib.Subspace:
  """The production builder: "gradients" from public residuals at ``matrix``."""
  spec = settings.SubspaceSpec(kind, RANKS[kind])
  return linear_head.initial_subspace(spec, matrix, public)


def _private_batch(seed: int = 2, real: int = 8, pad: int = 3):
  """Real rows with norms spread over 2.5 decades, then ``pad`` masked rows."""
  rng = _rng(seed)
  x = rng.normal(size=(real + pad, DIM)).astype(np.float32)
  x[:real] *= np.logspace(-1, 1.5, real, dtype=np.float32)[:, None]
  y = rng.integers(0, CLASSES, real + pad)
  mask = np.concatenate([np.ones(real), np.zeros(pad)]).astype(np.float32)
  return (linear.augment(jnp.asarray(x)), jnp.asarray(y, jnp.int32),
          jnp.asarray(mask))


@dataclasses.dataclass(frozen=True)
class _Cfg:
  """A step's settings and its performance flags."""

  step: settings.StepConfig
  flags: settings.PerformanceFlags


def _config(path: str = "closed_form", microbatch_size=None, **kwargs) -> _Cfg:
  defaults = dict(noise_multiplier=0.7, expected_batch_size=4.0,
                  learning_rate=0.5)
  defaults.update(kwargs)
  return _Cfg(settings.StepConfig(**defaults),
              settings.PerformanceFlags(path=path,
                                        microbatch_size=microbatch_size))


def _contributions(cfg, subspace, matrix, x_aug, y, kernel=None):
  return step_lib.matrix_contributions(subspace, matrix, x_aug, y, cfg.flags,
                                       kernel)


def _clipped_coefficient_sum(cfg, subspace, matrix, x_aug, y, mask, threshold,
                             kernel=None):
  return mechanism.clipped_sum(
      _contributions(cfg, subspace, matrix, x_aug, y, kernel), threshold, mask)


def _private_gradient(cfg, subspace, matrix, x_aug, y, mask, threshold, key,
                      kernel=None):
  """The released private gradient: map_back(noisy coefficients / q N)."""
  noisy, stats = mechanism.privatize(
      _contributions(cfg, subspace, matrix, x_aug, y, kernel), threshold,
      mask, key, noise_multiplier=cfg.step.noise_multiplier,
      normalizer=cfg.step.expected_batch_size)
  return subspace_lib.map_back(subspace, noisy), stats


def _public_threshold(cfg, subspace, matrix, public):
  e = linear.residuals(matrix, public.x_aug, public.y)
  kernel = public.gram if subspace.kind == "gradients" else None
  norms = subspace_lib.closed_form_norms(subspace, public.x_aug, e, kernel)
  return threshold_lib.public_threshold(
      norms, adaptive=cfg.step.adaptive_threshold,
      quantile=cfg.step.threshold_quantile, clip_norm=cfg.step.clip_norm)


def _train_step(cfg, state, subspace, public, private_x, private_y, indices,
                mask, average_from, kernel=None):
  """One matrix-form step (lr multiplier 1) -> (state, metrics)."""
  state, metrics, _ = step_lib.private_step(
      cfg.step.structure(), cfg.flags, None, cfg.step.numbers(), state,
      subspace, public,
      step_lib.PrivateData(x_aug=private_x, y=private_y, kernel=kernel),
      indices, mask, average_from, jnp.ones((8,), jnp.float32))
  return state, metrics


def _median_threshold(subspace, matrix, x_aug, y, mask) -> jax.Array:
  """A threshold that clips about half of the real examples."""
  e = linear.residuals(matrix, x_aug, y)
  norms = np.asarray(subspace_lib.closed_form_norms(subspace, x_aug, e))
  return jnp.float32(np.median(norms[np.asarray(mask) > 0]))


def _norm(a) -> float:
  return float(np.linalg.norm(np.asarray(a, np.float64).ravel()))


def _diff(a, b) -> float:
  return _norm(np.asarray(a, np.float64) - np.asarray(b, np.float64))


# --- closed form == vmap -----------------------------------------------------


def _check_closed_form_equals_vmap(kind: str) -> None:
  public = _public()
  matrix = _matrix()
  subspace = _subspace(kind, matrix, public)
  x_aug, y, mask = _private_batch()
  threshold = _median_threshold(subspace, matrix, x_aug, y, mask)
  key = jax.random.key(3)
  # closed form (also with a cached private-public kernel for "gradients"),
  # and vmap (also microbatched: 11 rows in microbatches of 4, padded).
  variants = {
      "closed_form": (_config("closed_form"), None),
      "vmap": (_config("vmap"), None),
  }
  if kind == "gradients":  # the most involved transform; kind-generic paths
    variants["vmap_microbatched"] = (_config("vmap", microbatch_size=4), None)
    variants["closed_form_kernel"] = (_config("closed_form"),
                                      x_aug @ public.x_aug.T)
  results = {name: _private_gradient(cfg, subspace, matrix, x_aug, y, mask,
                                     threshold, key, kernel)
             for name, (cfg, kernel) in variants.items()}
  g_vm, s_vm = results["vmap"]
  assert g_vm.shape == (DIM + 1, CLASSES)
  # The batch really mixes clipped and unclipped examples, padding excluded.
  assert int(s_vm.num_examples) == 8
  assert 0 < int(s_vm.num_clipped) < 8
  assert int(s_vm.num_nonfinite) == 0
  for name, (g, s) in results.items():
    np.testing.assert_allclose(g, g_vm, rtol=1e-5, atol=ATOL, err_msg=name)
    assert int(s.num_examples) == 8, name
    assert int(s.num_clipped) == int(s_vm.num_clipped), name
    assert int(s.num_nonfinite) == 0, name
  # Noise is on (sigma > 0): the released gradient is not the clipped sum.
  total, _ = _clipped_coefficient_sum(_config(), subspace, matrix, x_aug, y,
                                      mask, threshold)
  clean = subspace_lib.map_back(subspace, total) / 4.0
  assert _diff(g_vm, clean) > 1e-2

  # A whole train_step: adaptive threshold, public gradient mix, pull to W_0;
  # closed form with and without the cached public Gram (which, for
  # "gradients", maps private and public gradients back in one product) and
  # the cached private kernel, against vmap.
  rng = _rng(4)
  private_x = linear.augment(jnp.asarray(
      rng.normal(size=(10, DIM)) * np.logspace(-1, 1.5, 10)[:, None],
      jnp.float32))
  private_y = jnp.asarray(rng.integers(0, CLASSES, 10), jnp.int32)
  indices = jnp.asarray([0, 1, 2, 3, 4, 5, 6, 7, 0, 0])
  step_mask = jnp.asarray([1.0] * 8 + [0.0] * 2)
  anchor = linear.unstack(_matrix(5))
  start = linear.unstack(matrix)
  cached = step_lib.make_public_data(public.x_aug, public.y)
  cached_subspace = _subspace(kind, matrix, cached)
  runs = {
      "vmap": ("vmap", public, subspace, None),
      "closed_form": ("closed_form", public, subspace, None),
  }
  if kind == "gradients":  # the caches are only used by this kind
    runs["closed_form_gram"] = ("closed_form", cached, cached_subspace, None)
    runs["closed_form_gram_kernel"] = ("closed_form", cached, cached_subspace,
                                       private_x @ public.x_aug.T)
  outputs = {}
  for name, (path, pub, sub, kernel) in runs.items():
    cfg = _config(path, adaptive_threshold=True, threshold_quantile=0.5,
                  public_weight=0.3, pull=0.2)
    state = step_lib.init_matrix_state(anchor, jax.random.key(6),
                                       init_params=start)
    outputs[name] = _train_step(cfg, state, sub, pub, private_x, private_y,
                                indices, step_mask, jnp.int32(0), kernel)
  st_vm, m_vm = outputs["vmap"]
  assert _diff(st_vm.matrix, matrix) > 1e-3  # the step moved
  assert int(m_vm.batch_size) == 8
  assert 0 < int(m_vm.num_clipped) < 8
  for name, (st, m) in outputs.items():
    np.testing.assert_allclose(st.matrix, st_vm.matrix, rtol=1e-5, atol=ATOL,
                               err_msg=name)
    np.testing.assert_allclose(st.average, st_vm.average, rtol=1e-5,
                               atol=ATOL, err_msg=name)
    np.testing.assert_allclose(m.threshold, m_vm.threshold, rtol=1e-6,
                               err_msg=name)
    assert int(m.batch_size) == 8, name
    assert int(m.num_clipped) == int(m_vm.num_clipped), name
    assert np.array_equal(jax.random.key_data(st.key),
                          jax.random.key_data(st_vm.key)), name


def test_closed_form_equals_vmap_none():
  _check_closed_form_equals_vmap("none")


def test_closed_form_equals_vmap_features():
  _check_closed_form_equals_vmap("features")


def test_closed_form_equals_vmap_gradients():
  _check_closed_form_equals_vmap("gradients")


# --- sensitivity: clip after projection --------------------------------------


@pytest.mark.parametrize("kind", ["features", "gradients"])
@pytest.mark.parametrize("path", settings.PATHS)
def test_sensitivity_clipping_happens_after_projection(kind, path):
  """An example whose projected norm p is below the threshold but whose full
  gradient norm f is above it is not clipped at all (clip-then-project
  would scale it by t / f < 1), and the released sum in parameter space
  moves by at most C_t when a huge example is added."""
  public = _public()
  matrix = _matrix()
  subspace = _subspace(kind, matrix, public)
  cfg = _config(path, noise_multiplier=0.0, expected_batch_size=1.0,
                adaptive_threshold=True, threshold_quantile=0.5)
  x_aug, y, mask = _private_batch(real=8, pad=2)
  one_x, one_y, one_mask = x_aug[:1], y[:1], jnp.ones(1)
  e = linear.residuals(matrix, one_x, one_y)
  projected = float(subspace_lib.closed_form_norms(subspace, one_x, e)[0])
  full = _norm(one_x) * _norm(e)
  assert full > 1.2 * projected, (kind, full, projected)
  between = jnp.float32((projected + full) / 2)
  clipped, stats = _clipped_coefficient_sum(cfg, subspace, matrix, one_x,
                                            one_y, one_mask, between)
  unclipped, _ = _clipped_coefficient_sum(cfg, subspace, matrix, one_x, one_y,
                                          one_mask, jnp.float32(1e9))
  assert int(stats.num_clipped) == 0
  np.testing.assert_allclose(clipped, unclipped, rtol=1e-6)
  assert _norm(clipped) == pytest.approx(projected, rel=1e-5)

  # Parameter space (mapped back through the isometry): still at most C_t.
  c_t = float(_public_threshold(cfg, subspace, matrix, public))
  assert c_t != cfg.step.clip_norm  # really the adaptive public threshold
  rng = _rng(7)
  huge = linear.augment(jnp.asarray(1e3 * rng.normal(size=(1, DIM)),
                                    jnp.float32))
  x_plus = jnp.concatenate([x_aug, huge])
  y_plus = jnp.concatenate([y, jnp.asarray([1], jnp.int32)])
  released = [
      _private_gradient(cfg, subspace, matrix, x_plus, y_plus,
                        jnp.concatenate([mask, jnp.asarray([m], jnp.float32)]),
                        jnp.float32(c_t), jax.random.key(0))[0]
      for m in (0.0, 1.0)]
  diff = _diff(*released)
  assert 0.99 * c_t <= diff <= c_t + ATOL, (kind, path, diff, c_t)


# --- public-only quantities --------------------------------------------------


def _leaves(tree) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _assert_bitwise_equal(a, b, what) -> None:
  leaves_a, leaves_b = _leaves(a), _leaves(b)
  assert len(leaves_a) == len(leaves_b), what
  for x, y in zip(leaves_a, leaves_b):
    assert x.shape == y.shape and np.array_equal(x, y), what


def test_threshold_and_subspace_independent_of_private_data(monkeypatch):
  rng = _rng(22)
  public_x = rng.normal(size=(NUM_PUBLIC, DIM)).astype(np.float32)
  public_y = rng.integers(0, CLASSES, NUM_PUBLIC)
  anchor = linear.unstack(_matrix())
  w0 = linear.stack(anchor)
  # Two private sets that differ in everything: size, scale, offset, labels.
  private_sets = [
      (rng.normal(size=(9, DIM)).astype(np.float32),
       rng.integers(0, CLASSES, 9)),
      (100 * rng.normal(size=(14, DIM)).astype(np.float32) + 3,
       rng.integers(0, CLASSES, 14)),
  ]

  # Direct calls, as the loop makes them: public arrays in, nothing private.
  def public_quantities(private_x, private_y):
    del private_x, private_y  # the API admits no private array
    out = {}
    for cached in (False, True):
      public = step_lib.make_public_data(
          linear.augment(jnp.asarray(public_x)),
          jnp.asarray(public_y, jnp.int32), cache_gram=cached)
      for kind in ("features", "gradients"):
        sub = linear_head.initial_subspace(
            settings.SubspaceSpec(kind, RANKS[kind]), w0, public)
        cfg = _config(adaptive_threshold=True, threshold_quantile=0.7)
        out[kind, cached] = (sub, _public_threshold(cfg, sub, w0, public))
    return out

  first, second = (public_quantities(*p) for p in private_sets)
  for key in first:
    _assert_bitwise_equal(first[key], second[key], key)

  # Through the training loop: spy on what the jitted step is handed (the
  # subspace and public data) and record C_t from on_step, for both private
  # sets. Step 0 depends on (W_0, public) only: bitwise identical. Later
  # steps depend on W_t, here a noiseless function of the private data: C_t
  # differs, so the recorded thresholds are live values (the check has teeth).
  # Both step forms (the dual form is the default for "gradients").
  handed = []
  real_jit = placement_lib.cached_jit

  def spying_jit(mesh, fn, **kwargs):
    jitted = real_jit(mesh, fn, **kwargs)
    if fn is not step_lib.private_step:
      return jitted

    def spy(structure, flags, refresh, numbers, state, subspace, public,
            *args):
      # Step t hands over the subspace it was given (refreshed at W_t inside
      # the step when ``refresh``) and the public data.
      out = jitted(structure, flags, refresh, numbers, state, subspace,
                   public, *args)
      handed.append((_leaves(out[2]), _leaves(public)))
      return out
    return spy

  monkeypatch.setattr(placement_lib, "cached_jit", spying_jit)
  step_cfg = settings.StepConfig(noise_multiplier=0.0, expected_batch_size=5.0,
                                 learning_rate=1.0, adaptive_threshold=True,
                                 threshold_quantile=0.5)
  for kind, representation in (("features", "matrix"),
                               ("gradients", "matrix"),
                               ("gradients", "dual")):
    spec = settings.SubspaceSpec(kind, RANKS[kind], refresh_every=1)
    thresholds, inputs = [], []
    for private_x, private_y in private_sets:
      handed.clear()
      run = []
      linear_head.train_private_head(
          private_x, private_y, public_x, public_y, anchor, step_cfg, steps=3,
          sampling_rate=1.0, coins=MechanismCoins.insecure_from_seed(0),
          ledger=accounting.PrivacyLedger(delta=1e-5), subspace=spec,
          on_step=lambda t, m: run.append(np.asarray(m.threshold)),
          flags=settings.PerformanceFlags(representation=representation))
      assert len(run) == len(handed) == 3
      thresholds.append(run)
      inputs.append(list(handed))
    (run_a, run_b), (in_a, in_b) = thresholds, inputs
    assert np.array_equal(run_a[0], run_b[0]), kind
    assert not np.array_equal(run_a[2], run_b[2]), kind
    _assert_bitwise_equal(in_a[0], in_b[0], kind)  # subspace and public
    # ... and they are the public quantities computed directly (up to the
    # rounding of jit vs eager).
    sub_direct, threshold_direct = first[kind, kind == "gradients"]
    for x, y in zip(in_a[0][0], _leaves(sub_direct)):
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5, err_msg=kind)
    cfg = _config(adaptive_threshold=True, threshold_quantile=0.5)
    plain_public = step_lib.PublicData(
        x_aug=linear.augment(jnp.asarray(public_x)),
        y=jnp.asarray(public_y, jnp.int32))
    np.testing.assert_allclose(
        run_a[0], _public_threshold(cfg, sub_direct, w0, plain_public),
        rtol=1e-5)
    if kind == "gradients":  # refreshed at W_t each step: W_2 differs
      assert not all(np.array_equal(x, y)
                     for x, y in zip(in_a[2][0], in_b[2][0]))


# --- noise -------------------------------------------------------------------


def _noise_setup(rank: int):
  """A wide head (200 x 60 = 12000 parameters) and its public data."""
  d, c = 199, 60
  rng = _rng(30)
  public_x = rng.normal(size=(40, d)).astype(np.float32)
  public = step_lib.PublicData(x_aug=linear.augment(jnp.asarray(public_x)),
                               y=jnp.asarray(rng.integers(0, c, 40),
                                             jnp.int32))
  matrix = jnp.asarray(0.05 * rng.normal(size=(d + 1, c)), jnp.float32)
  kind = "features" if rank else "none"
  subspace = linear_head.initial_subspace(
      settings.SubspaceSpec(kind, rank), matrix, public)
  return d, c, public, matrix, subspace


def _check_std(samples, expected):
  samples = np.asarray(samples, np.float64).ravel()
  std = samples.std()
  assert abs(samples.mean()) < 0.05 * expected
  assert std == pytest.approx(expected, rel=0.05), (std, expected)
  # The check has teeth: 2/3 and 3/2 of the right std are rejected.
  for wrong in (2 / 3 * expected, 1.5 * expected):
    assert std != pytest.approx(wrong, rel=0.05)


def test_noise_std_is_sigma_times_threshold():
  sigma, batch_norm = 1.3, 2.5  # expected_batch_size q N
  for rank in (0, 30):
    d, c, public, matrix, subspace = _noise_setup(rank)
    cfg = _config(noise_multiplier=sigma, expected_batch_size=batch_norm,
                  adaptive_threshold=True, threshold_quantile=0.5)
    c_t = _public_threshold(cfg, subspace, matrix, public)
    assert float(c_t) != cfg.step.clip_norm and float(c_t) > 0
    expected = sigma * float(c_t)

    def coefficients(gradient):
      # Undo the map back (orthonormal basis) and the 1 / (q N) scaling.
      if subspace.kind == "none":
        return np.asarray(gradient) * batch_norm
      return np.asarray(subspace.feature_basis.T @ gradient) * batch_norm

    # (a) Only padding: the released gradient is pure noise.
    rng = _rng(31)
    x_aug = linear.augment(jnp.asarray(rng.normal(size=(64, d)), jnp.float32))
    y = jnp.asarray(rng.integers(0, c, 64), jnp.int32)
    g, stats = _private_gradient(cfg, subspace, matrix, x_aug, y,
                                 jnp.zeros(64), c_t, jax.random.key(32))
    assert int(stats.num_examples) == 0
    _check_std(coefficients(g), expected)
    if rank:  # noise lives in the subspace: k * c coordinates, not (d+1) * c
      assert np.linalg.norm(np.asarray(g) - np.asarray(
          subspace.feature_basis @ (subspace.feature_basis.T @ g))) < 1e-3 * (
              np.linalg.norm(np.asarray(g)))

    # (b) 64 REAL examples with exactly zero residual (the bias forces
    # class 0 by a margin of 1e3): noise is added once for the batch, not
    # once per example (which would give 8x the std).
    zero_matrix = jnp.zeros((d + 1, c), jnp.float32).at[-1, 0].set(1e3)
    x_zero = linear.augment(jnp.zeros((64, d), jnp.float32))
    y_zero = jnp.zeros(64, jnp.int32)
    assert not np.any(np.asarray(linear.residuals(zero_matrix, x_zero,
                                                  y_zero)))
    g, stats = _private_gradient(cfg, subspace, zero_matrix, x_zero, y_zero,
                                 jnp.ones(64), c_t, jax.random.key(33))
    assert int(stats.num_examples) == 64
    _check_std(coefficients(g), expected)

  # (c) Through train_step with the adaptive C_t computed inside: with only
  # padding, lr = 1 and no normalisation, W_{t+1} = W_t - noise / (q N).
  d, c, public, matrix, subspace = _noise_setup(0)
  cfg = _config(noise_multiplier=sigma, expected_batch_size=batch_norm,
                learning_rate=1.0, normalize_by_threshold=False,
                adaptive_threshold=True, threshold_quantile=0.5)
  state = step_lib.init_matrix_state(linear.unstack(matrix),
                                     jax.random.key(34))
  private_x = linear.augment(jnp.ones((4, d), jnp.float32))
  private_y = jnp.zeros(4, jnp.int32)
  new_state, metrics = _train_step(
      cfg, state, subspace, public, private_x, private_y,
      jnp.zeros(16, jnp.int32), jnp.zeros(16), jnp.int32(0))
  c_t = _public_threshold(cfg, subspace, matrix, public)
  assert float(metrics.threshold) == float(c_t)
  _check_std((np.asarray(matrix) - np.asarray(new_state.matrix)) * batch_norm,
             sigma * float(c_t))


# --- DP-SGD baseline: no public data -----------------------------------------


def _small_config(schedule: str = "fixed") -> ml_collections.ConfigDict:
  config = base.get_config()
  config.train.schedule = schedule
  config.train.epochs = 2
  config.train.sampling_rate = 1.0  # T = 2 full-batch steps: cheap to account
  config.rules.min_steps = config.rules.max_steps = 2  # the same T
  config.progress = False
  # The runs below are compared with each other: the same coins for each.
  config.insecure_reproducible_noise = True
  return config


def _seed_data(public_seed: int, num_public: int) -> recipe_lib.SeedData:
  d, c = 8, 3
  rng = _rng(40)
  private_x = rng.normal(size=(60, d)).astype(np.float32)
  private_y = rng.integers(0, c, 60)
  test_x = rng.normal(size=(20, d)).astype(np.float32)
  test_y = rng.integers(0, c, 20)
  pub = _rng(public_seed)
  return recipe_lib.SeedData(
      public_x=pub.normal(size=(num_public, d)).astype(np.float32),
      public_y=pub.integers(0, c, num_public),
      private_x=private_x, private_y=private_y, test_x=test_x, test_y=test_y,
      num_classes=c,
      public_params={"kernel": pub.normal(size=(d, c)).astype(np.float32),
                     "bias": pub.normal(size=(c,)).astype(np.float32)},
      zero_shot=False)


def _same_second_moment(data: recipe_lib.SeedData, seed: int):
  """The public features permuted, with other labels and another public
  model: every public statistic the noise-aware rules read is unchanged."""
  rng = _rng(seed)
  order = rng.permutation(len(data.public_y))
  return dataclasses.replace(
      data, public_x=data.public_x[order],
      public_y=rng.integers(0, data.num_classes, len(data.public_y)),
      public_params={k: v + rng.normal(size=v.shape).astype(np.float32)
                     for k, v in data.public_params.items()})


@pytest.mark.parametrize("schedule", ["fixed", "noise_aware"])
def test_dp_sgd_uses_no_public_data(schedule):
  config = _small_config(schedule)
  recipe = recipe_lib.make_recipe(config)
  a = _seed_data(41, 9)
  if schedule == "fixed":
    # Different public features, labels, set sizes and public models.
    b = _seed_data(42, 15)
  else:
    # The noise-aware step size reads the public second moment (a rule,
    # like the fixed one's constant); nothing else of the public data may
    # reach DP-SGD: not its labels, not w_0, not the examples themselves.
    b = _same_second_moment(a, 7)
    plan = recipe.plan("dp_sgd", 2.0, a)
    assert len(plan.inputs["public_x"]) == len(plan.inputs["public_y"]) == 0
    assert plan.step_config.public_weight == 0.0
    for leaf in plan.inputs["anchor_params"].values():
      assert not np.any(leaf)  # zero start, not w_0
  data = {"a": a, "b": b, "c": _seed_data(43, 9)}
  params = {}
  for method, names in (("dp_sgd", "ab"), ("adamix", "ac")):
    for name in names:
      run = recipe.train_dp(method, 2.0, 0, data[name])
      params[method, name] = run.params
      assert run.ledger.total_steps == run.meta["steps"] == 2
  for leaf in ("kernel", "bias"):
    np.testing.assert_array_equal(params["dp_sgd", "a"][leaf],
                                  params["dp_sgd", "b"][leaf])
  # Control: AdaMix does use the public data, so a change in it shows.
  assert not np.array_equal(params["adamix", "a"]["kernel"],
                            params["adamix", "c"]["kernel"])


# --- ledger ------------------------------------------------------------------


def _ledger_run(ledger, steps, calls, sigma=1.0, rate=0.5):
  rng = _rng(50)
  cfg = settings.StepConfig(noise_multiplier=sigma,
                            expected_batch_size=rate * 16, learning_rate=1.0)
  return linear_head.train_private_head(
      rng.normal(size=(16, DIM)).astype(np.float32),
      rng.integers(0, CLASSES, 16), np.zeros((0, DIM), np.float32),
      np.zeros((0,), np.int64), linear.zeros(DIM, CLASSES), cfg, steps=steps,
      sampling_rate=rate, ledger=ledger,
      coins=MechanismCoins.insecure_from_seed(0),
      on_step=lambda t, m: calls.append(t))


def test_train_private_head_records_ledger():
  ledger = accounting.PrivacyLedger(delta=1e-5, target_epsilon=50.0)
  calls = []
  params = _ledger_run(ledger, 4, calls)
  assert calls == [0, 1, 2, 3]
  assert ledger.total_steps == 4
  assert [dataclasses.astuple(e) for e in ledger.entries] == [(1.0, 0.5, 4)]
  assert ledger.epsilon() == pytest.approx(
      accounting.compute_epsilon(1.0, 0.5, 4, 1e-5))
  assert ledger.epsilon() <= 50.0
  assert np.all(np.isfinite(params["kernel"]))


def test_train_private_head_budget_guard_refuses_before_any_step():
  needed = accounting.compute_epsilon(1.0, 0.5, 4, 1e-5)
  # A fresh ledger whose target is below what the 4-step run needs.
  ledger = accounting.PrivacyLedger(delta=1e-5, target_epsilon=0.9 * needed)
  calls = []
  with pytest.raises(accounting.BudgetExceededError):
    _ledger_run(ledger, 4, calls)
  assert calls == [] and ledger.total_steps == 0
  # A resumed ledger: 2 steps already spent, 4 more would exceed the target
  # even though 4 alone would not.
  ledger = accounting.PrivacyLedger(delta=1e-5, target_epsilon=1.01 * needed)
  ledger.record(1.0, 0.5, steps=2)
  with pytest.raises(accounting.BudgetExceededError):
    _ledger_run(ledger, 4, calls)
  assert calls == [] and ledger.total_steps == 2


# --- a public feature map (W~ = W~_0 + M V) -----------------------------------


def _feature_map_run(x, y, mask_last: bool, feature_map, noise=0.0):
  """One full-batch step from V = 0 (lr 1, q N = N): returns W~_1."""
  rng = _rng(61)
  xp = rng.normal(size=(9, DIM)).astype(np.float32)
  w0 = {"kernel": 0.3 * rng.normal(size=(DIM, CLASSES)).astype(np.float32),
        "bias": np.zeros(CLASSES, np.float32)}
  if not mask_last:
    x, y = x[:-1], y[:-1]
  config = settings.StepConfig(noise_multiplier=noise,
                               expected_batch_size=1.0, learning_rate=1.0,
                               clip_norm=0.5, normalize_by_threshold=False)
  params = linear_head.train_private_head(
      x, y, xp, np.arange(9) % CLASSES, w0, config, steps=1,
      sampling_rate=1.0, average_tail=0.0,
      ledger=accounting.PrivacyLedger(1e-5),
      coins=MechanismCoins.insecure_from_seed(0), feature_map=feature_map)
  return np.asarray(linear.stack(params), np.float64), np.asarray(
      linear.stack(w0), np.float64)


def test_sensitivity_feature_map_clips_in_the_mapped_space():
  """With a public map M the head trains V on z = x~ M and releases
  W~_0 + M V: a neighbour moves V by at most C (clipping acts on the
  gradient w.r.t. V), whatever M does to norms; the identity map is the
  plain run."""
  rng = _rng(60)
  x = rng.normal(size=(30, DIM)).astype(np.float32)
  x[-1] *= 1e3  # the neighbour: a huge example, clipped
  y = np.arange(30) % CLASSES
  m = (rng.normal(size=(DIM + 1, DIM + 1)) *
       np.logspace(-1, 1, DIM + 1)[None, :]).astype(np.float32)  # inflating
  released = [_feature_map_run(x, y, last, m)[0] for last in (False, True)]
  w0 = _feature_map_run(x, y, False, m)[1]
  v = [np.linalg.solve(m.astype(np.float64), r - w0) for r in released]
  diff = np.linalg.norm(v[1] - v[0])
  assert 0.99 * 0.5 <= diff <= 0.5 * (1 + 1e-4), diff
  # Control: in the original space the same release moves by more than C
  # (M inflates): the bound holds for V, the quantity clipped and noised.
  assert np.linalg.norm(released[1] - released[0]) > 0.5
  # The identity map is the plain run from W~_0.
  plain_config = settings.StepConfig(noise_multiplier=0.0,
                                     expected_batch_size=1.0,
                                     learning_rate=1.0, clip_norm=0.5,
                                     normalize_by_threshold=False)
  eye = np.eye(DIM + 1, dtype=np.float32)
  mapped, _ = _feature_map_run(x, y, True, eye)
  rng = _rng(61)
  xp = rng.normal(size=(9, DIM)).astype(np.float32)
  w0_params = {"kernel": 0.3 * rng.normal(size=(DIM, CLASSES)).astype(
      np.float32), "bias": np.zeros(CLASSES, np.float32)}
  plain = linear_head.train_private_head(
      x, y, xp, np.arange(9) % CLASSES, w0_params, plain_config, steps=1,
      sampling_rate=1.0, average_tail=0.0,
      ledger=accounting.PrivacyLedger(1e-5),
      coins=MechanismCoins.insecure_from_seed(0))
  np.testing.assert_allclose(mapped, linear.stack(plain), rtol=1e-5,
                             atol=1e-5)
