"""A digest of what a data source holds, so that a changed input is noticed.

A workdir records the fingerprint of the source its features were computed
from (``features/source.json``), and the feature cache keys on it: the same
config pointed at other data (an npz replaced, two image folders with the
same name, size and label order) is refused or re-embedded instead of
silently reusing outputs of the old data.

* In-memory sources (digits, IDX, npz): every split's items and labels.
* Image folders: every file's path (relative to the root) and bytes.
* TFDS: the builder's name, version and config, the prepared files' names
  and sizes, and every split's labels (the images themselves are not read:
  prepared TFDS files are immutable per version).
A source may also define ``fingerprint() -> str`` itself.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

SPLITS = ("train", "test")


def hash_array(digest, array: Any) -> None:
  """Feeds an array's dtype, shape and bytes to a hashlib digest."""
  array = np.ascontiguousarray(np.asarray(array))
  digest.update(f"{array.dtype.str}{array.shape}".encode())
  digest.update(array.tobytes())


def _file_digest(digest, root: str, path: str) -> None:
  digest.update(os.path.relpath(path, root).encode())
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)


def source_fingerprint(source) -> str:
  """A short sha256 of the source's content (see the module doc)."""
  own = getattr(source, "fingerprint", None)
  if callable(own):
    return own()
  digest = hashlib.sha256()
  digest.update(f"{source.kind}|{'|'.join(source.class_names)}".encode())
  for name in SPLITS:
    try:
      split = source.split(name)
    except KeyError:
      continue
    digest.update(name.encode())
    hash_array(digest, split.labels)
    items = split.as_array()
    if items is None:
      raise ValueError(
          f"cannot fingerprint the {name!r} split of {source.name!r}: its "
          "items are not one array and the source has no fingerprint().")
    hash_array(digest, items)
  return digest.hexdigest()[:16]


def files_fingerprint(root: str, paths, extra: str = "") -> str:
  """sha256 of the files' relative paths and bytes (sorted by path)."""
  digest = hashlib.sha256(extra.encode())
  for path in sorted(os.fspath(p) for p in paths):
    _file_digest(digest, os.fspath(root), path)
  return digest.hexdigest()[:16]
