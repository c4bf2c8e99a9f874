"""The one interface every data source implements.

A *source* is a named dataset with class names and labelled splits. A split
gives random access to ``(item, label)`` pairs, where an item is either an
image (``HxWxC`` uint8) or a feature vector (``(D,)`` float32), and exposes
all labels at once so that splitting never touches the items themselves.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

ITEM_KINDS = ("image", "feature")


@runtime_checkable
class LabeledSplit(Protocol):
  """Random access to the examples of one split."""

  labels: np.ndarray  # int64, shape (N,)

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    ...

  def as_array(self) -> np.ndarray | None:
    """All items as one dense array, or None when their shapes differ."""
    ...


@runtime_checkable
class Source(Protocol):
  """A named dataset: class names, item kind, and its splits."""

  name: str
  class_names: tuple[str, ...]
  kind: str  # one of ITEM_KINDS

  def split(self, name: str) -> LabeledSplit:
    ...


@dataclasses.dataclass(frozen=True)
class ArraySplit:
  """A split held in memory as one dense array of items."""

  items: np.ndarray
  labels: np.ndarray

  def __post_init__(self):
    if len(self.items) != len(self.labels):
      raise ValueError(
          f"Label count mismatch: {len(self.items)} items but "
          f"{len(self.labels)} labels. Pass exactly one label per item.")

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    return self.items[index], int(self.labels[index])

  def as_array(self) -> np.ndarray:
    return self.items


@dataclasses.dataclass(frozen=True)
class ArraySource:
  """A source whose splits all live in memory (digits, npz, IDX)."""

  name: str
  class_names: tuple[str, ...]
  kind: str
  splits: dict[str, ArraySplit]

  def __post_init__(self):
    if self.kind not in ITEM_KINDS:
      raise ValueError(f"kind must be one of {ITEM_KINDS}, got {self.kind!r}.")

  def split(self, name: str) -> ArraySplit:
    if name not in self.splits:
      raise KeyError(f"Source {self.name!r} has no split {name!r}; it has "
                     f"{sorted(self.splits)}.")
    return self.splits[name]


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> np.ndarray:
  """Returns labels as int64, raising a clear error when any is out of range."""
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"{where}: labels must be 1-D, got shape {labels.shape}.")
  if not np.issubdtype(labels.dtype, np.integer):
    if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
      raise ValueError(f"{where}: labels must be integers, got dtype "
                       f"{labels.dtype} with non-integer values.")
  labels = labels.astype(np.int64)
  negative = labels < 0
  if np.any(negative):
    raise ValueError(
        f"{where}: {int(negative.sum())} negative label(s), e.g. "
        f"{labels[negative][:5].tolist()}. Labels are class indices "
        "0, 1, 2, ...: remap them (e.g. with np.unique(labels, "
        "return_inverse=True)).")
  bad = labels >= num_classes
  if np.any(bad):
    raise ValueError(
        f"{where}: {int(bad.sum())} label(s) outside [0, {num_classes}), e.g. "
        f"{labels[bad][:5].tolist()}. Check num_classes / class_names, or remap "
        f"the labels to 0..{num_classes - 1}.")
  return labels


def check_finite(items: np.ndarray, where: str) -> None:
  """Raises when a float array holds NaN or inf (never train on those)."""
  items = np.asarray(items)
  if np.issubdtype(items.dtype, np.floating) and not np.all(np.isfinite(items)):
    bad_rows = np.flatnonzero(~np.all(np.isfinite(items.reshape(len(items), -1)), axis=1))
    raise ValueError(
        f"{where}: {len(bad_rows)} example(s) contain NaN or inf (first rows: "
        f"{bad_rows[:5].tolist()}). Clean or drop them before training.")


def class_names_or_default(class_names: Sequence[str] | None,
                           num_classes: int) -> tuple[str, ...]:
  if class_names is None:
    return tuple(str(i) for i in range(num_classes))
  if len(class_names) != num_classes:
    raise ValueError(f"{len(class_names)} class names for {num_classes} classes.")
  return tuple(str(c) for c in class_names)
