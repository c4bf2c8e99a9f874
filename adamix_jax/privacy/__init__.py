"""The DP engine: the one mechanism and what it needs (clipping, noise,
sampling, secret coins, accounting), for any pytree model.

Each file names the invariant it keeps (docs/design.md): ``clipping``
(1: bounded contributions), ``noise`` (2: one noise draw on the global sum),
``sampler`` (4: the sampling that runs is the one accounted), ``accounting``
(5: the ledger is the source of truth), ``randomness`` (6: secret coins);
``mechanism`` puts them together, and is the only caller of ``noise``.
"""

from adamix_jax.privacy.accounting import ACCOUNTANTS
from adamix_jax.privacy.accounting import BudgetExceededError
from adamix_jax.privacy.accounting import calibrate_noise_multiplier
from adamix_jax.privacy.accounting import compute_epsilon
from adamix_jax.privacy.accounting import dp_sgd_event
from adamix_jax.privacy.accounting import PrivacyLedger
from adamix_jax.privacy.clipping import clip_scales
from adamix_jax.privacy.clipping import ClipStats
from adamix_jax.privacy.clipping import per_example_global_norms
from adamix_jax.privacy.mechanism import clipped_sum as mechanism_clipped_sum
from adamix_jax.privacy.mechanism import Contributions
from adamix_jax.privacy.mechanism import Microbatched
from adamix_jax.privacy.mechanism import privatize
from adamix_jax.privacy.mechanism import ShardMapped
from adamix_jax.privacy.per_example import clipped_grad_sum
from adamix_jax.privacy.per_example import clipped_sum
from adamix_jax.privacy.per_example import per_example_grads
from adamix_jax.privacy.per_example import PerExampleGradients
from adamix_jax.privacy.per_example import vmap_contributions
from adamix_jax.privacy.randomness import MechanismCoins
from adamix_jax.privacy.sampler import PaddedBatch
from adamix_jax.privacy.sampler import PoissonSampler
from adamix_jax.privacy.transform import dp_aggregate
from adamix_jax.privacy.transform import DPAggregateState
from adamix_jax.privacy.transform import private_gradient

__all__ = [
    "ACCOUNTANTS",
    "BudgetExceededError",
    "calibrate_noise_multiplier",
    "compute_epsilon",
    "dp_sgd_event",
    "PrivacyLedger",
    "clip_scales",
    "ClipStats",
    "per_example_global_norms",
    "mechanism_clipped_sum",
    "Contributions",
    "Microbatched",
    "privatize",
    "ShardMapped",
    "clipped_grad_sum",
    "clipped_sum",
    "per_example_grads",
    "PerExampleGradients",
    "vmap_contributions",
    "MechanismCoins",
    "PaddedBatch",
    "PoissonSampler",
    "dp_aggregate",
    "DPAggregateState",
    "private_gradient",
]
