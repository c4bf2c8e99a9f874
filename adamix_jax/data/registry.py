"""Config names -> data sources.

``get_source(config.dataset, **config.dataset_kwargs)`` is the one way the
launchers build a source, so every dataset a config can name is listed here.
"""

from __future__ import annotations

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


def _image_folder_loader(name: str) -> Callable[..., base.Source]:
  def load(data_dir: str | None = None, **kwargs: Any) -> base.Source:
    if data_dir is None:
      raise ValueError(
          f"Dataset {name!r} is read from an image folder: pass "
          f"data_dir=<root> laid out as <root>/train/<class>/*.jpg and "
          "<root>/test/<class>/*.jpg (or <root>/<class>/*.jpg).")
    return image_folder.ImageFolderSource(data_dir, name=name, **kwargs)
  load.__doc__ = f"ImageFolderSource(data_dir, name={name!r}, ...)."
  return load


KNOWN_SOURCES: Mapping[str, Callable[..., base.Source]] = (
    types.MappingProxyType({
        "digits": digits.load_digits,
        "fashion_mnist": idx.load_fashion_mnist,
        "npz": npz.load_npz_features,
        **{name: _tfds_loader(name) for name in tfds_source.TFDS_DATASETS},
        "mit67": _image_folder_loader("mit67"),
        "caltech256": _image_folder_loader("caltech256"),
    }))


def get_source(name: str, /, **kwargs: Any) -> base.Source:
  """Builds the source a config calls ``name``.

  Args:
    name: one of ``KNOWN_SOURCES`` (positional-only, so that "npz" can still
      take its own ``name=`` keyword).
    **kwargs: passed to its loader: ``data_dir`` for the TFDS and
      image-folder datasets, ``path`` (and ``name``) for "npz", ``root`` for
      "fashion_mnist", ``test_fraction``/``split_seed`` for "digits".

  Raises:
    ValueError: ``name`` is not a known source.
  """
  if name not in KNOWN_SOURCES:
    raise ValueError(f"Unknown data source {name!r}. Known sources: "
                     f"{', '.join(sorted(KNOWN_SOURCES))}.")
  return KNOWN_SOURCES[name](**kwargs)
