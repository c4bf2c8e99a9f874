"""Gaussian noise for a clipped sum, drawn once per step from a carried key."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def gaussian_like(tree: PyTree, key: jax.Array, stddev: jax.Array | float) -> PyTree:
  """Independent N(0, stddev^2) for every coordinate of ``tree``."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(key, len(leaves))
  noise = [stddev * jax.random.normal(k, jnp.shape(x), jnp.result_type(x))
           for k, x in zip(keys, leaves)]
  return jax.tree_util.tree_unflatten(treedef, noise)


def add_gaussian_noise(tree: PyTree, key: jax.Array,
                       stddev: jax.Array | float) -> PyTree:
  """``tree + N(0, stddev^2 I)``: call it once on the *global* clipped sum."""
  return jax.tree_util.tree_map(jnp.add, tree, gaussian_like(tree, key, stddev))
