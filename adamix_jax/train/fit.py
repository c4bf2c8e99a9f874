"""The one private training loop: sampler -> budget guard -> jitted step ->
ledger -> checkpoint -> progress.

Every private run (a linear head, any Flax model, the launcher, the audit,
the experiments) goes through ``fit``. What differs between them is a
``Program``: how the state is built, placed and stepped, and what is
released at the end. The loop keeps the privacy bookkeeping in one place:

* the coins (noise key, sampler seed) come from OS entropy unless given, are
  agreed on by every process of a pod, and are written only into the run's
  checkpoint (invariant 6);
* the ledger approves the whole remaining run before the first step (epsilon
  is monotone in the number of steps, so every prefix then fits), checks
  each step before it is taken and records it after its noisy update is
  applied (invariant 5);
* the Poisson sampler's batch of step t is a function of (coins, t) only, so
  a resumed run replays exactly the batches it lost (invariant 4).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any, Callable, Optional, Protocol

import numpy as np

from adamix_jax.privacy import accounting
from adamix_jax.privacy import randomness
from adamix_jax.privacy import sampler as sampler_lib
from adamix_jax.train import checkpoint as checkpoint_lib

PyTree = Any


class Program(Protocol):
  """One private run's model, data and step, as ``fit`` drives it."""

  noise_multiplier: float  # sigma of every step (the ledger records it)
  sampling_rate: float  # q
  num_examples: int  # N, the private set size
  pad_multiple: int  # padded batch sizes are multiples of this
  fingerprint: dict  # what a checkpoint must match to be resumed

  def share_coins(self, coins: randomness.MechanismCoins
                  ) -> randomness.MechanismCoins:
    """The coins every process uses (process 0's on a pod)."""

  def init(self, coins: randomness.MechanismCoins) -> PyTree:
    """The state at step 0, its noise key derived from ``coins``."""

  def put(self, array: np.ndarray) -> Any:
    """Places a restored checkpoint array (e.g. replicates it on a mesh)."""

  def step(self, t: int, state: PyTree, batch: sampler_lib.PaddedBatch
           ) -> tuple[PyTree, Any]:
    """One private step; returns (state, metrics with ``.threshold``)."""

  def release(self, state: PyTree) -> PyTree:
    """The released parameters (numpy) of the final state."""


class Progress(Protocol):
  """What ``fit`` reports while it runs (a progress bar, a log, ...)."""

  def start(self, total: int, done: int) -> None:
    ...

  def update(self, step: int, metrics: Any,
             ledger: accounting.PrivacyLedger) -> None:
    ...

  def close(self) -> None:
    ...


@dataclasses.dataclass
class BarProgress:
  """A tqdm bar per run: steps, epsilon spent so far and the threshold.

  The epsilon on the bar is an upper bound of what the steps taken so far
  spent: the smaller of their RDP epsilon (cheap) and the PLD epsilon of
  the whole approved run, refreshed about 50 times a run (the exact PLD
  value of the run is in its outputs).
  """

  description: str = "private steps"
  leave: bool = False
  file: Any = sys.stdout
  _bar: Any = None
  _every: int = 1
  _epsilon: float = 0.0

  def start(self, total: int, done: int) -> None:
    import tqdm  # pylint: disable=g-import-not-at-top
    self._bar = tqdm.tqdm(total=total, initial=done, desc=self.description,
                          unit="step", leave=self.leave, file=self.file,
                          dynamic_ncols=True, mininterval=0.5)
    self._every = max(1, total // 50)

  def update(self, step: int, metrics: Any,
             ledger: accounting.PrivacyLedger) -> None:
    if (step + 1) % self._every == 0 or step + 1 == self._bar.total:
      self._epsilon = ledger.epsilon("rdp")
      if ledger.planned_epsilon is not None:
        self._epsilon = min(self._epsilon, ledger.planned_epsilon)
      self._bar.set_postfix_str(
          f"eps<={self._epsilon:.3f} C_t={float(metrics.threshold):.3g}",
          refresh=False)
    self._bar.update(1)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def fit(program: Program, *, steps: int,
        ledger: accounting.PrivacyLedger,
        coins: Optional[randomness.MechanismCoins] = None,
        checkpointer: Optional[checkpoint_lib.RunCheckpointer] = None,
        progress: Optional[Progress] = None,
        on_step: Optional[Callable[[int, Any], None]] = None) -> PyTree:
  """Runs ``steps`` private steps of ``program``; returns its release.

  Args:
    program: the run (see ``Program``; ``train.linear_head`` and
      ``train.full_model`` build them).
    steps: the number of private steps T.
    ledger: records every step taken; its target epsilon is enforced before
      the run and before each step. A resumed run continues the ledger of
      its checkpoint.
    coins: the run's secret randomness; None draws fresh OS entropy. A run
      resumed from a checkpoint uses the checkpoint's coins instead.
    checkpointer: saves the state, the coins and the ledger every few steps
      and at the end; the run first resumes from its latest checkpoint.
    progress: optional progress reporter (e.g. ``BarProgress()``).
    on_step: optional callback(step, metrics) after each recorded step.

  Returns:
    ``program.release(final state)``.
  """
  if isinstance(steps, bool) or int(steps) != steps or steps <= 0:
    raise ValueError(f"steps must be a positive integer, got {steps!r}.")
  steps = int(steps)
  coins = program.share_coins(
      randomness.MechanismCoins.fresh() if coins is None else coins)
  state = program.init(coins)
  start, earlier_steps = 0, ledger.total_steps
  if checkpointer is not None:
    restored = checkpointer.restore(state, ledger, program.fingerprint,
                                    put=program.put)
    if restored is not None:
      start, state, coins = restored.step, restored.tree, restored.coins
      coins = program.share_coins(coins)
      if ledger.total_steps != earlier_steps + start:
        raise checkpoint_lib.CheckpointError(
            f"Checkpoint at step {start} of {checkpointer.directory} holds a "
            f"ledger of {ledger.total_steps - earlier_steps} steps: the "
            "ledger must record exactly the steps the state took. It was left "
            "in place; delete it to start the run over.")
  sampler = sampler_lib.PoissonSampler(
      program.num_examples, program.sampling_rate, coins.sampler_seed,
      pad_multiple=program.pad_multiple)
  sigma, q = program.noise_multiplier, program.sampling_rate
  ledger.approve(sigma, q, steps - start)
  if progress is not None:
    progress.start(steps, start)
  try:
    for t in range(start, steps):
      ledger.check_step(sigma, q)
      state, metrics = program.step(t, state, sampler.batch(t))
      ledger.record(sigma, q)
      if checkpointer is not None:
        checkpointer.maybe_save(t + 1, state, ledger, program.fingerprint,
                                coins=coins, force=t + 1 == steps)
      if progress is not None:
        progress.update(t, metrics, ledger)
      if on_step is not None:
        on_step(t, metrics)
  finally:
    if progress is not None:
      progress.close()
  if ledger.total_steps != earlier_steps + steps:  # a bug, never a user error
    raise RuntimeError(f"the ledger recorded {ledger.total_steps - earlier_steps}"
                       f" steps for a run of {steps}.")
  return program.release(state)


def learning_rate_scales(schedule: str, steps: int) -> np.ndarray:
  """Multipliers of the base learning rate, read at step t as entry
  min(t, len - 1): "constant" is the (1,) array [1.] (so the array, and the
  step compiled around it, does not depend on T: a sweep's runs of
  different lengths share one compiled step), "cosine" the (T,) decay to 0
  over the run."""
  if schedule == "constant":
    return np.ones((1,), np.float32)
  if schedule == "cosine":
    return np.array([0.5 * (1.0 + math.cos(math.pi * t / steps))
                     for t in range(steps)], np.float32)
  raise ValueError(f"lr schedule must be one of {LR_SCHEDULES}, got "
                   f"{schedule!r}.")


LR_SCHEDULES = ("constant", "cosine")
