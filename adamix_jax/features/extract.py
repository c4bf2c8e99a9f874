"""Feature extraction: items of a split -> (N, D) float32 embeddings, cached.

Host preprocessing of the next batch overlaps the device's embedding of the
current one, and every batch is padded to one shape so the backbone's jitted
function compiles once.
"""

from __future__ import annotations

import concurrent.futures
import logging
from typing import Sequence

import numpy as np
import tqdm

from adamix_jax.data import base as data_base
from adamix_jax.features import cache
from adamix_jax.models import base as models_base

logger = logging.getLogger(__name__)


def _is_identity(backbone: models_base.Backbone) -> bool:
  return backbone.name == "identity"


def _load_batch(split: data_base.LabeledSplit, indices: Sequence[int],
                backbone: models_base.Backbone, resolution: int | None,
                description: str) -> np.ndarray:
  items = [split[i][0] for i in indices]
  # Checked on the raw items: a NaN pixel would otherwise surface later as
  # NaN features blamed on the backbone, or be hidden by its preprocessing.
  bad = [i for i, item in zip(indices, items)
         if np.issubdtype(np.asarray(item).dtype, np.floating)
         and not np.all(np.isfinite(item))]
  if bad:
    raise ValueError(
        f"{description}: item(s) {bad[:5]} hold NaN or inf values. Clean or "
        "drop them in the data source before extracting features.")
  if resolution is not None:
    items = [models_base.resize_image(item, resolution) for item in items]
  return backbone.preprocess(items)


def compute_features(split: data_base.LabeledSplit,
                     backbone: models_base.Backbone, batch_size: int = 64,
                     resolution: int | None = None, progress: bool = True,
                     description: str = "features") -> np.ndarray:
  """Embeds every item of ``split`` with ``backbone``; no caching.

  Args:
    split: The split to embed.
    backbone: The backbone.
    batch_size: Items per device call; the last batch is padded up to it.
    resolution: When set, each image is first resized to
      ``resolution x resolution``, then the backbone resizes it to its own
      input size: this emulates low-resolution data on a fixed-size backbone,
      and sets the pixel grid of the identity backbone.
    progress: Whether to show a tqdm progress bar.
    description: The progress bar's label.

  Returns:
    float32 ``(N, D)`` features.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  num_items = len(split)
  if num_items == 0:
    return np.zeros((0, backbone.embed_dim or 0), np.float32)
  rows = min(batch_size, num_items)
  starts = range(0, num_items, rows)
  outputs = []
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool, \
      tqdm.tqdm(total=num_items, desc=description, unit="item",
                disable=not progress) as bar:

    def submit(start: int) -> concurrent.futures.Future:
      indices = range(start, min(start + rows, num_items))
      return pool.submit(_load_batch, split, indices, backbone, resolution,
                         description)

    pending = submit(0)
    for start in starts:
      batch = pending.result()
      if start + rows < num_items:
        pending = submit(start + rows)
      count = len(batch)
      if count < rows:
        # Repeat the first item: padded rows are computed and dropped, and the
        # batch keeps the shape the backbone was compiled for.
        padding = np.repeat(batch[:1], rows - count, axis=0)
        batch = np.concatenate([batch, padding])
      embedded = np.asarray(backbone.embed(batch), np.float32)[:count]
      outputs.append(embedded.reshape(count, -1))
      bar.update(count)
  features = np.concatenate(outputs)
  if not np.all(np.isfinite(features)):
    bad = int((~np.all(np.isfinite(features), axis=1)).sum())
    raise ValueError(f"Backbone {backbone.name!r} produced NaN/inf features for "
                     f"{bad} of {num_items} items; check the inputs and weights.")
  return features


def extract_features(source: data_base.Source, split_name: str,
                     backbone: models_base.Backbone, cache_dir: str | None,
                     batch_size: int = 64, resolution: int | None = None,
                     progress: bool = True,
                     data_fingerprint: str | None = None) -> np.ndarray:
  """Returns the float32 ``(N, D)`` features of one split, computed once.

  Features are cached under ``cache_dir`` keyed by (dataset, split, backbone,
  its input size, resolution, N, labels fingerprint), so every run of a sweep
  that shares the directory computes them once. A cached entry is verified
  before use and rebuilt when it is corrupt (see ``cache``).

  The identity backbone is never cached: feature sources are returned as they
  are (``as_array``, no image path), and flattening pixels is cheaper than
  reading them back.

  Args:
    source: The data source.
    split_name: Which split of it.
    backbone: The backbone.
    cache_dir: The cache directory, or None for no caching.
    batch_size: Items per device call.
    resolution: Optional pre-backbone image size (see ``compute_features``).
    progress: Whether to show a progress bar.
    data_fingerprint: the source's content digest, part of the cache key.

  Returns:
    The features, row i for item i of the split.
  """
  split = source.split(split_name)
  labels = np.asarray(split.labels)
  where = f"{source.name}/{split_name}"
  if source.kind == "feature":
    if not _is_identity(backbone):
      raise ValueError(
          f"{where} holds feature vectors, not images, so the image backbone "
          f"{backbone.name!r} cannot embed it; use the 'identity' backbone.")
    if resolution is not None:
      raise ValueError(f"{where} holds feature vectors; resolution "
                       f"{resolution} only applies to images.")
    dense = split.as_array()
    if dense is None:
      dense = np.stack([split[i][0] for i in range(len(split))])
    features = np.asarray(dense, np.float32).reshape(len(split), -1)
    data_base.check_finite(features, where)
    return features

  if _is_identity(backbone) or cache_dir is None:
    return compute_features(split, backbone, batch_size, resolution, progress,
                            description=where)

  key = cache.cache_key(source.name, split_name, backbone.name,
                        backbone.image_size, resolution, labels,
                        data_fingerprint)
  cached = cache.load(cache_dir, key)
  if cached is not None:
    logger.info("Feature cache hit for %s with %s.", where, backbone.name)
    return cached
  features = compute_features(split, backbone, batch_size, resolution, progress,
                              description=f"{where} [{backbone.name}]")
  path = cache.save(cache_dir, key, features)
  logger.info("Cached %s features of %s at %s.", features.shape, where, path)
  return features


def features_for_source(
    source: data_base.Source, backbone: models_base.Backbone,
    cache_dir: str | None, train_split: str = "train",
    test_split: str = "test", batch_size: int = 64,
    resolution: int | None = None, progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Features and int64 labels of a source's train and test splits.

  Returns:
    ``(x_train, y_train, x_test, y_test)``.
  """
  arrays = []
  for split_name in (train_split, test_split):
    features = extract_features(source, split_name, backbone, cache_dir,
                                batch_size=batch_size, resolution=resolution,
                                progress=progress)
    labels = np.asarray(source.split(split_name).labels).astype(np.int64)
    arrays += [features, labels]
  return tuple(arrays)
