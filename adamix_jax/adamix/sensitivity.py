"""Every private example's clipping ratio, recorded inside the private step.

Individual privacy accounting (``privacy.individual``) needs, at every step
t, the ratio

  r_{i,t} = min(1, ||c_i(W~_t)|| / C_t)

of ALL N private examples (sampled at step t or not: under Poisson sampling
the neighbouring dataset holds example i whether or not i was drawn), with
c_i the example's contribution exactly where the step clips it: the
gradient x~_i e_i^T itself, its projection V^T x~_i e_i^T on a "features"
subspace, or its coefficients in a "gradients" subspace, at the parameters
W~_t the step is evaluated at (BEFORE its update), in the subspace the step
used (after a refresh) and against the step's own threshold C_t.

Only the private run itself can record them: its sampler and noise come
from secret coins that exist only in its checkpoint, so a re-run is another
run. ``recorded_step`` is ``linear_step.private_step`` followed, in the same
jitted program, by ``record``: all N norms from the step's own closed forms
(``linear_step.matrix_contributions`` on every row, or
``linear_step.dual_contributions`` on every row from the dual form's cached
logits), the ratios, and one scatter-add into an (N, L + 1) int32 count
matrix (``privacy.individual.update_counts``: level ceil(r L) of each
example). The counts are part of the program's state, so they are
checkpointed with it and a resumed run continues them; the run's parameters
do not depend on them.

Cost: a forward pass over all N private examples per step (N (d+1) c
multiply-adds for the residuals, plus N n (c + k) with a "gradients"
subspace and its cached kernel), against the step's own pass over its batch
of about qN; measured on the default digits run in
experiments/results/individual_privacy/README.md.

Numerics: the norms are recomputed on all N rows rather than read from the
step (which sees only its batch), with the same functions on the same
inputs, so they agree with the step's up to float rounding (e.g. a
different fusion of the same sums). Each ratio is inflated by
``RATIO_SLACK`` (relative 1e-5, far above float32 rounding of these sums)
before it is rounded UP to the grid, so a recorded level is never below the
clipped norm's; a non-finite norm counts as r = 1 (the mechanism zeroes
such a row, so 0 would be true as well; 1 is safe whatever the cause). On
the "vmap" path the step clips vmap per-example gradients; the closed form
recorded here is the same quantity (tests/test_speed_paths.py holds the two
paths equal), again up to rounding.

NOT RELEASABLE. The counts are functions of the private data (every
example's gradient norms along the trajectory): the stage runner writes them
next to the ledger for the data owner's analysis, never into a release.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from adamix_jax.adamix import linear_step
from adamix_jax.adamix import settings as settings_lib
from adamix_jax.adamix import subspace as subspace_lib
from adamix_jax.privacy import individual

RATIO_SLACK = 1e-5

# The norms are always taken from the closed forms (the "vmap" path's
# per-example gradients have the same norms, at far higher cost).
_CLOSED_FORM = settings_lib.PerformanceFlags(path="closed_form")


def all_example_norms(state, cache: Optional[linear_step.DualCache],
                      subspace: subspace_lib.Subspace,
                      private: linear_step.PrivateData) -> jax.Array:
  """Norm of every private example's contribution at ``state``: (N,).

  Args:
    state: the step's input state (``MatrixState`` or ``DualState``): W~_t
      before the update.
    cache: the dual form's constants (None: the matrix form).
    subspace: the subspace the step used (after its refresh, if any).
    private: the private set on device (with its cached kernel, if any).

  Returns:
    ||c_i(W~_t)|| for i = 0..N-1, measured where the step clips (NaN/inf
    possible for a non-finite feature row).
  """
  num_examples = private.y.shape[0]
  if cache is not None:
    contributions = linear_step.dual_contributions(
        subspace, state, cache, private.y, jnp.arange(num_examples))
  else:
    contributions = linear_step.matrix_contributions(
        subspace, state.matrix, private.x_aug, private.y, _CLOSED_FORM,
        private.kernel, private.base_logits)
  return contributions.norms()


def clipping_ratios(norms: jax.Array, threshold: jax.Array | float,
                    slack: float = RATIO_SLACK) -> jax.Array:
  """r_i = min(1, norm_i (1 + slack) / C), non-finite -> 1: (N,)."""
  ratios = jnp.minimum(1.0, norms * (1.0 + slack) / threshold)
  return jnp.where(jnp.isfinite(ratios), ratios, 1.0)


def record(levels: int, counts: jax.Array, state,
           cache: Optional[linear_step.DualCache],
           subspace: subspace_lib.Subspace,
           private: linear_step.PrivateData,
           threshold: jax.Array) -> jax.Array:
  """counts[i, ceil(r_{i,t} L)] += 1 for every private example (jit-safe).

  Args:
    levels: L, the ratio grid (static).
    counts: (N, L + 1) int32 counts of the steps so far.
    state, cache, subspace, private: as in ``all_example_norms``.
    threshold: the step's C_t (``StepMetrics.threshold``).

  Returns:
    The updated counts.
  """
  ratios = clipping_ratios(all_example_norms(state, cache, subspace, private),
                           threshold)
  return individual.update_counts(counts, ratios, levels)


def recorded_step(structure: settings_lib.StepStructure,
                  flags: settings_lib.PerformanceFlags,
                  refresh: Optional[settings_lib.SubspaceSpec], levels: int,
                  numbers: settings_lib.StepNumbers, state, counts: jax.Array,
                  subspace: subspace_lib.Subspace,
                  public: linear_step.PublicData,
                  private: linear_step.PrivateData, indices: jax.Array,
                  mask: jax.Array, average_from: jax.Array,
                  lr_schedule: jax.Array,
                  cache: Optional[linear_step.DualCache] = None):
  """``linear_step.private_step``, then ``record`` of that very step.

  The arguments are ``private_step``'s, plus ``levels`` (static) and the
  ``counts`` so far. The ratios are taken at the step's INPUT state, in the
  subspace the step returns as used and against its threshold.

  Returns:
    (new state, new counts, metrics, the subspace used).
  """
  new_state, metrics, used = linear_step.private_step(
      structure, flags, refresh, numbers, state, subspace, public, private,
      indices, mask, average_from, lr_schedule, cache)
  counts = record(levels, counts, state, cache, used, private,
                  metrics.threshold)
  return new_state, counts, metrics, used


def zero_counts(num_examples: int, levels: int) -> np.ndarray:
  """The (N, L + 1) int32 counts of a run before its first step."""
  individual.level_ratios(levels)  # validates
  # int32: a run would need 2^31 steps to overflow a count.
  return np.zeros((int(num_examples), int(levels) + 1), np.int32)
