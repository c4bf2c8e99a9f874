"""On-disk cache of extracted features, verified before every use.

One entry is two files in the cache directory:

* ``<stem>.npy``: the float32 ``(N, D)`` feature array;
* ``<stem>.json``: the manifest: the key the entry was computed for, the
  array's shape and dtype, and the sha256 of its bytes.

``<stem>`` is readable (dataset, split, backbone, resolution, N) plus a digest
of the whole key, so two keys never share files. Both files are written to a
temporary name and moved into place with ``os.replace`` (atomic on POSIX), the
array first and the manifest last: the manifest is the commit record, so a
crash mid-write leaves at worst an entry that fails verification.

A load checks the manifest against the requested key and the array against the
manifest (shape, dtype, checksum). Anything wrong (missing half, truncated
file, flipped bytes, mismatched key) is logged as a warning and reported as a
miss, so the caller recomputes and overwrites it. A bad entry is never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# Bump when the meaning of cached features changes (preprocessing, layout), so
# old entries stop matching instead of being silently reused.
CACHE_FORMAT_VERSION = 1


def labels_fingerprint(labels: np.ndarray) -> str:
  """sha256 of the labels as little-endian int64: pins the examples' order."""
  labels = np.ascontiguousarray(np.asarray(labels).astype("<i8"))
  return hashlib.sha256(labels.tobytes()).hexdigest()


def cache_key(dataset: str, split: str, backbone: str,
              backbone_image_size: int | None, resolution: int | None,
              labels: np.ndarray,
              data_fingerprint: str | None = None) -> dict[str, Any]:
  """Everything that determines an entry's content, as a JSON-able dict.

  Args:
    dataset: The source's name.
    split: The split's name.
    backbone: The backbone's name (which identifies its weights).
    backbone_image_size: The size the backbone resizes its inputs to.
    resolution: The size images were resized to before the backbone, or None.
    labels: The split's labels; their count and fingerprint catch a dataset
      that changed under the same name.
    data_fingerprint: a digest of the source's content
      (``data.fingerprint.source_fingerprint``): two folders with the same
      name, size and label order never share an entry.

  Returns:
    The key.
  """
  return {
      "format": CACHE_FORMAT_VERSION,
      "dataset": str(dataset),
      "split": str(split),
      "backbone": str(backbone),
      "backbone_image_size": (None if backbone_image_size is None
                              else int(backbone_image_size)),
      "resolution": None if resolution is None else int(resolution),
      "num_examples": int(len(labels)),
      "labels_sha256": labels_fingerprint(labels),
      "data_fingerprint": data_fingerprint,
  }


def _slug(text: str, limit: int = 48) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_.")[:limit] or "x"


def entry_paths(cache_dir: str, key: dict[str, Any]) -> tuple[str, str]:
  """Returns the (array, manifest) paths of the entry for ``key``."""
  digest = hashlib.sha256(
      json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:16]
  resolution = "native" if key["resolution"] is None else f"r{key['resolution']}"
  stem = "__".join([_slug(key["dataset"]), _slug(key["split"]),
                    _slug(key["backbone"]), resolution,
                    f"n{key['num_examples']}", digest])
  return (os.path.join(cache_dir, stem + ".npy"),
          os.path.join(cache_dir, stem + ".json"))


def array_sha256(array: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()


def load(cache_dir: str, key: dict[str, Any]) -> np.ndarray | None:
  """Returns the verified cached array for ``key``, or None on any miss.

  A missing entry is a plain miss; a present but bad one also logs a warning
  saying what was wrong.
  """
  array_path, manifest_path = entry_paths(cache_dir, key)
  have_array = os.path.exists(array_path)
  have_manifest = os.path.exists(manifest_path)
  if not have_array and not have_manifest:
    return None

  def reject(reason: str) -> None:
    logger.warning("Feature cache entry %s is unusable (%s); recomputing it.",
                   array_path, reason)

  if not have_manifest:
    reject("manifest missing")
    return None
  if not have_array:
    reject("array file missing")
    return None
  try:
    with open(manifest_path, "r", encoding="utf-8") as f:
      manifest = json.load(f)
  except (OSError, ValueError) as error:
    reject(f"manifest unreadable: {error}")
    return None
  if not isinstance(manifest, dict) or manifest.get("key") != key:
    reject("manifest key does not match the requested key")
    return None
  try:
    array = np.load(array_path, allow_pickle=False)
  except (OSError, ValueError, EOFError) as error:
    reject(f"array unreadable, probably truncated: {error}")
    return None
  expected_shape = manifest.get("shape")
  if (list(array.shape) != expected_shape or str(array.dtype) !=
      manifest.get("dtype") or array.ndim != 2 or
      array.shape[0] != key["num_examples"]):
    reject(f"array has shape {array.shape} and dtype {array.dtype}, manifest "
           f"says {expected_shape} and {manifest.get('dtype')}")
    return None
  if array_sha256(array) != manifest.get("sha256"):
    reject("checksum mismatch")
    return None
  return array


def _atomic_write(path: str, write_fn) -> None:
  """Writes through ``write_fn(file)`` to a temp file, then renames onto path."""
  directory = os.path.dirname(path) or "."
  fd, tmp_path = tempfile.mkstemp(dir=directory,
                                  prefix="." + os.path.basename(path) + ".",
                                  suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      write_fn(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp_path, path)
  except BaseException:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
    raise


def save(cache_dir: str, key: dict[str, Any], array: np.ndarray) -> str:
  """Writes the entry for ``key`` atomically; returns the array's path."""
  array = np.ascontiguousarray(array)
  os.makedirs(cache_dir, exist_ok=True)
  array_path, manifest_path = entry_paths(cache_dir, key)
  manifest = {
      "key": key,
      "shape": list(array.shape),
      "dtype": str(array.dtype),
      "sha256": array_sha256(array),
      "array_file": os.path.basename(array_path),
  }
  _atomic_write(array_path, lambda f: np.save(f, array, allow_pickle=False))
  _atomic_write(manifest_path, lambda f: f.write(
      json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8")))
  return array_path
