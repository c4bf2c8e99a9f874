"""Checkpoints of a private run: its state and its privacy ledger, together.

One checkpoint is one orbax step directory holding, in a single commit,

* every array of the training state (parameters, the tail average, the
  noise PRNG key, the step counter, the current public subspace),
* the run's secret coins (``privacy.randomness``: the sampler's seed and the
  noise key's source; the ONLY place they are ever written, so that a
  resume replays the same batches and noise),
* the privacy ledger as of that step, and
* a fingerprint of the run (digests of the data, the step config, seed, ...).

Orbax writes a step under a temporary name and renames it only once it is
complete, so a process killed mid-write leaves a directory that the manager
ignores: a checkpoint is complete or absent. The sampler needs no state: its
batch at step t is a function of (seed, t).

Why resuming does not count the replayed steps twice: steps taken after the
last checkpoint and lost with the process are replayed with the same batches
and the same noise (both are functions of the checkpointed coins and key and
the step). Their outputs were never released and the replay computes exactly
them again, so the ledger restored from the checkpoint is the ledger of what
the resumed run releases. That argument needs the replay to see the same
inputs: the same noise added to a *different* private set would hand out a
difference with the noise cancelled. So a checkpoint whose fingerprint does
not match the run refuses to load.

The checkpoint holds key material: the stage runner deletes it once the
run's outputs are written; a library user who keeps checkpoints must keep
them as private as the data.

Example::

  with RunCheckpointer(workdir + "/checkpoints", every_steps=100) as ckpt:
    params = private_linear.train_private_head(..., checkpointer=ckpt)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from adamix_jax.privacy import accounting
from adamix_jax.privacy import randomness

logger = logging.getLogger(__name__)


_COINS = "coins"


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used for this run (it is left in place)."""


def digest(*arrays: Any) -> str:
  """A short sha256 of arrays' dtypes, shapes and bytes (order matters)."""
  h = hashlib.sha256()
  for a in arrays:
    a = np.ascontiguousarray(np.asarray(a))
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Restored:
  """A loaded checkpoint: the state tree is placed, the ledger restored."""

  step: int
  tree: Any
  coins: Optional[randomness.MechanismCoins] = None


def _is_key(leaf) -> bool:
  return jax.dtypes.issubdtype(getattr(leaf, "dtype", None),
                               jax.dtypes.prng_key)


class RunCheckpointer:
  """Saves and restores one private run every ``every_steps`` steps.

  Args:
    directory: where the run's step directories go (created on first save).
    every_steps: checkpoint period in steps (the last step is always saved).
    max_to_keep: completed checkpoints kept (older ones are deleted by orbax
      only after a newer one is committed).
  """

  def __init__(self, directory: str, every_steps: int, max_to_keep: int = 2):
    if every_steps <= 0:
      raise ValueError(f"every_steps must be > 0, got {every_steps}.")
    self.directory = os.path.abspath(directory)
    self.every_steps = int(every_steps)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=False,
            # The state is copied to the host before saving; a synchronous
            # commit keeps "the ledger on disk covers the state on disk".
            enable_async_checkpointing=False))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step() if os.path.isdir(self.directory) else None

  def restore(self, template: Any, ledger: accounting.PrivacyLedger,
              fingerprint: dict[str, Any],
              put: Callable[[Any], Any] = lambda x: x) -> Optional[Restored]:
    """The latest checkpoint, or None when there is none.

    ``template``: a state tree of the right structure, shapes and dtypes.
    ``ledger``: the caller's ledger; its entries must be a prefix of the
    checkpoint's (the checkpoint extends it), and it is updated in place to
    the checkpoint's. ``put`` places each restored array (e.g. replicates it
    on a mesh). Raises CheckpointError (leaving the files in place) when the
    checkpoint is unreadable, from another run, or does not fit.
    """
    step = self.latest_step()
    if step is None:
      return None
    where = os.path.join(self.directory, str(step))
    try:
      saved = self._manager.restore(step, args=ocp.args.Composite(
          arrays=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
      meta, arrays = saved.meta, saved.arrays
      saved_ledger = accounting.PrivacyLedger.from_dict(meta["ledger"])
      saved_fingerprint = meta["fingerprint"]
    except Exception as e:  # orbax/tensorstore raise many types here
      raise CheckpointError(
          f"Checkpoint {where} cannot be read ({type(e).__name__}: {e}). It was "
          "left in place. Delete that step directory to resume from an earlier "
          f"checkpoint, or all of {self.directory} to start the run over.") from e
    changed = sorted(k for k in set(fingerprint) | set(saved_fingerprint)
                     if fingerprint.get(k) != saved_fingerprint.get(k))
    if changed:
      raise CheckpointError(
          f"Checkpoint {where} belongs to a different run (fields {changed} "
          "differ). Resuming would replay the same noise on different inputs, "
          "so it is refused and left in place. Restore the original inputs, "
          f"or delete {self.directory} to start this run over.")
    if (saved_ledger.delta != ledger.delta or
        saved_ledger.entries[:len(ledger.entries)] != ledger.entries):
      raise CheckpointError(
          f"Checkpoint {where} holds a ledger (delta={saved_ledger.delta}, "
          f"{saved_ledger.total_steps} steps) that does not extend the one "
          f"this run was given (delta={ledger.delta}, {ledger.total_steps} "
          "steps); it was left in place.")
    leaves, treedef = jax.tree_util.tree_flatten(template)
    restored = []
    for i, leaf in enumerate(leaves):
      value = arrays.get(f"{i:04d}")
      expected = jax.random.key_data(leaf) if _is_key(leaf) else leaf
      if value is None or (np.shape(value), np.asarray(value).dtype) != (
          np.shape(expected), np.dtype(expected.dtype)):
        raise CheckpointError(
            f"Checkpoint {where} does not fit this run's state (array {i}: "
            f"saved {None if value is None else np.shape(value)}, expected "
            f"{np.shape(expected)}); it was left in place. Delete "
            f"{self.directory} to start over.")
      value = put(np.asarray(value))
      if _is_key(leaf):
        value = jax.random.wrap_key_data(value, impl=jax.random.key_impl(leaf))
      restored.append(value)
    coins = arrays.get(_COINS)
    if coins is None:
      raise CheckpointError(
          f"Checkpoint {where} holds no mechanism coins (written by an older "
          "version): a resume could not replay its noise. It was left in "
          f"place; delete {self.directory} to start this run over.")
    if len(arrays) - 1 != len(leaves):
      raise CheckpointError(f"Checkpoint {where} holds {len(arrays)} arrays; "
                            f"this run's state has {len(leaves)}.")
    ledger.replace_entries(saved_ledger.entries)
    logger.info("resumed from %s (step %d, %d ledger steps)", where, step,
                ledger.total_steps)
    return Restored(
        step=int(meta["step"]),
        tree=jax.tree_util.tree_unflatten(treedef, restored),
        coins=randomness.MechanismCoins.from_array(np.asarray(coins)))

  def saved_coins(self) -> Optional[randomness.MechanismCoins]:
    """The coins of the latest checkpoint (None without one), for a caller
    that must fix the run's coins before ``fit`` resumes it (the private
    selection's split); they are as secret as the data."""
    step = self.latest_step()
    if step is None:
      return None
    saved = self._manager.restore(step, args=ocp.args.Composite(
        arrays=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    coins = saved.arrays.get(_COINS)
    return None if coins is None else randomness.MechanismCoins.from_array(
        np.asarray(coins))

  def maybe_save(self, step: int, tree: Any, ledger: accounting.PrivacyLedger,
                 fingerprint: dict[str, Any], *,
                 coins: randomness.MechanismCoins,
                 force: bool = False) -> bool:
    """Saves after ``step`` steps when due (or ``force``); True if saved.

    ``coins``: the run's secret randomness, saved with the state (and
    returned by ``restore`` as ``Restored.coins``).
    """
    if not force and step % self.every_steps:
      return False
    if self.latest_step() == step:
      return False
    leaves = jax.tree_util.tree_leaves(tree)
    arrays = {f"{i:04d}": np.asarray(jax.device_get(
        jax.random.key_data(leaf) if _is_key(leaf) else leaf))
              for i, leaf in enumerate(leaves)}
    arrays[_COINS] = coins.to_array()
    meta = {"step": int(step), "ledger": ledger.to_dict(),
            "fingerprint": json.loads(json.dumps(fingerprint))}
    os.makedirs(self.directory, exist_ok=True)
    self._manager.save(step, args=ocp.args.Composite(
        arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)),
                       force=True)
    self._manager.wait_until_finished()
    return True

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> "RunCheckpointer":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def checkpointer_or_none(directory: Optional[str], every_steps: int):
  """A context giving a RunCheckpointer on ``directory`` (None: no
  checkpointing, the context gives None); closed on exit."""
  if directory is None:
    return contextlib.nullcontext()
  return RunCheckpointer(directory, every_steps)
