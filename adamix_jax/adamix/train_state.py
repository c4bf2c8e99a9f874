"""A Flax ``TrainState`` that takes private steps.

``PrivateTrainState`` extends ``flax.training.train_state.TrainState``
(``apply_fn``, ``params``, ``tx``, ``opt_state``, ``step``) with the tail
average of the iterates, and ``private_step`` runs one AdaMix / DP-SGD step:
per-example gradients of the private batch (vmap by default, or any backend
of ``privacy.mechanism`` via ``contributions``) and of the public examples go
to ``tx``, which must contain ``adamix.transform.adamix`` (chained with any
optimiser). Everything private passes through the one mechanism inside
``tx``.

Example::

  tx = optax.chain(adamix(config, key=coins.noise_key(), rank=16),
                   optax.sgd(0.5))
  state = PrivateTrainState.create(apply_fn=model.apply, params=params,
                                   tx=tx)
  state = jax.jit(state.private_step, static_argnums=...)(...)
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from adamix_jax.adamix import rules
from adamix_jax.adamix import transform as transform_lib
from adamix_jax.privacy import per_example

PyTree = Any


def classification_loss(apply_fn: Callable) -> per_example.ExampleLoss:
  """Softmax cross-entropy of ONE example (x, y) under ``apply_fn``."""

  def loss_fn(params, example):
    x, y = example
    logits = apply_fn({"params": params}, x[None])[0]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)

  return loss_fn


class PrivateTrainState(train_state.TrainState):
  """TrainState + the tail average; ``private_step`` is one private step."""

  average: PyTree = None
  averaged_steps: jax.Array = None
  loss_fn: Callable = flax.struct.field(pytree_node=False, default=None)

  @classmethod
  def create(cls, *, apply_fn, params, tx, loss_fn=None, **kwargs):
    """Like TrainState.create; ``loss_fn(params, (x, y))`` of ONE example
    defaults to softmax cross-entropy of ``apply_fn``'s logits."""
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    return super().create(
        apply_fn=apply_fn, params=params, tx=tx,
        loss_fn=loss_fn or classification_loss(apply_fn), average=zeros,
        averaged_steps=jnp.zeros((), jnp.int32), **kwargs)

  def private_step(self, private_batch: PyTree, mask: jax.Array,
                   public_batch: Optional[PyTree] = None,
                   average_from: jax.Array | int = 0,
                   contributions: Optional[
                       transform_lib.ContributionsFn] = None,
                   microbatch_size: Optional[int] = None
                   ) -> "PrivateTrainState":
    """One private step on a padded batch (``mask``: 1 real, 0 padding).

    Args:
      private_batch: (x, y) with a leading (padded) batch axis.
      mask: (B,) 1 for real examples, 0 for padding.
      public_batch: (x, y) of the public examples (AdaMix), or None.
      average_from: the step from which iterates enter the tail average.
      contributions: optional ``basis -> Contributions`` backend (ghost
        norms, JVP projection, shard-mapped); default: vmap per-example
        gradients (``microbatch_size`` at a time).
      microbatch_size: vmap slice size (must divide the padded batch).
    """
    public_grads = None
    if public_batch is not None and jax.tree_util.tree_leaves(
        public_batch)[0].shape[0]:
      public_grads = per_example.per_example_grads(self.loss_fn, self.params,
                                                   public_batch)
    if contributions is None:
      contributions = lambda basis: per_example.vmap_contributions(
          self.loss_fn, self.params, private_batch,
          transform_lib.projector(basis), microbatch_size=microbatch_size)
    updates, opt_state = self.tx.update(contributions, self.opt_state,
                                        self.params, mask=mask,
                                        public_grads=public_grads)
    params = optax.apply_updates(self.params, updates)
    in_tail = jnp.asarray(self.step >= average_from)
    averaged = self.averaged_steps + in_tail.astype(jnp.int32)
    return self.replace(
        step=self.step + 1, params=params, opt_state=opt_state,
        average=rules.running_mean(self.average, params, averaged, in_tail),
        averaged_steps=averaged)

  @property
  def threshold(self) -> jax.Array:
    return transform_lib.find_state(self.opt_state).threshold
