"""The clipping threshold C_t: public data only (invariant 3).

One rule for every step form (linear head closed forms, any Flax model):
C_t is a quantile of the PUBLIC per-example gradient norms at the current
parameters, measured in the projection subspace when there is one (so that
the threshold matches what is clipped); or the fixed clip norm (DP-SGD, or
no public examples). Sigma is calibrated once and does not depend on C_t:
the noise std sigma * C_t always matches the bound each example was clipped
to.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

# A floor: when the public examples are fitted exactly their norms are ~0,
# and a zero threshold would divide the lr / C_t step by zero.
MIN_THRESHOLD = 1e-6


def public_threshold(public_norms: Optional[jax.Array], *, adaptive: bool,
                     quantile: jax.Array | float,
                     clip_norm: jax.Array | float) -> jax.Array:
  """C_t from the public per-example norms (in the subspace), or clip_norm.

  Args:
    public_norms: (n,) norms of the public per-example gradients at the
      current parameters, or None when there is no public set.
    adaptive: use the public norms (else the fixed ``clip_norm``).
    quantile: which quantile of the norms (1.0 = max); may be traced.
    clip_norm: the fixed threshold; may be traced.
  """
  if not adaptive or public_norms is None or public_norms.shape[0] == 0:
    return jnp.asarray(clip_norm, jnp.float32)
  return jnp.maximum(jnp.quantile(public_norms, quantile), MIN_THRESHOLD)
