"""The paper's TFDS image datasets, read through ``tfds.data_source``.

``tfds.data_source`` gives random access without TensorFlow, but only to a
dataset already prepared in ``data_dir`` in a random-access file format
(ArrayRecord). Nothing here downloads: prepare each dataset once, on a
machine with network, e.g.::

  tfds build oxford_flowers102 --file_format=array_record --data_dir=DIR

and pass the same ``data_dir``. TensorFlow Datasets is an optional
dependency (``pip install -e '.[tfds]'``); it is imported on first use.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from adamix_jax.data import base
from adamix_jax.data import image_folder

@dataclasses.dataclass(frozen=True)
class TfdsSpec:
  """How one of our dataset names maps onto a TFDS builder.

  Attributes:
    builder: the TFDS builder name (optionally ``name/config:version``).
    splits: our split name -> TFDS split expression (``"train+validation"``
      and slices such as ``"train[:90%]"`` are allowed).
    image_key: the feature holding the image.
    label_key: the ``ClassLabel`` feature holding the label.
    label_name_key: a text feature naming each example's class, for builders
      whose ``ClassLabel`` has only the placeholder names "0", "1", ... (CUB):
      the class names are then read from the "train" split.
  """

  builder: str
  splits: Mapping[str, str]
  image_key: str = "image"
  label_key: str = "label"
  label_name_key: str | None = None


# Flowers-102's official train and validation sets have 10 images per class
# each; the usual fine-grained protocol (and ours) trains on both.
TFDS_DATASETS: Mapping[str, TfdsSpec] = {
    "oxford_pets": TfdsSpec("oxford_iiit_pet",
                            {"train": "train", "test": "test"}),
    "cub200": TfdsSpec("caltech_birds2011", {"train": "train", "test": "test"},
                       label_name_key="label_name"),
    "flowers102": TfdsSpec("oxford_flowers102",
                           {"train": "train+validation", "test": "test",
                            "validation": "validation"}),
    "stanford_dogs": TfdsSpec("stanford_dogs",
                              {"train": "train", "test": "test"}),
    "caltech101": TfdsSpec("caltech101", {"train": "train", "test": "test"}),
}


def import_tfds():
  """Returns the ``tensorflow_datasets`` module, or says how to install it."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ImportError(
        "TFDS sources need tensorflow-datasets (TensorFlow itself is not "
        "needed): pip install -e '.[tfds]'") from error
  return tfds


def _prepare_hint(builder_name: str, data_dir: str | None) -> str:
  dir_flag = f" --data_dir={data_dir}" if data_dir else ""
  dir_arg = f", data_dir={data_dir!r}" if data_dir else ""
  return (
      "Prepare it once on a machine with network, then copy the folder here:\n"
      f"  tfds build {builder_name} --file_format=array_record{dir_flag}\n"
      "or, in Python:\n"
      f"  tfds.builder({builder_name!r}, file_format='array_record'{dir_arg})"
      ".download_and_prepare()")


class TfdsSplit:
  """One split of a TFDS dataset, decoded one example at a time.

  The underlying data source is opened with image decoding skipped: the
  image arrives as encoded bytes and is decoded here with PIL (grayscale,
  CMYK and RGBA files all become ``HxWx3`` uint8), so other image features,
  e.g. segmentation masks, are never decoded.
  """

  def __init__(self,
               data_source: Sequence[Mapping[str, Any]],
               image_key: str,
               label_key: str,
               num_classes: int,
               where: str,
               label_name_key: str | None = None):
    self._data_source = data_source
    self._image_key = image_key
    self._label_key = label_key
    self._label_name_key = label_name_key
    self._num_classes = num_classes
    self._where = where

  def __len__(self) -> int:
    return len(self._data_source)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    size = len(self)
    if not -size <= index < size:
      raise IndexError(f"{self._where}: index {index} out of range for "
                       f"{size} examples.")
    example = self._data_source[index % size]
    image = image_folder.to_rgb_uint8(example[self._image_key],
                                      where=f"{self._where}[{index}]")
    return image, int(example[self._label_key])

  @property
  def labels(self) -> np.ndarray:
    """All labels (int64), read once on first access, then cached.

    Cost: one pass over the split's records, one record at a time. Every
    record is read from disk and its ``tf.train.Example`` parsed, images
    included as bytes, but no image is decoded; so the pass costs about the
    split's size on disk in I/O (e.g. ~0.8 GB for Stanford Dogs' train
    split), not its decoding. (Batched ``__getitems__`` reads would be
    faster but ``tfds.testing.mock_data`` breaks them: its mock is unbound.)
    """
    return self._labels_and_names[0]

  def label_names(self) -> dict[int, str]:
    """Class index -> name, from each example's ``label_name_key`` feature.

    Read in the same pass as ``labels``; empty when the spec has no
    ``label_name_key``.
    """
    return dict(self._labels_and_names[1])

  @functools.cached_property
  def _labels_and_names(self) -> tuple[np.ndarray, dict[int, str]]:
    labels = np.empty(len(self), dtype=np.int64)
    names: dict[int, str] = {}
    for index in range(len(self)):
      example = self._data_source[index]
      labels[index] = int(example[self._label_key])
      if self._label_name_key is not None:
        name = example[self._label_name_key]
        name = name.decode("utf-8") if isinstance(name, bytes) else str(name)
        names.setdefault(int(labels[index]), name)
    return base.check_labels(labels, self._num_classes, self._where), names

  def as_array(self) -> None:
    """Always None: image sizes differ from example to example."""
    return None


class TfdsSource:
  """A ``Source`` over a prepared TFDS image classification dataset."""

  kind = "image"

  def __init__(self,
               name: str,
               data_dir: str | os.PathLike[str] | None = None,
               spec: TfdsSpec | None = None):
    """Reads the dataset's metadata (no examples yet).

    Args:
      name: one of ``TFDS_DATASETS`` (e.g. "flowers102"), or any name when
        ``spec`` is given.
      data_dir: where the dataset is prepared; None means TFDS's default
        (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
      spec: overrides the ``TFDS_DATASETS`` entry (another TFDS builder).

    Raises:
      ImportError: tensorflow-datasets is not installed.
      ValueError: ``name`` is unknown and no ``spec`` is given, or the label
        feature is not a ``ClassLabel``.
    """
    if spec is None:
      if name not in TFDS_DATASETS:
        raise ValueError(f"Unknown TFDS dataset {name!r}; known: "
                         f"{sorted(TFDS_DATASETS)}.")
      spec = TFDS_DATASETS[name]
    self.name = name
    self.spec = spec
    self.data_dir = os.fspath(data_dir) if data_dir is not None else None
    self._tfds = import_tfds()
    self._builder = self._tfds.builder(spec.builder, data_dir=self.data_dir)
    features = self._builder.info.features
    label_feature = features[spec.label_key]
    if not isinstance(label_feature, self._tfds.features.ClassLabel):
      raise ValueError(
          f"{spec.builder}: feature {spec.label_key!r} is a "
          f"{type(label_feature).__name__}, not a ClassLabel.")
    self._label_feature = label_feature
    # Top-level image features are handed over undecoded (see TfdsSplit).
    self._skip_image_decoding = {
        key: self._tfds.decode.SkipDecoding()
        for key, feature in features.items()
        if isinstance(feature, self._tfds.features.Image)} or None
    self._splits: dict[str, TfdsSplit] = {}

  @functools.cached_property
  def class_names(self) -> tuple[str, ...]:
    """The ``ClassLabel`` names; for CUB, read from the train split.

    When the spec has a ``label_name_key`` and the ``ClassLabel`` names are
    only "0", "1", ..., the first access costs the train split's label pass
    (see ``TfdsSplit.labels``; it is cached and needed anyway). A class
    absent from train keeps its placeholder name.
    """
    names = tuple(str(n) for n in self._label_feature.names)
    placeholders = tuple(str(i) for i in range(len(names)))
    if self.spec.label_name_key is None or names != placeholders:
      return names
    found = self.split("train").label_names()
    return tuple(found.get(i, name) for i, name in enumerate(names))

  def fingerprint(self) -> str:
    """The builder's identity, its prepared files (names and sizes) and
    every split's labels (prepared TFDS files are immutable per version)."""
    from adamix_jax.data import fingerprint  # pylint: disable=g-import-not-at-top
    info = self._builder.info
    parts = [self.spec.builder, str(info.version),
             str(getattr(self._builder, "builder_config", None))]
    data_dir = os.fspath(self._builder.data_dir)
    if os.path.isdir(data_dir):
      for entry in sorted(os.listdir(data_dir)):
        parts.append(f"{entry}:{os.path.getsize(os.path.join(data_dir, entry))}")
    labels = [self.split(name).labels for name in self.spec.splits]
    digest = fingerprint.hashlib.sha256("|".join(parts).encode())
    for array in labels:
      fingerprint.hash_array(digest, array)
    return digest.hexdigest()[:16]

  def split(self, name: str) -> TfdsSplit:
    """Opens (once) and returns our split ``name``, e.g. "train".

    Raises:
      KeyError: the dataset has no such split in its spec.
      FileNotFoundError: the dataset is not prepared in ``data_dir``.
      RuntimeError: it is prepared, but in a format without random access.
    """
    if name not in self.spec.splits:
      raise KeyError(f"Source {self.name!r} has no split {name!r}; it has "
                     f"{sorted(self.spec.splits)}.")
    if name not in self._splits:
      tfds_split = self.spec.splits[name]
      where = f"{self.name} ({self.spec.builder}, split {tfds_split!r})"
      self._splits[name] = TfdsSplit(
          self._open(tfds_split), self.spec.image_key, self.spec.label_key,
          self._label_feature.num_classes, where, self.spec.label_name_key)
    return self._splits[name]

  def _open(self, tfds_split: str) -> Sequence[Mapping[str, Any]]:
    open_source = functools.partial(
        self._tfds.data_source, self.spec.builder, split=tfds_split,
        data_dir=self.data_dir, download=False)
    try:
      data_source = open_source(decoders=self._skip_image_decoding)
    except Exception as error:  # pylint: disable=broad-except
      explained = self._explain_open_error(error)
      if explained is error:
        raise
      raise explained from error
    return _with_decoding_fallback(data_source,
                                   lambda: open_source(decoders=None))

  def _explain_open_error(self, error: Exception) -> Exception:
    """Turns TFDS's errors for a missing or unusable dataset into advice."""
    builder_name = self.spec.builder
    if not self._builder.is_prepared():
      return FileNotFoundError(
          f"TFDS dataset {builder_name!r} (our {self.name!r}) is not prepared "
          f"in {self._builder.data_dir}, and nothing here downloads. "
          + _prepare_hint(builder_name, self.data_dir))
    file_format = self._builder.info.file_format
    file_formats = self._tfds.core.file_adapters.FileFormat
    if (file_format is not None
        and file_format not in file_formats.with_random_access()):
      return RuntimeError(
          f"TFDS dataset {builder_name!r} is prepared in "
          f"{self._builder.data_dir} as {file_format.value}, which has no "
          "random access; tfds.data_source needs array_record. Rebuild it "
          "into another data_dir (or delete it first). "
          + _prepare_hint(builder_name, self.data_dir))
    return error


def _with_decoding_fallback(
    data_source: Sequence[Mapping[str, Any]],
    open_fully_decoded: Callable[[], Sequence[Mapping[str, Any]]],
) -> Sequence[Mapping[str, Any]]:
  """Returns ``data_source``, or a fully decoded one if skipping fails.

  Skipping image decoding works on any prepared dataset, without
  TensorFlow. But ``tfds.testing.mock_data`` serves examples from a random
  generator that, once decoders are given, *encodes* every feature: that
  needs TensorFlow for images, and fails on its own random bounding boxes
  (Stanford Dogs). Only the fully decoded mock works. So if the first record
  cannot be read with images undecoded but can be read fully decoded, we use
  the fully decoded source (labels then cost a full decode, see
  ``TfdsSplit.labels``); if neither works, the first error is raised.
  """
  if len(data_source) == 0:
    return data_source
  try:
    data_source[0]
  except Exception as skip_error:  # pylint: disable=broad-except
    fully_decoded = open_fully_decoded()
    try:
      fully_decoded[0]
    except Exception:  # pylint: disable=broad-except
      raise skip_error  # pylint: disable=raise-missing-from
    logging.warning("Reading with image decoding skipped failed (%s: %s); "
                    "decoding every feature instead.",
                    type(skip_error).__name__, skip_error)
    return fully_decoded
  return data_source
