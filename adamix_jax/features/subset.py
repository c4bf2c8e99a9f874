"""Views of a data source restricted to some indices.

The features stage embeds only the training examples some seed uses; these
views hand the extractor just those rows, named after the indices they keep
so that the feature cache never confuses two subsets.
"""

from __future__ import annotations

import hashlib

import numpy as np


class SubsetSplit:
  """A view of a split restricted to some indices (only those get embedded)."""

  def __init__(self, split, indices: np.ndarray):
    self._split, self._indices = split, indices
    self.labels = np.asarray(split.labels)[indices]

  def __len__(self):
    return len(self._indices)

  def __getitem__(self, i):
    return self._split[int(self._indices[i])]

  def as_array(self):
    full = self._split.as_array()
    return None if full is None else full[self._indices]


class SubsetSource:

  def __init__(self, source, subsets: dict[str, np.ndarray], suffix: str):
    self._source, self._subsets = source, subsets
    self.name = f"{source.name}{suffix}"
    self.class_names = source.class_names
    self.kind = source.kind

  def split(self, name):
    split = self._source.split(name)
    return SubsetSplit(split, self._subsets[name]) if name in self._subsets else split


def subset_suffix(indices: np.ndarray, total: int) -> str:
  """"" for a whole split, else "-subset<N>-<digest of the indices>"."""
  if len(indices) == total:
    return ""
  digest = hashlib.sha256(
      np.ascontiguousarray(np.asarray(indices).astype("<i8")).tobytes())
  return f"-subset{len(indices)}-{digest.hexdigest()[:12]}"
