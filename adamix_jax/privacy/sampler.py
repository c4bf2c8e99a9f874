"""Host-side Poisson sampling, padded to a few static shapes for jit.

Each step includes every private index independently with probability q
(invariant 4, docs/design.md: the sampling that runs is the sampling accounted by
``PoissonSampledDpEvent``). The batch is padded with masked dummies up to a
*bucket* size, a multiple of ``granularity``, so jit compiles a handful of
shapes instead of one per realised batch size.

Never truncated: a batch larger than usual gets a larger bucket (one more
compilation) instead of losing examples, so there is no cap whose
truncation would have to be accounted. Empty batches are valid steps: all
padding, the update is noise only.

Each step's draw depends only on (seed, step), so a resumed run that knows
its step counter and its seed reproduces the same batches. The seed is part
of the mechanism's coins and must be secret (``privacy.randomness``): whoever
knows it knows every batch. It is kept out of ``repr``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class PaddedBatch:
  """Indices into the private set, padded; ``mask`` is 1 for real entries."""

  indices: np.ndarray  # int64, (bucket,), padding points at index 0
  mask: np.ndarray  # float32, (bucket,)
  size: int  # number of real examples

  @property
  def padded_size(self) -> int:
    return len(self.indices)


def round_up(value: int, multiple: int) -> int:
  return int(math.ceil(value / multiple) * multiple)


@dataclasses.dataclass(frozen=True)
class PoissonSampler:
  """Poisson (or full-batch, q = 1) sampler over ``num_examples`` indices.

  Example::

    coins = MechanismCoins.fresh()      # secret: privacy.randomness
    sampler = PoissonSampler(num_examples=1000, sampling_rate=0.05,
                             seed=coins.sampler_seed)
    batch = sampler.batch(step)          # PaddedBatch
    x, m = features[batch.indices], batch.mask

  Attributes:
    num_examples: size N of the private set.
    sampling_rate: q in (0, 1]; q = 1 is full batch (no randomness).
    seed: SECRET base seed (``MechanismCoins.sampler_seed``); step t uses
      np.random.default_rng((seed, t)).
    pad_multiple: padded sizes are multiples of this (e.g. the device count
      times the microbatch size).
    granularity: bucket width; default about two standard deviations of the
      batch size, rounded up to ``pad_multiple``.
  """

  num_examples: int
  sampling_rate: float
  seed: int = dataclasses.field(repr=False)
  pad_multiple: int = 1
  granularity: int | None = None

  def __post_init__(self):
    if self.num_examples <= 0:
      raise ValueError(f"num_examples must be > 0, got {self.num_examples}.")
    if not 0.0 < self.sampling_rate <= 1.0:
      raise ValueError(f"sampling_rate must be in (0, 1], got "
                       f"{self.sampling_rate}.")
    if self.pad_multiple <= 0:
      raise ValueError(f"pad_multiple must be > 0, got {self.pad_multiple}.")
    if self.granularity is None:
      std = math.sqrt(self.num_examples * self.sampling_rate *
                      (1.0 - self.sampling_rate))
      object.__setattr__(self, "granularity",
                         round_up(max(8, int(math.ceil(2 * std))),
                                  self.pad_multiple))
    elif self.granularity <= 0 or self.granularity % self.pad_multiple:
      raise ValueError(f"granularity={self.granularity} must be a positive "
                       f"multiple of pad_multiple={self.pad_multiple}.")

  @property
  def full_batch(self) -> bool:
    return self.sampling_rate == 1.0

  @property
  def expected_batch_size(self) -> float:
    """q * N: the fixed normaliser of the noisy sum (never the realised size)."""
    return self.sampling_rate * self.num_examples

  def bucket_size(self, size: int) -> int:
    if self.full_batch:
      return round_up(self.num_examples, self.pad_multiple)
    return max(self.granularity, round_up(size, self.granularity))

  def batch(self, step: int) -> PaddedBatch:
    """The batch of step ``step`` (deterministic in (seed, step))."""
    if self.full_batch:
      indices = np.arange(self.num_examples, dtype=np.int64)
    else:
      rng = np.random.default_rng((self.seed, step))
      indices = np.flatnonzero(
          rng.random(self.num_examples) < self.sampling_rate).astype(np.int64)
    size = len(indices)
    padded = self.bucket_size(size)
    mask = np.zeros(padded, np.float32)
    mask[:size] = 1.0
    return PaddedBatch(
        indices=np.concatenate([indices, np.zeros(padded - size, np.int64)]),
        mask=mask, size=size)
