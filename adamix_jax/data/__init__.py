"""Data sources and deterministic splits.

Importing this package needs only the core dependencies: TFDS and PIL are
imported on first use by the sources that need them.
"""

from __future__ import annotations

from adamix_jax.data.base import ArraySource
from adamix_jax.data.base import ArraySplit
from adamix_jax.data.base import check_finite
from adamix_jax.data.base import check_labels
from adamix_jax.data.base import class_names_or_default
from adamix_jax.data.base import ITEM_KINDS
from adamix_jax.data.base import LabeledSplit
from adamix_jax.data.base import Source
from adamix_jax.data.digits import load_digits
from adamix_jax.data.idx import encode_idx
from adamix_jax.data.idx import FASHION_MNIST_CLASSES
from adamix_jax.data.idx import load_fashion_mnist
from adamix_jax.data.idx import parse_idx
from adamix_jax.data.idx import read_idx
from adamix_jax.data.image_folder import ImageFolderSource
from adamix_jax.data.image_folder import ImageFolderSplit
from adamix_jax.data.image_folder import to_rgb_uint8
from adamix_jax.data.npz import load_npz_features
from adamix_jax.data.registry import get_source
from adamix_jax.data.registry import KNOWN_SOURCES
from adamix_jax.data.splits import few_shot_split
from adamix_jax.data.splits import FewShotSplit
from adamix_jax.data.tfds_source import TFDS_DATASETS
from adamix_jax.data.tfds_source import TfdsSource
from adamix_jax.data.tfds_source import TfdsSpec
from adamix_jax.data.tfds_source import TfdsSplit

__all__ = [
    "ArraySource", "ArraySplit", "check_finite", "check_labels",
    "class_names_or_default", "encode_idx", "FASHION_MNIST_CLASSES",
    "few_shot_split", "FewShotSplit", "get_source", "ImageFolderSource",
    "ImageFolderSplit", "ITEM_KINDS", "KNOWN_SOURCES", "LabeledSplit",
    "load_digits", "load_fashion_mnist", "load_npz_features", "parse_idx",
    "read_idx", "Source", "TFDS_DATASETS", "TfdsSource", "TfdsSpec",
    "TfdsSplit", "to_rgb_uint8",
]
