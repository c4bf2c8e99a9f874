"""Shared pieces of the multidevice tests (8 simulated CPU devices)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from scipy import stats

NUM_DEVICES = 8


def ks_pvalue(samples: np.ndarray, std: float) -> float:
  return float(stats.kstest(samples / std, "norm").pvalue)


def assert_noise_std(samples: np.ndarray, std: float) -> None:
  """The law is N(0, std^2); the per-device mistakes are rejected."""
  assert samples.size >= 50_000
  assert ks_pvalue(samples, std) > 1e-3
  assert samples.std() == pytest.approx(std, rel=0.03)
  for wrong in (std / np.sqrt(NUM_DEVICES), std * np.sqrt(NUM_DEVICES)):
    assert ks_pvalue(samples, wrong) < 1e-6


def flat(tree) -> np.ndarray:
  return np.concatenate([np.asarray(x, np.float64).ravel()
                         for x in jax.tree_util.tree_leaves(tree)])
