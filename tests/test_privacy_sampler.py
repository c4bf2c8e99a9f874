"""invariant 4 (docs/design.md): the sampling that runs is the sampling accounted.

``PoissonSampler`` must include each index independently with probability q
at every step (batch size Binomial(N, q)), never truncate, pad to a few
bucket sizes with masked padding, and be a pure function of (seed, step).
The statistical tests come with controls (a fixed batch, a fixed-size
uniform batch) that the same checks reject.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from adamix_jax.privacy import PaddedBatch
from adamix_jax.privacy import PoissonSampler

N, Q, STEPS = 300, 0.1, 1500


@pytest.fixture(scope="module")
def draws():
  sampler = PoissonSampler(num_examples=N, sampling_rate=Q, seed=123)
  return sampler, [sampler.batch(t) for t in range(STEPS)]


def _inclusion_counts(batches, n):
  counts = np.zeros(n, np.int64)
  for b in batches:
    real = b.indices[b.mask.astype(bool)]
    assert len(np.unique(real)) == len(real)  # an index at most once
    counts[real] += 1
  return counts


def _inclusion_chi2_pvalue(counts, steps, q):
  """Counts ~ Binomial(steps, q) independently: sum of z^2 ~ chi2(n)."""
  expected, var = steps * q, steps * q * (1 - q)
  chi2 = np.sum((counts - expected)**2 / var)
  return float(stats.chi2.sf(chi2, df=len(counts)))


def _size_stats_ok(sizes, n, q):
  """Mean within 4 SE of qN and variance near Nq(1-q) (Binomial)."""
  sizes = np.asarray(sizes, np.float64)
  var = n * q * (1 - q)
  mean_ok = abs(sizes.mean() - q * n) < 4 * np.sqrt(var / len(sizes))
  # Sample variance of T draws has relative SE ~ sqrt(2/(T-1)).
  var_ok = abs(sizes.var(ddof=1) / var - 1) < 4 * np.sqrt(2 / (len(sizes) - 1))
  return mean_ok and var_ok


def test_sampler_batch_size_is_binomial_n_q(draws):
  sampler, batches = draws
  sizes = [b.size for b in batches]
  assert _size_stats_ok(sizes, N, Q)
  assert sampler.expected_batch_size == pytest.approx(Q * N)
  # Control: a fixed-size batch of q*N (uniform without replacement) has the
  # right mean but no variance, and is rejected.
  assert not _size_stats_ok([int(Q * N)] * STEPS, N, Q)


def test_sampler_each_index_included_with_probability_q(draws):
  _, batches = draws
  counts = _inclusion_counts(batches, N)
  assert _inclusion_chi2_pvalue(counts, STEPS, Q) > 1e-3
  # Controls computed the same way: a fixed batch (the same q*N indices every
  # step) and a sampler biased towards low indices both fail.
  fixed = np.zeros(N, np.int64)
  fixed[:int(Q * N)] = STEPS
  assert _inclusion_chi2_pvalue(fixed, STEPS, Q) < 1e-12
  rng = np.random.default_rng(0)
  probs = np.where(np.arange(N) < N // 2, 1.2 * Q, 0.8 * Q)
  biased = rng.binomial(STEPS, probs)
  assert _inclusion_chi2_pvalue(biased, STEPS, Q) < 1e-6


def test_sampler_inclusions_independent_across_steps(draws):
  """Whether i is in batch t says nothing about batch t+1 (no epochs/shuffles)."""
  _, batches = draws
  member = np.zeros((STEPS, N), bool)
  for t, b in enumerate(batches):
    member[t, b.indices[b.mask.astype(bool)]] = True
  both = np.sum(member[:-1] & member[1:])
  pairs = (STEPS - 1) * N
  expected = pairs * Q * Q
  assert abs(both - expected) < 5 * np.sqrt(pairs * Q * Q * (1 - Q * Q))
  # Control: a sampler cycling through disjoint blocks (epoch-style) never
  # repeats an index in consecutive steps.
  block = int(Q * N)
  cyclic = np.zeros((STEPS, N), bool)
  for t in range(STEPS):
    start = (t * block) % N
    cyclic[t, start:start + block] = True
  assert np.sum(cyclic[:-1] & cyclic[1:]) < expected / 2


def test_sampler_deterministic_per_seed_and_step():
  a = PoissonSampler(num_examples=500, sampling_rate=0.05, seed=7)
  b = PoissonSampler(num_examples=500, sampling_rate=0.05, seed=7)
  c = PoissonSampler(num_examples=500, sampling_rate=0.05, seed=8)
  for t in (0, 1, 17, 10_000):
    np.testing.assert_array_equal(a.batch(t).indices, b.batch(t).indices)
    np.testing.assert_array_equal(a.batch(t).mask, b.batch(t).mask)
  # Order of calls does not matter (a resumed run reproduces batches).
  first = a.batch(3).indices
  a.batch(4), a.batch(2)
  np.testing.assert_array_equal(a.batch(3).indices, first)
  real = lambda s, t: tuple(s.batch(t).indices[:s.batch(t).size])
  assert len({real(a, t) for t in range(20)}) == 20  # steps differ
  assert all(real(a, t) != real(c, t) for t in range(20))  # seeds differ


def test_sampler_pads_to_few_bucket_sizes(draws):
  sampler, batches = draws
  padded = {b.padded_size for b in batches}
  assert len(padded) <= 5
  for b in batches:
    assert isinstance(b, PaddedBatch)
    assert b.padded_size % sampler.granularity == 0
    assert b.padded_size >= b.size
    assert b.indices.dtype == np.int64 and b.mask.dtype == np.float32
    assert len(b.mask) == b.padded_size
    assert b.mask.sum() == b.size
    # Real entries first, then masked padding pointing at index 0.
    np.testing.assert_array_equal(b.mask[:b.size], 1.0)
    np.testing.assert_array_equal(b.mask[b.size:], 0.0)
    np.testing.assert_array_equal(b.indices[b.size:], 0)
    assert np.all((b.indices >= 0) & (b.indices < N))


@pytest.mark.parametrize("pad_multiple", [1, 8, 24])
def test_sampler_pad_multiple_respected(pad_multiple):
  sampler = PoissonSampler(num_examples=1000, sampling_rate=0.03, seed=1,
                           pad_multiple=pad_multiple)
  assert sampler.granularity % pad_multiple == 0
  for t in range(100):
    b = sampler.batch(t)
    assert b.padded_size % pad_multiple == 0
    assert b.padded_size >= b.size
  full = PoissonSampler(num_examples=1001, sampling_rate=1.0, seed=1,
                        pad_multiple=pad_multiple)
  assert full.batch(0).padded_size % pad_multiple == 0
  explicit = PoissonSampler(num_examples=1000, sampling_rate=0.03, seed=1,
                            pad_multiple=8, granularity=16)
  assert explicit.batch(0).padded_size % 16 == 0


def test_sampler_empty_batch_is_valid_all_padding():
  sampler = PoissonSampler(num_examples=50, sampling_rate=1e-9, seed=0)
  b = sampler.batch(0)
  assert b.size == 0
  assert b.padded_size == sampler.granularity > 0
  np.testing.assert_array_equal(b.mask, 0.0)
  np.testing.assert_array_equal(b.indices, 0)


def test_sampler_never_truncates_a_large_batch():
  # Small expected size: granularity 8; find a step whose batch is far above.
  sampler = PoissonSampler(num_examples=400, sampling_rate=0.01, seed=3)
  assert sampler.granularity == 8
  sizes = np.array([sampler.batch(t).size for t in range(3000)])
  big_step = int(np.argmax(sizes))
  assert sizes[big_step] > sampler.granularity  # well above q*N = 4
  b = sampler.batch(big_step)
  assert b.padded_size >= b.size == sizes[big_step]
  # Every index the Poisson draw selected is there, none dropped.
  rng = np.random.default_rng((3, big_step))
  selected = np.flatnonzero(rng.random(400) < 0.01)
  np.testing.assert_array_equal(np.sort(b.indices[:b.size]), selected)
  # The bucket rule itself never truncates, whatever the size.
  for size in range(0, 401):
    assert sampler.bucket_size(size) >= size


def test_sampler_full_batch_returns_all_indices_every_step():
  sampler = PoissonSampler(num_examples=37, sampling_rate=1.0, seed=0,
                           pad_multiple=8)
  assert sampler.full_batch
  for t in range(5):
    b = sampler.batch(t)
    assert b.size == 37
    assert b.padded_size == 40
    np.testing.assert_array_equal(b.indices[:37], np.arange(37))
    assert b.mask.sum() == 37
  assert sampler.expected_batch_size == 37


@pytest.mark.parametrize("kwargs", [
    dict(num_examples=0, sampling_rate=0.1),
    dict(num_examples=-5, sampling_rate=0.1),
    dict(num_examples=10, sampling_rate=0.0),
    dict(num_examples=10, sampling_rate=-0.1),
    dict(num_examples=10, sampling_rate=1.5),
    dict(num_examples=10, sampling_rate=float("nan")),
    dict(num_examples=10, sampling_rate=0.1, pad_multiple=0),
    dict(num_examples=10, sampling_rate=0.1, pad_multiple=-8),
    dict(num_examples=10, sampling_rate=0.1, pad_multiple=8, granularity=12),
    dict(num_examples=10, sampling_rate=0.1, granularity=0),
    dict(num_examples=10, sampling_rate=0.1, granularity=-4),
])
def test_sampler_invalid_arguments_raise(kwargs):
  with pytest.raises(ValueError):
    PoissonSampler(seed=0, **kwargs)
