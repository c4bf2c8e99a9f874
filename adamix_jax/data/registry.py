"""Config names -> data sources.

``get_source(config.dataset, **config.dataset_kwargs)`` is the one way the
launchers build a source, so every dataset a config can name is listed here.
Two are generic, for a user's own data: "image_folder" (``data_dir``, one
sub-folder per class; configs/image_folder.py) and "npz" (``path``,
precomputed features; configs/npz.py).
"""

from __future__ import annotations

import os
import types
from typing import Any, Callable, Mapping

from adamix_jax.data import base
from adamix_jax.data import digits
from adamix_jax.data import idx
from adamix_jax.data import image_folder
from adamix_jax.data import npz
from adamix_jax.data import tfds_source


def _tfds_loader(name: str) -> Callable[..., base.Source]:
  def load(**kwargs: Any) -> base.Source:
    return tfds_source.TfdsSource(name, **kwargs)
  load.__doc__ = (f"TfdsSource({name!r}, data_dir=None): TFDS builder "
                  f"{tfds_source.TFDS_DATASETS[name].builder!r}.")
  return load


def _image_folder_loader(name: str | None) -> Callable[..., base.Source]:
  """A paper dataset's folder (``name``), or any folder (None: "image_folder",
  named after the folder unless given ``name=``)."""
  def load(data_dir: str | None = None, **kwargs: Any) -> base.Source:
    dataset = name or "image_folder"
    if data_dir is None:
      raise ValueError(
          f"Dataset {dataset!r} is read from an image folder: pass "
          "--config.dataset_kwargs.data_dir=DIR, with DIR laid out as "
          "DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg (or "
          "DIR/<class>/*.jpg).")
    source_name = name
    if name is None:
      source_name = kwargs.pop("name", None) or os.path.basename(
          os.path.normpath(os.fspath(data_dir)))
    return image_folder.ImageFolderSource(data_dir, name=source_name,
                                          **kwargs)
  load.__doc__ = (f"ImageFolderSource(data_dir, name={name!r}, ...)." if name
                  else "ImageFolderSource(data_dir, name=folder name, ...).")
  return load


def _npz_loader(path: str | None = None, name: str | None = None
                ) -> base.Source:
  """npz.load_npz_features(path, name): precomputed features."""
  if path is None:
    raise ValueError(
        "Dataset 'npz' reads precomputed features: pass "
        "--config.dataset_kwargs.path=FILE.npz, a file written with "
        "np.savez(FILE, x_train=..., y_train=..., x_test=..., y_test=...).")
  return npz.load_npz_features(path, name=name)


def _fashion_mnist_loader(root: str | None = None,
                          data_dir: str | None = None,
                          **kwargs: Any) -> base.Source:
  """idx.load_fashion_mnist(root or data_dir): ``data_dir`` as for every
  other folder dataset, ``root`` as before."""
  if root is not None and data_dir is not None and root != data_dir:
    raise ValueError(f"fashion_mnist: root={root!r} and data_dir={data_dir!r} "
                     "name two folders; pass one of them.")
  folder = data_dir if data_dir is not None else root
  if folder is None:
    return idx.load_fashion_mnist(**kwargs)
  return idx.load_fashion_mnist(folder, **kwargs)


KNOWN_SOURCES: Mapping[str, Callable[..., base.Source]] = (
    types.MappingProxyType({
        "digits": digits.load_digits,
        "fashion_mnist": _fashion_mnist_loader,
        "npz": _npz_loader,
        "image_folder": _image_folder_loader(None),
        **{name: _tfds_loader(name) for name in tfds_source.TFDS_DATASETS},
        "mit67": _image_folder_loader("mit67"),
        "caltech256": _image_folder_loader("caltech256"),
    }))


def get_source(name: str, /, **kwargs: Any) -> base.Source:
  """Builds the source a config calls ``name``.

  Args:
    name: one of ``KNOWN_SOURCES`` (positional-only, so that "npz" can still
      take its own ``name=`` keyword).
    **kwargs: passed to its loader: ``data_dir`` for the TFDS,
      image-folder and Fashion-MNIST datasets (``root`` also works for
      "fashion_mnist"), ``path`` (and ``name``) for "npz",
      ``test_fraction``/``split_seed`` for "digits" and the image folders,
      ``name`` (the label of the results) for "image_folder".

  Raises:
    ValueError: ``name`` is not a known source.
  """
  if name not in KNOWN_SOURCES:
    raise ValueError(f"Unknown data source {name!r}. Known sources: "
                     f"{', '.join(sorted(KNOWN_SOURCES))}.")
  return KNOWN_SOURCES[name](**kwargs)
