"""Where a private run's arrays live: one device, or a data-parallel mesh.

Both trainers (``linear_head``, ``full_model``) run the same loop on either;
a placement says how arrays are put on devices and how a step is compiled.

On a mesh (``parallel.make_data_mesh``), the batch indices/rows and the mask
are sharded on the ``data`` axis and everything else is replicated; steps are
``jax.jit`` programs with replicated outputs. GSPMD partitions the global
step: the per-example work runs where its rows are, the clipped sum becomes
an all-reduce, and the noise, drawn from the replicated key, is added ONCE
to the global sum (invariant 2). Full models put their per-example section
in ``jax.shard_map`` instead (``privacy.mechanism.ShardMapped``; see
WORKSPACE.md "Scale out" for why).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from adamix_jax import parallel
from adamix_jax.privacy import randomness

PyTree = Any


class SingleDevice:
  """Arrays on the default device; steps jitted as they are."""

  mesh: Optional[Mesh] = None
  pad_multiple = 1

  def replicate(self, tree: PyTree) -> PyTree:
    return jax.tree_util.tree_map(jnp.asarray, tree)

  def shard_batch(self, tree: PyTree) -> PyTree:
    return jax.tree_util.tree_map(jnp.asarray, tree)

  def replicate_key(self, key: jax.Array) -> jax.Array:
    return key

  def share_coins(self, coins: randomness.MechanismCoins
                  ) -> randomness.MechanismCoins:
    return coins

  def jit(self, fn: Callable, **kwargs) -> Callable:
    return jax.jit(fn, **kwargs)


class MeshPlacement(SingleDevice):
  """Batches sharded on ``data``, everything else replicated on ``mesh``."""

  def __init__(self, mesh: Mesh):
    self.mesh = mesh
    self.pad_multiple = mesh.size

  def replicate(self, tree: PyTree) -> PyTree:
    return parallel.replicate(tree, self.mesh)

  def shard_batch(self, tree: PyTree) -> PyTree:
    return parallel.shard_batch(tree, self.mesh)

  def replicate_key(self, key: jax.Array) -> jax.Array:
    return parallel.replicated_key(key, self.mesh)

  def share_coins(self, coins: randomness.MechanismCoins
                  ) -> randomness.MechanismCoins:
    return parallel.share_coins(coins)

  def jit(self, fn: Callable, **kwargs) -> Callable:
    # Inputs keep the shardings they were placed with; outputs (states,
    # metrics, subspaces) are replicated.
    return jax.jit(fn, out_shardings=parallel.replicated_sharding(self.mesh),
                   **kwargs)


def placement_for(mesh: Optional[Mesh]) -> SingleDevice:
  return SingleDevice() if mesh is None else MeshPlacement(mesh)


@functools.lru_cache(maxsize=None)
def cached_jit(placement_key: Any, fn: Callable, **kwargs) -> Callable:
  """``placement.jit(fn, ...)`` cached per (mesh, fn, options), so that every
  run of a sweep reuses one compiled step per shape."""
  return placement_for(placement_key).jit(fn, **kwargs)
