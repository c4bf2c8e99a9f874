"""Individual privacy accounting: each private example's own epsilon.

The run's epsilon (``accounting.PrivacyLedger``) is a worst case: it charges
every step as if every example's clipped gradient had norm C_t. An example
whose gradient is small pays less. Following Feldman and Zrnic (2021,
"Individual privacy accounting via a Renyi filter") and Yu et al. (2023,
"Individual privacy accounting for differentially private stochastic
gradient descent"), this module accounts each example's own loss.

The quantity. At step t the released output is

  Z_t = sum_{i in B_t} clip_{C_t}(g_i(W_t)) + N(0, sigma^2 C_t^2 I),

B_t Poisson-sampled at rate q. Adding or removing example i changes the sum,
when i is sampled, by its clipped contribution, of norm r_{i,t} C_t with

  r_{i,t} = min(1, ||g_i(W_t)|| / C_t)  in [0, 1]

(the norm measured where the step clips it: in the public subspace when
there is one). So, for example i, step t is the Poisson-subsampled Gaussian
mechanism with noise multiplier sigma / r_{i,t} (no loss at all when
r_{i,t} = 0). Under Poisson sampling the neighbouring dataset *includes* i
whether or not i was drawn at step t, so r_{i,t} is needed for every
private example at every step, sampled or not (``adamix.sensitivity``
computes all N at once). Example i's individual RDP at order alpha is

  rho_i(alpha) = sum_t rho(alpha; q, sigma / r_{i,t}),

rho being dp_accounting's RDP of the sampled Gaussian (the same function the
``rdp`` accountant of the ledger uses), and its individual epsilon is
rho_i converted at the run's delta by dp_accounting's RDP -> (eps, delta)
conversion, applied per example.

Why it is an upper bound for example i (soundness). r_{i,t} is a function of
example i, of public data (C_t, the subspace) and of W_t, which is itself a
function of the earlier outputs Z_1..Z_{t-1}: the per-step RDP of example i
is *predictable*. Feldman and Zrnic's individual Renyi filter then says:
for any budget B(alpha) fixed in advance, the run that stops using example i
once rho_i would exceed B is (alpha, B)-RDP for i (fully adaptive
composition). ``rho_i`` as reported is the smallest budget an individual
filter could have been given in advance and still have let this very run
through unchanged. It is an ex-post, trajectory-dependent statement about
this run (the order alpha of the conversion is also picked after the fact,
as in Yu et al.); the worst-case epsilon is the only guarantee fixed before
training.

Reported value: ``min(individual RDP epsilon, worst-case PLD epsilon)``.
Both bound example i's loss (the worst case bounds everyone's), so the min
does too. Hence, exactly: every individual epsilon <= the run's (ledger's,
PLD) epsilon; an example clipped at every step (r = 1 throughout) gets the
worst case exactly (its RDP epsilon is the run's RDP epsilon, which is never
below the PLD one in the settings tested; were it below, it would be the
tighter bound for everyone and the run could report it); an example with a
zero gradient throughout gets 0.

Made cheap by a grid. r is rounded UP to the grid {0, 1/L, ..., 1}
(``DEFAULT_LEVELS`` L = 100): level l = ceil(r L). An (N, L + 1) count
matrix says how many steps each example spent at each level, so recording a
step is one scatter-add of N ones (``update_counts`` runs on device inside a
jitted step; ``IndividualRecorder.record`` on host), and each example's RDP
is ``counts @ table`` with the (L + 1, orders) table of the L + 1 per-step
RDP curves computed once per (sigma, q). Bound: rounding up raises the noise
multiplier's divisor by less than 1/L, and rho is non-decreasing in r, so
the bucketed RDP is >= the exact one; it is exact when every r lies on the
grid (e.g. r = 1 or r = 0). The table is made non-decreasing along levels
(a running max; dp_accounting's fractional-order RDP has rounding noise of
~1e-4 at very large noise multipliers), which only raises entries.

Recording on a stride. ``IndividualRecorder.record_worst_case(k)`` charges k
unrecorded steps at r = 1 for every example; rho is largest at r = 1, so the
bound stays valid and overstates rho_i(alpha) by at most
k * rho(alpha; q, sigma) (what those k steps could have cost at worst).

NOT RELEASABLE. Individual epsilons are functions of the private data (each
example's gradients along a trajectory that all private examples shaped);
publishing them, or anything chosen by looking at them, leaks. They are an
analysis for the data owner (who pays?), not a number to publish; the
released guarantee stays the ledger's worst-case epsilon.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, NamedTuple, Optional, Sequence

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant

from adamix_jax.privacy import accounting

DEFAULT_LEVELS = 100
# dp_accounting's default RDP orders (the ledger's "rdp" accountant uses
# them too), so that the r = 1 row reproduces RdpAccountant exactly.
DEFAULT_ORDERS = tuple(float(a) for a in
                       rdp_privacy_accountant.DEFAULT_RDP_ORDERS)


def _check_levels(levels: int) -> None:
  if isinstance(levels, bool) or int(levels) != levels or levels < 1:
    raise ValueError(f"levels must be a positive integer, got {levels!r}.")


def level_ratios(levels: int = DEFAULT_LEVELS) -> np.ndarray:
  """The grid {0, 1/L, ..., 1}: level l stands for ratio l / L, (L + 1,)."""
  _check_levels(levels)
  return np.arange(levels + 1, dtype=np.float64) / levels


def quantize_ratios(ratios, levels: int = DEFAULT_LEVELS):
  """Level ceil(r L) of each ratio, clipped to [0, L]: rounds r UP.

  Works on numpy and jax arrays alike (jit-safe). A non-finite ratio (NaN)
  gets the top level L, the worst case, so a bad value can never lower an
  epsilon.
  """
  _check_levels(levels)
  xp = jnp if isinstance(ratios, jax.Array) else np
  ratios = xp.asarray(ratios)
  scaled = xp.ceil(xp.clip(ratios, 0.0, 1.0) * levels)
  scaled = xp.where(xp.isnan(ratios), levels, scaled)
  return scaled.astype(xp.int32)


def update_counts(counts: jax.Array, ratios: jax.Array,
                  levels: int = DEFAULT_LEVELS) -> jax.Array:
  """counts[i, level(r_i)] += 1 for every example i: one step, on device.

  Args:
    counts: (N, levels + 1) integer counts so far.
    ratios: (N,) the step's r_{i,t} for all N private examples.
    levels: L (static).

  Returns:
    The updated counts (a pure function: use it inside a jitted step, or
    donate ``counts``).
  """
  level = quantize_ratios(ratios, levels)
  rows = jnp.arange(counts.shape[0])
  return counts.at[rows, level].add(jnp.ones_like(level, counts.dtype))


@dataclasses.dataclass
class IndividualRecorder:
  """Per example, how many steps were spent at each ratio level.

  Example::

    recorder = IndividualRecorder(num_examples=N)
    for t in range(T):
      ...                                    # the private step t
      recorder.record(ratios_t)              # (N,) r_{i,t}, or:
      # recorder.record_worst_case()         # a step not measured: r = 1
    eps = individual_epsilons(recorder, ledger).epsilon

  Sharp edge: every step the ledger records must be recorded here too
  (measured or charged at the worst case): ``individual_epsilons`` refuses a
  recorder whose step count differs from the ledger's.

  Attributes:
    num_examples: N, the private set size.
    levels: L, the grid {0, 1/L, ..., 1}.
    counts: (N, L + 1) int64 step counts per level.
    measured_steps: steps recorded from measured ratios.
    worst_case_steps: steps charged at r = 1 without a measurement.
  """

  num_examples: int
  levels: int = DEFAULT_LEVELS
  counts: Optional[np.ndarray] = None
  measured_steps: int = 0
  worst_case_steps: int = 0

  def __post_init__(self):
    _check_levels(self.levels)
    shape = (int(self.num_examples), int(self.levels) + 1)
    if self.counts is None:
      self.counts = np.zeros(shape, np.int64)
    self.counts = np.asarray(self.counts, np.int64)
    if self.counts.shape != shape:
      raise ValueError(f"counts has shape {self.counts.shape}, expected "
                       f"{shape} (num_examples, levels + 1).")
    if np.any(self.counts < 0):
      raise ValueError("counts must be >= 0.")
    row_sums = self.counts.sum(axis=1)
    if self.num_examples and np.any(row_sums != row_sums[0]):
      raise ValueError("every example must have been recorded on the same "
                       "number of steps (the rows of counts sum differently).")
    if self.num_examples and row_sums[0] != self.steps:
      raise ValueError(f"counts record {row_sums[0]} steps but "
                       f"measured_steps + worst_case_steps = {self.steps}.")

  @property
  def steps(self) -> int:
    return int(self.measured_steps) + int(self.worst_case_steps)

  def record(self, ratios) -> None:
    """Adds one step with measured ratios r_{i,t} (N,), rounded up."""
    ratios = np.asarray(ratios)
    if ratios.shape != (self.num_examples,):
      raise ValueError(f"ratios must have shape ({self.num_examples},), got "
                       f"{ratios.shape}: one ratio per private example, "
                       "sampled or not.")
    level = quantize_ratios(ratios, self.levels)
    # Each row is indexed once, so fancy-index += is a scatter-add.
    self.counts[np.arange(self.num_examples), level] += 1
    self.measured_steps += 1

  def record_counts(self, counts, steps: int) -> None:
    """Adds counts accumulated elsewhere (e.g. on device by
    ``update_counts`` over ``steps`` measured steps)."""
    counts = np.asarray(counts, np.int64)
    if counts.shape != self.counts.shape:
      raise ValueError(f"counts has shape {counts.shape}, expected "
                       f"{self.counts.shape}.")
    if np.any(counts < 0) or np.any(counts.sum(axis=1) != steps):
      raise ValueError(f"every row of counts must sum to steps={steps}.")
    self.counts += counts
    self.measured_steps += int(steps)

  def record_worst_case(self, steps: int = 1) -> None:
    """Charges ``steps`` unmeasured steps at r = 1 for every example."""
    if isinstance(steps, bool) or int(steps) != steps or steps < 0:
      raise ValueError(f"steps must be a non-negative integer, got {steps!r}.")
    self.counts[:, self.levels] += int(steps)
    self.worst_case_steps += int(steps)

  def to_arrays(self) -> dict[str, np.ndarray]:
    return {"counts": self.counts, "levels": np.int64(self.levels),
            "measured_steps": np.int64(self.measured_steps),
            "worst_case_steps": np.int64(self.worst_case_steps)}

  @classmethod
  def from_arrays(cls, arrays: dict[str, Any]) -> "IndividualRecorder":
    counts = np.asarray(arrays["counts"], np.int64)
    return cls(num_examples=counts.shape[0], levels=int(arrays["levels"]),
               counts=counts, measured_steps=int(arrays["measured_steps"]),
               worst_case_steps=int(arrays["worst_case_steps"]))


def sampled_gaussian_rdp(noise_multiplier: float, sampling_rate: float,
                         orders: Sequence[float] = DEFAULT_ORDERS
                         ) -> np.ndarray:
  """RDP of ONE Poisson-sampled Gaussian step at each order (dp_accounting).

  The per-event function of ``dp_accounting``'s RdpAccountant for a
  ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))`` (q = 1: the plain
  Gaussian). A test holds it to RdpAccountant's result.
  """
  return np.asarray(
      rdp_privacy_accountant._compute_rdp_poisson_subsampled_gaussian(  # pylint: disable=protected-access
          q=float(sampling_rate), noise_multiplier=float(noise_multiplier),
          orders=list(orders)), np.float64)


@functools.lru_cache(maxsize=32)
def _rdp_table_cached(noise_multiplier: float, sampling_rate: float,
                      levels: int, orders: tuple[float, ...]) -> np.ndarray:
  table = np.zeros((levels + 1, len(orders)), np.float64)
  if noise_multiplier == 0:
    table[1:] = np.inf  # no noise: any non-zero contribution is exposed
  else:
    # dp_accounting warns about orders it cannot evaluate (they come back
    # inf and are simply not used by the conversion); keep the log quiet.
    absl_logger = logging.getLogger("absl")
    old_level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
      for level in range(1, levels + 1):
        table[level] = sampled_gaussian_rdp(
            noise_multiplier * levels / level, sampling_rate, orders)
    finally:
      absl_logger.setLevel(old_level)
  # Non-decreasing along levels (only raises entries: conservative).
  table = np.maximum.accumulate(table, axis=0)
  table.setflags(write=False)
  return table


def rdp_table(noise_multiplier: float, sampling_rate: float,
              levels: int = DEFAULT_LEVELS,
              orders: Sequence[float] = DEFAULT_ORDERS) -> np.ndarray:
  """Per-step RDP of each grid level: (L + 1, len(orders)), read-only.

  Row l is the sampled Gaussian with noise multiplier sigma / (l / L), row 0
  is zero (no contribution, no loss), row L is the worst case sigma. Rows
  are then made non-decreasing (running max over levels). Cached: about
  0.1 s per level, once per (sigma, q, L, orders).
  """
  _check_levels(levels)
  accounting.dp_sgd_event(noise_multiplier, sampling_rate, 1)  # validates
  return _rdp_table_cached(float(noise_multiplier), float(sampling_rate),
                           int(levels), tuple(float(a) for a in orders))


def individual_rdp(counts: np.ndarray, table: np.ndarray) -> np.ndarray:
  """Each example's composed RDP, counts @ table: (N, len(orders)).

  0 * inf is taken as 0 (a level never visited costs nothing), so a table
  with inf entries (sigma = 0, or an order dp_accounting cannot evaluate)
  only makes inf the examples that did visit those levels.
  """
  counts = np.asarray(counts, np.float64)
  table = np.asarray(table, np.float64)
  infinite = np.isinf(table)
  rdp = counts @ np.where(infinite, 0.0, table)
  reached = (counts > 0).astype(np.float64) @ infinite.astype(np.float64)
  return np.where(reached > 0, np.inf, rdp)


def rdp_to_epsilon(orders: Sequence[float], rdp: np.ndarray,
                   delta: float) -> np.ndarray:
  """dp_accounting's RDP -> (epsilon, delta) conversion, one row at a time.

  ``rdp``: (..., len(orders)). The same rule, order by order, as
  ``dp_accounting.rdp.rdp_privacy_accountant.compute_epsilon`` (Canonne,
  Kamath and Steinke 2020 / Asoodeh et al. 2020, with the KL shortcut),
  minimised over orders and floored at 0; a test holds them equal.
  """
  accounting._check_delta(delta)  # pylint: disable=protected-access
  orders = np.asarray(orders, np.float64)
  rdp = np.asarray(rdp, np.float64)
  if rdp.shape[-1] != orders.shape[0]:
    raise ValueError(f"rdp has {rdp.shape[-1]} orders, expected "
                     f"{orders.shape[0]}.")
  if np.any(orders < 1):
    raise ValueError("Renyi divergence orders must be >= 1.")
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    usable = orders > 1.01  # dp_accounting's numerical floor on alpha
    safe_orders = np.where(usable, orders, 2.0)
    bound = (rdp + np.log1p(-1.0 / safe_orders) -
             np.log(delta * safe_orders) / (safe_orders - 1.0))
    epsilon = np.where(usable, bound, np.inf)
    # Small divergence: delta <= sqrt(1 - exp(-KL)) already gives eps = 0.
    epsilon = np.where(delta**2 + np.expm1(-rdp) > 0, 0.0, epsilon)
    epsilon = np.where(rdp < 0, 0.0, epsilon)  # dp_accounting's convention
    epsilon = np.where(np.isnan(epsilon), np.inf, epsilon)
  return np.maximum(0.0, np.min(epsilon, axis=-1))


class IndividualEpsilons(NamedTuple):
  """The result of ``individual_epsilons``.

  epsilon: (N,) reported individual epsilons, min(epsilon_rdp, worst_case).
  epsilon_rdp: (N,) individual RDP epsilons (before the min).
  worst_case: the run's epsilon (the ledger's, PLD), everyone's bound.
  worst_case_rdp: the run's RDP epsilon (= epsilon_rdp of r = 1 always).
  """

  epsilon: np.ndarray
  epsilon_rdp: np.ndarray
  worst_case: float
  worst_case_rdp: float


def individual_epsilons_from_counts(
    counts: np.ndarray, noise_multiplier: float, sampling_rate: float,
    delta: float, worst_case_epsilon: float, levels: int = DEFAULT_LEVELS,
    orders: Sequence[float] = DEFAULT_ORDERS) -> IndividualEpsilons:
  """Individual epsilons of a run of fixed (sigma, q) from its level counts.

  Args:
    counts: (N, L + 1) steps per level (``IndividualRecorder.counts``).
    noise_multiplier, sampling_rate: the run's sigma and q.
    delta: the run's delta.
    worst_case_epsilon: the run's epsilon at ``delta`` for the same number
      of steps (``PrivacyLedger.epsilon()``); caps every individual value.
    levels, orders: the grid and the RDP orders.

  Returns:
    IndividualEpsilons.
  """
  counts = np.asarray(counts, np.int64)
  if counts.ndim != 2 or counts.shape[1] != levels + 1:
    raise ValueError(f"counts must have shape (N, {levels + 1}), got "
                     f"{counts.shape}.")
  table = rdp_table(noise_multiplier, sampling_rate, levels, orders)
  epsilon_rdp = rdp_to_epsilon(orders, individual_rdp(counts, table), delta)
  steps = int(counts[0].sum()) if counts.shape[0] else 0
  worst_case_rdp = float(rdp_to_epsilon(orders, steps * table[levels], delta)) \
      if steps else 0.0
  epsilon = np.minimum(epsilon_rdp, float(worst_case_epsilon))
  return IndividualEpsilons(epsilon=epsilon, epsilon_rdp=epsilon_rdp,
                            worst_case=float(worst_case_epsilon),
                            worst_case_rdp=worst_case_rdp)


def individual_epsilons(recorder: IndividualRecorder,
                        ledger: accounting.PrivacyLedger,
                        orders: Sequence[float] = DEFAULT_ORDERS,
                        worst_case_epsilon: Optional[float] = None
                        ) -> IndividualEpsilons:
  """Individual epsilons of the run that ``ledger`` recorded.

  Refuses a ledger with more than one (sigma, q) or whose step count is not
  the recorder's: a recorder that missed a step would understate everyone.
  ``worst_case_epsilon``: ``ledger.epsilon("pld")`` if already computed
  (None: computed here).
  """
  entries = [e for e in ledger.entries if e.steps > 0]
  if len(entries) != 1:
    raise ValueError(
        f"individual accounting needs a run of one (sigma, q); the ledger has "
        f"{len(entries)} entries with steps.")
  entry = entries[0]
  if entry.steps != recorder.steps:
    raise ValueError(
        f"the ledger records {entry.steps} steps but the recorder "
        f"{recorder.steps}: record every step (record_worst_case for the "
        "unmeasured ones).")
  if worst_case_epsilon is None:
    worst_case_epsilon = ledger.epsilon("pld")
  return individual_epsilons_from_counts(
      recorder.counts, entry.noise_multiplier, entry.sampling_rate,
      ledger.delta, worst_case_epsilon, recorder.levels, orders)


def exact_individual_rdp_epsilon(ratios: Sequence[float],
                                 noise_multiplier: float, sampling_rate: float,
                                 delta: float,
                                 orders: Sequence[float] = DEFAULT_ORDERS
                                 ) -> float:
  """One example's RDP epsilon from its exact ratio history, no grid.

  Composes one ``PoissonSampledDpEvent(q, Gaussian(sigma / r_t))`` per
  distinct r_t > 0 (self-composed by its multiplicity) in dp_accounting's
  RdpAccountant. For spot checks of the grid (slow for long histories).
  """
  ratios = np.asarray(ratios, np.float64)
  if np.any(~np.isfinite(ratios)) or np.any((ratios < 0) | (ratios > 1)):
    raise ValueError("ratios must be finite and in [0, 1].")
  values, multiplicity = np.unique(ratios[ratios > 0], return_counts=True)
  if values.size == 0:
    return 0.0
  if noise_multiplier == 0:
    return math.inf
  events = [accounting.dp_sgd_event(noise_multiplier / r, sampling_rate, int(m))
            for r, m in zip(values, multiplicity)]
  accountant = dp_accounting.rdp.RdpAccountant(orders=list(orders))
  accountant.compose(dp_accounting.ComposedDpEvent(events))
  return float(accountant.get_epsilon(delta))
