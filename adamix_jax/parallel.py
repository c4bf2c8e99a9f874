"""Mesh helpers for data parallelism: a ``jax.sharding.Mesh`` with a ``data``
axis, global arrays replicated or sharded on it, multi-host set-up.

The trainers use these through ``train.placement``; this module knows
nothing about training.

Why jit + NamedSharding (not pmap): GSPMD partitions the *global* program.
The per-example work (gradients, projections, clipping) runs on each
device's shard of the batch; the clipped sum over the batch axis becomes a
cross-device reduction (an all-reduce); and the Gaussian noise, drawn from
the replicated key, is part of the global program, so it is added ONCE to
the global sum (docs/design.md, invariant 2), whatever the device count. With
pmap each device would run its own copy of the step and a per-device noise
draw before a ``psum`` would be an easy, silent mistake.

Layout of the linear-head step (``train.linear_head`` on a mesh):

* replicated: the state (W~_t, anchor, average, key), the public set, the
  subspace, and the private set's features (a frozen-feature matrix; the
  step gathers its batch rows on device);
* sharded on ``data``: the padded batch indices and mask. The on-device
  gather ``x[indices]`` then yields a batch sharded on ``data``, and the
  per-example work runs where its rows are.

Every global array is built with ``jax.make_array_from_callback`` from a
host value that every process holds (the sampler is deterministic in
(secret coins, step), and the coins are broadcast from process 0 first:
``share_coins``), so the same code runs on one host or on a multi-host pod
after ``initialize_multihost()``.

Example::

  mesh = parallel.make_data_mesh()             # all devices on one axis
  params = linear_head.train_private_head(
      x_priv, y_priv, x_pub, y_pub, w0, step_config, steps=100,
      sampling_rate=0.1, ledger=ledger, mesh=mesh)   # fresh secret coins
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from adamix_jax.privacy import randomness
from adamix_jax.privacy import sampler as sampler_lib

DATA_AXIS = "data"
PyTree = Any

logger = logging.getLogger(__name__)


# --- multi-host --------------------------------------------------------------


def initialize_multihost(**kwargs: Any) -> None:
  """Calls ``jax.distributed.initialize(**kwargs)`` once per process.

  On a Cloud TPU pod every argument is auto-detected, so run the SAME
  command on every host (``gcloud compute tpus tpu-vm ssh NAME --worker=all
  --command="adamix-train --multihost ..."``). On other clusters
  pass ``coordinator_address``, ``num_processes`` and ``process_id``.
  Must run before any other JAX call touches the devices.
  """
  jax.distributed.initialize(**kwargs)
  logger.info("jax.distributed: process %d of %d, %d local / %d global devices",
              jax.process_index(), jax.process_count(),
              jax.local_device_count(), jax.device_count())


def launch_mesh(data_parallel: bool, multihost: bool) -> Optional[Mesh]:
  """What an entry point's ``--data_parallel`` / ``--multihost`` ask for.

  Multi-host initialises ``jax.distributed`` first and implies data
  parallelism; None means one device.
  """
  if multihost:
    initialize_multihost()
  return make_data_mesh() if data_parallel or multihost else None


# --- mesh and placement ------------------------------------------------------


def make_data_mesh(num_devices: Optional[int] = None,
                   devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh over ``num_devices`` devices (default: all) named ``data``.

  Args:
    num_devices: how many of ``jax.devices()`` to use (the first ones).
    devices: explicit devices instead (overrides ``num_devices``).
  """
  if devices is None:
    available = jax.devices()
    if num_devices is None:
      num_devices = len(available)
    if not 1 <= num_devices <= len(available):
      raise ValueError(f"num_devices={num_devices} but {len(available)} "
                       "device(s) are available.")
    devices = available[:num_devices]
  warn_if_collectives_may_abort(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


# XLA (jaxlib 0.10.2) aborts the process when the threads of one CPU
# collective arrive more than 20 + 40 s apart; simulated CPU devices on a
# loaded machine do. ``launch.cli.configure_xla`` sets these for the
# console scripts.
CPU_COLLECTIVE_TIMEOUT_FLAG = "xla_cpu_collective_call_terminate_timeout_seconds"


def warn_if_collectives_may_abort(devices: Sequence[jax.Device]) -> None:
  """Warns when a mesh of several CPU devices keeps XLA's 40 s abort."""
  if (len(devices) > 1 and all(d.platform == "cpu" for d in devices)
      and CPU_COLLECTIVE_TIMEOUT_FLAG not in os.environ.get("XLA_FLAGS", "")):
    warnings.warn(
        f"A mesh of {len(devices)} CPU devices: XLA aborts the process "
        "(SIGABRT) when their threads reach a collective more than 60 s "
        "apart, as on a loaded machine. Before jax starts, add "
        f"--{CPU_COLLECTIVE_TIMEOUT_FLAG}=1800 and "
        "--xla_cpu_collective_call_warn_stuck_timeout_seconds=300 to "
        "XLA_FLAGS (adamix-train and adamix-sweep do). An aborted run resumes "
        "from its checkpoint with the same command.", RuntimeWarning,
        stacklevel=3)


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ``data``; other axes replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def _to_global(value, sharding: NamedSharding) -> jax.Array:
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding,
                                      lambda index: value[index])


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Every array leaf as a global array replicated on every device of mesh.

  Leaves must be numeric host/device arrays that every process holds
  identically (PRNG keys: create them inside a jit with replicated
  out_shardings instead; see ``replicated_key``).
  """
  sharding = replicated_sharding(mesh)
  return jax.tree_util.tree_map(lambda x: _to_global(x, sharding), tree)


def pad_to_multiple(tree: PyTree, multiple: int,
                    mask: Optional[np.ndarray] = None
                    ) -> tuple[PyTree, np.ndarray]:
  """Pads every leaf's leading axis with zeros to a multiple of ``multiple``.

  Returns (padded tree, mask) with mask 1 for the original rows (or the
  given ``mask``, padded with zeros): padding rows must be masked so that
  they contribute exactly zero (docs/design.md, invariant 1).
  """
  leaves = jax.tree_util.tree_leaves(tree)
  sizes = {np.shape(x)[0] for x in leaves}
  if len(sizes) != 1:
    raise ValueError(f"All leaves need the same leading size, got {sizes}.")
  size = sizes.pop()
  padded = sampler_lib.round_up(max(size, 1), multiple)
  if mask is None:
    mask = np.ones(size, np.float32)
  mask = np.concatenate([np.asarray(mask, np.float32),
                         np.zeros(padded - size, np.float32)])

  def pad(x):
    x = np.asarray(x)
    return np.concatenate([x, np.zeros((padded - size,) + x.shape[1:],
                                       x.dtype)])

  return jax.tree_util.tree_map(pad, tree), mask


def shard_batch(tree: PyTree, mesh: Mesh) -> PyTree:
  """Global arrays split along the leading axis over ``data``.

  The leading size must be a multiple of ``mesh.size`` (use
  ``pad_to_multiple`` or a sampler with ``pad_multiple=mesh.size``).
  """
  sharding = data_sharding(mesh)

  def put(x):
    if np.shape(x)[0] % mesh.size:
      raise ValueError(
          f"Leading size {np.shape(x)[0]} is not a multiple of the "
          f"{mesh.size} devices of the mesh: pad it first (pad_to_multiple, "
          "or PoissonSampler(pad_multiple=mesh.size)); padding rows must be "
          "masked.")
    return _to_global(x, sharding)

  return jax.tree_util.tree_map(put, tree)


@functools.lru_cache(maxsize=None)
def _wrap_key_fn(mesh: Mesh, impl):
  return jax.jit(lambda data: jax.random.wrap_key_data(data, impl=impl),
                 out_shardings=replicated_sharding(mesh))


def share_coins(coins: randomness.MechanismCoins) -> randomness.MechanismCoins:
  """Process 0's coins on every process (a no-op on one process).

  Each host draws its own OS entropy; on a pod they must agree on ONE set of
  coins, or each host would sample other batches and add other noise.
  """
  if jax.process_count() == 1:
    return coins
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  words = multihost_utils.broadcast_one_to_all(coins.to_array())
  return randomness.MechanismCoins.from_array(np.asarray(words))


def replicated_key(key: jax.Array, mesh: Mesh) -> jax.Array:
  """A PRNG key replicated on the mesh (the same key on every device).

  Every process must pass the same key: on a pod, broadcast the coins from
  process 0 first (``privacy.randomness``); a key drawn independently on
  each host would give each host different noise.
  """
  data = replicate(np.asarray(jax.random.key_data(key)), mesh)
  return _wrap_key_fn(mesh, jax.random.key_impl(key))(data)
