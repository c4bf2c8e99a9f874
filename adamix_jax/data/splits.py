"""Deterministic public few-shot / private splits of a training set."""

from __future__ import annotations

import dataclasses

import numpy as np

from adamix_jax.data import base


@dataclasses.dataclass(frozen=True)
class FewShotSplit:
  """Indices into the training split. Public and private are disjoint."""

  public: np.ndarray
  private: np.ndarray


def few_shot_split(labels: np.ndarray,
                   num_classes: int,
                   public_per_class: int,
                   private_per_class: int | None = None,
                   seed: int = 0,
                   allow_no_public: bool = False) -> FewShotSplit:
  """Picks ``public_per_class`` public examples per class; the rest are private.

  Args:
    labels: training labels, ints in [0, num_classes).
    num_classes: number of classes.
    public_per_class: k, the public examples per class (few-shot).
    private_per_class: if set, keep at most this many private examples per
      class (the paper's small private sets); None keeps all the rest.
    seed: the selection depends only on (labels, seed).
    allow_no_public: permit k = 0 (zero-shot: no public images at all).

  Returns:
    FewShotSplit with sorted index arrays.
  """
  labels = base.check_labels(labels, num_classes, "few_shot_split")
  if public_per_class < 0 or (public_per_class == 0 and not allow_no_public):
    raise ValueError(
        f"public_per_class must be a positive integer, got {public_per_class}. "
        "Use public_per_class=0 only for the zero-shot path (no public images).")
  if private_per_class is not None and private_per_class <= 0:
    raise ValueError(
        f"private_per_class must be positive or None, got {private_per_class}.")
  counts = np.bincount(labels, minlength=num_classes)
  absent = np.flatnonzero(counts == 0)
  if public_per_class > 0 and absent.size:
    raise ValueError(
        f"Class(es) {absent.tolist()} have no training examples, but "
        f"public_per_class={public_per_class} needs public examples of every "
        "class. Drop those classes from class_names (remapping the labels), "
        "or check the training split's labels.")
  short = np.flatnonzero(counts < public_per_class)
  if short.size:
    raise ValueError(
        f"public_per_class={public_per_class} but class(es) {short.tolist()} have "
        f"only {counts[short].tolist()} training example(s). Lower "
        f"public_per_class to at most {int(counts[short].min())} or drop those "
        "classes.")
  rng = np.random.default_rng(seed)
  public, private = [], []
  for c in range(num_classes):
    members = rng.permutation(np.flatnonzero(labels == c))
    public.append(members[:public_per_class])
    rest = members[public_per_class:]
    if private_per_class is not None:
      rest = rest[:private_per_class]
    private.append(rest)
  return FewShotSplit(public=np.sort(np.concatenate(public)).astype(np.int64),
                      private=np.sort(np.concatenate(private)).astype(np.int64))
