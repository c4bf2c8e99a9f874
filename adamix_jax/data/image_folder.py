"""Image datasets stored as one folder per class (MIT-67, Caltech-256).

TFDS lacks some of the paper's datasets; point this source at a folder laid
out in either of two ways:

* ``root/train/<class>/*.jpg`` and ``root/test/<class>/*.jpg``: the split is
  the one on disk (use this for official splits, e.g. MIT-67's
  ``TrainImages.txt`` / ``TestImages.txt`` turned into folders).
* ``root/<class>/*.jpg`` with no ``train``/``test`` folders: the images are
  split here, per class, into a test fraction chosen by a seeded shuffle.

Images are read lazily with PIL, one per ``__getitem__``.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Sequence

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff",
                    ".webp", ".ppm", ".pgm")


def to_rgb_uint8(image: Any, where: str = "image") -> np.ndarray:
  """Returns any decoded or encoded image as an ``HxWx3`` uint8 array.

  Args:
    image: encoded bytes (PNG, JPEG, ...), a PIL image, or an array shaped
      ``HxW``, ``HxWx1``, ``HxWx3`` or ``HxWx4`` (alpha is dropped).
    where: names the image in error messages.

  Returns:
    A C-contiguous ``HxWx3`` uint8 array.
  """
  if isinstance(image, (bytes, bytearray, memoryview)):
    import io  # pylint: disable=g-import-not-at-top
    pil_image = _pil().open(io.BytesIO(bytes(image)))
    return np.asarray(pil_image.convert("RGB"), dtype=np.uint8)
  if hasattr(image, "convert") and hasattr(image, "mode"):  # A PIL image.
    return np.asarray(image.convert("RGB"), dtype=np.uint8)
  array = np.asarray(image)
  if array.dtype != np.uint8:
    raise ValueError(
        f"{where}: expected uint8 pixels, got dtype {array.dtype}.")
  if array.ndim == 3 and array.shape[-1] in (1, 3, 4):
    array = array[..., :3] if array.shape[-1] == 4 else array
  elif array.ndim != 2:
    raise ValueError(f"{where}: expected an HxW, HxWx1, HxWx3 or HxWx4 image, "
                     f"got shape {array.shape}.")
  if array.ndim == 2:
    array = array[..., None]
  if array.shape[-1] == 1:
    array = np.repeat(array, 3, axis=-1)
  return np.ascontiguousarray(array)


def _pil():
  """Imports PIL.Image on first use so the data package needs no PIL."""
  try:
    from PIL import Image  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ImportError(
        "Reading image files needs Pillow: pip install pillow") from error
  return Image


class ImageFolderSplit:
  """One split: image paths and their labels; pixels load on access."""

  def __init__(self, paths: Sequence[pathlib.Path], labels: np.ndarray):
    if len(paths) != len(labels):
      raise ValueError(f"{len(paths)} paths but {len(labels)} labels.")
    self.paths = tuple(paths)
    self.labels = np.asarray(labels, dtype=np.int64)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    path = self.paths[index]
    try:
      with _pil().open(path) as pil_image:
        image = to_rgb_uint8(pil_image, where=str(path))
    except OSError as error:  # PIL's unreadable / truncated images
      raise ValueError(
          f"{path}: cannot read this image ({type(error).__name__}: {error}). "
          "Replace or remove the file, then rerun (finished stages are "
          "kept).") from error
    return image, int(self.labels[index])

  def as_array(self) -> None:
    """Always None: image sizes differ from file to file."""
    return None


def _is_image_file(path: pathlib.Path) -> bool:
  return (path.is_file() and not path.name.startswith(".")
          and path.suffix.lower() in IMAGE_EXTENSIONS)


def _list_class_folders(folder: pathlib.Path) -> dict[str, list[pathlib.Path]]:
  """Maps each class sub-folder name to its sorted image files.

  Raises:
    ValueError: when ``folder`` has no class sub-folders, or one is empty.
  """
  class_dirs = sorted(
      (entry for entry in folder.iterdir()
       if entry.is_dir() and not entry.name.startswith(".")),
      key=lambda entry: entry.name)
  if not class_dirs:
    raise ValueError(
        f"No class folders in {folder}. Expected one sub-folder per class, "
        f"e.g. {folder}/<class_name>/image.jpg.")
  images_per_class = {}
  for class_dir in class_dirs:
    images = sorted((p for p in class_dir.iterdir() if _is_image_file(p)),
                    key=lambda p: p.name)
    if not images:
      raise ValueError(
          f"Class folder {class_dir} holds no images (looked for "
          f"{', '.join(IMAGE_EXTENSIONS)}). Remove it or add its images.")
    images_per_class[class_dir.name] = images
  return images_per_class


def _flatten(images_per_class: dict[str, list[pathlib.Path]],
             class_index: dict[str, int]) -> ImageFolderSplit:
  paths, labels = [], []
  for class_name, images in images_per_class.items():
    paths.extend(images)
    labels.extend([class_index[class_name]] * len(images))
  return ImageFolderSplit(paths, np.asarray(labels, dtype=np.int64))


class ImageFolderSource:
  """A ``Source`` over a folder of class sub-folders of images.

  Classes are the sub-folder names, sorted; label ``i`` is the ``i``-th name.
  With ``root/train`` and ``root/test`` the split is the one on disk; every
  test class must also be a train class (a test class may be missing from
  test). Without them, each class of ``root/<class>`` is split on its own:
  its files, sorted by name, are shuffled with ``split_seed`` and
  ``round(test_fraction * n)`` of them go to test, capped at ``n - 1`` so that
  every class keeps at least one training image (a single-image class has no
  test image). The split depends only on the file names and ``split_seed``,
  not on the run seed, so every run is evaluated on the same test set.
  """

  kind = "image"

  def __init__(self,
               root: str | os.PathLike[str],
               name: str,
               test_fraction: float = 0.2,
               split_seed: int = 0):
    """Lists the images (it reads no pixels).

    Args:
      root: the dataset folder (either layout above).
      name: the dataset's name, e.g. "mit67".
      test_fraction: single-folder layout only: share of each class to test.
      split_seed: single-folder layout only: seeds the per-class shuffle.

    Raises:
      FileNotFoundError: ``root`` is not a folder.
      ValueError: a malformed layout (no classes, an empty class folder, a
        test class absent from train, only one of train/ and test/).
    """
    self.root = pathlib.Path(root)
    self.name = name
    if not self.root.is_dir():
      raise FileNotFoundError(
          f"Image folder for {name!r} not found: {self.root}. Point data_dir "
          "at a folder laid out as <root>/train/<class>/*.jpg and "
          "<root>/test/<class>/*.jpg, or <root>/<class>/*.jpg.")
    train_dir, test_dir = self.root / "train", self.root / "test"
    if train_dir.is_dir() and test_dir.is_dir():
      self.layout = "train_test"
      train = _list_class_folders(train_dir)
      test = _list_class_folders(test_dir)
      unknown = sorted(set(test) - set(train))
      if unknown:
        raise ValueError(
            f"{test_dir} has class folder(s) {unknown} that {train_dir} lacks. "
            "Every test class must also be a train class.")
      self.class_names = tuple(train)
      class_index = {c: i for i, c in enumerate(self.class_names)}
      self._splits = {"train": _flatten(train, class_index),
                      "test": _flatten(test, class_index)}
    elif train_dir.is_dir() or test_dir.is_dir():
      present, absent = ((train_dir, test_dir) if train_dir.is_dir()
                         else (test_dir, train_dir))
      raise ValueError(
          f"{present} exists but {absent} does not. Provide both train/ and "
          f"test/, or neither (then {self.root}/<class>/ is split here).")
    else:
      if not 0.0 < test_fraction < 1.0:
        raise ValueError(
            f"test_fraction must be in (0, 1), got {test_fraction}.")
      self.layout = "single"
      images_per_class = _list_class_folders(self.root)
      self.class_names = tuple(images_per_class)
      self._splits = self._split_per_class(images_per_class, test_fraction,
                                           split_seed)

  @staticmethod
  def _split_per_class(images_per_class: dict[str, list[pathlib.Path]],
                       test_fraction: float,
                       split_seed: int) -> dict[str, ImageFolderSplit]:
    rng = np.random.default_rng(split_seed)
    paths = {"train": [], "test": []}
    labels = {"train": [], "test": []}
    for label, images in enumerate(images_per_class.values()):
      order = rng.permutation(len(images))
      num_test = min(int(round(test_fraction * len(images))), len(images) - 1)
      test_positions = set(order[:num_test].tolist())
      for position, path in enumerate(images):
        split = "test" if position in test_positions else "train"
        paths[split].append(path)
        labels[split].append(label)
    return {split: ImageFolderSplit(paths[split],
                                    np.asarray(labels[split], dtype=np.int64))
            for split in ("train", "test")}

  def fingerprint(self) -> str:
    """sha256 of every image's relative path, label and bytes."""
    from adamix_jax.data import fingerprint  # pylint: disable=g-import-not-at-top
    paths, extra = [], [self.layout, "|".join(self.class_names)]
    for name, split in sorted(self._splits.items()):
      paths += list(split.paths)
      extra.append(f"{name}:{','.join(map(str, split.labels.tolist()))}")
    return fingerprint.files_fingerprint(self.root, paths, "|".join(extra))

  def split(self, name: str) -> ImageFolderSplit:
    if name not in self._splits:
      raise KeyError(f"Source {self.name!r} has no split {name!r}; it has "
                     f"{sorted(self._splits)}.")
    return self._splits[name]
