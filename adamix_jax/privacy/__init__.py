"""The DP engine: per-example gradients, clipping, noise, sampling, accounting."""

from adamix_jax.privacy.accounting import ACCOUNTANTS
from adamix_jax.privacy.accounting import BudgetExceededError
from adamix_jax.privacy.accounting import calibrate_noise_multiplier
from adamix_jax.privacy.accounting import compute_epsilon
from adamix_jax.privacy.accounting import dp_sgd_event
from adamix_jax.privacy.accounting import PrivacyLedger
from adamix_jax.privacy.clipping import clip_per_example
from adamix_jax.privacy.clipping import clip_scales
from adamix_jax.privacy.clipping import ClippedSum
from adamix_jax.privacy.clipping import clipped_sum
from adamix_jax.privacy.clipping import ClipStats
from adamix_jax.privacy.clipping import per_example_global_norms
from adamix_jax.privacy.noise import add_gaussian_noise
from adamix_jax.privacy.per_example import clipped_grad_sum
from adamix_jax.privacy.per_example import per_example_grads
from adamix_jax.privacy.randomness import MechanismCoins
from adamix_jax.privacy.sampler import PaddedBatch
from adamix_jax.privacy.sampler import PoissonSampler
from adamix_jax.privacy.transform import dp_aggregate
from adamix_jax.privacy.transform import DPAggregateState
from adamix_jax.privacy.transform import private_gradient
from adamix_jax.privacy.transform import privatize_sum

__all__ = [
    "ACCOUNTANTS",
    "BudgetExceededError",
    "calibrate_noise_multiplier",
    "compute_epsilon",
    "dp_sgd_event",
    "PrivacyLedger",
    "clip_per_example",
    "clip_scales",
    "ClippedSum",
    "clipped_sum",
    "ClipStats",
    "per_example_global_norms",
    "add_gaussian_noise",
    "clipped_grad_sum",
    "per_example_grads",
    "MechanismCoins",
    "PaddedBatch",
    "PoissonSampler",
    "dp_aggregate",
    "DPAggregateState",
    "private_gradient",
    "privatize_sum",
]
