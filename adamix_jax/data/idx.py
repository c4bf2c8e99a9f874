"""IDX files (the MNIST format) and the Fashion-MNIST loader built on them.

An IDX file is: two zero bytes, a dtype code byte, a byte holding the number
of dimensions ``n``, then ``n`` big-endian uint32 sizes, then the values,
big-endian, in C order. Files may be gzip-compressed; that is detected from
the content, not the file name.
"""

from __future__ import annotations

import gzip
import os
import pathlib
import struct
import zlib

import numpy as np

from adamix_jax.data import base

IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def parse_idx(data: bytes, where: str = "IDX data") -> np.ndarray:
  """Decodes the bytes of an (uncompressed) IDX file.

  Args:
    data: the file's content.
    where: names the data in error messages.

  Returns:
    The array, in native byte order.

  Raises:
    ValueError: bad magic, unknown dtype code, or a size that disagrees
      with the header (truncated or trailing bytes).
  """
  if len(data) < 4:
    raise ValueError(
        f"{where}: {len(data)} bytes is too short for an IDX header (4 bytes "
        "of magic). The file is truncated or not IDX.")
  zero0, zero1, dtype_code, num_dims = data[:4]
  if zero0 != 0 or zero1 != 0 or dtype_code not in IDX_DTYPES:
    raise ValueError(
        f"{where}: bad IDX magic {data[:4].hex()}; expected 0000 then a dtype "
        f"code in {[f'{c:02x}' for c in IDX_DTYPES]} and the number of "
        "dimensions. Is this an IDX (MNIST-format) file?")
  header_size = 4 + 4 * num_dims
  if len(data) < header_size:
    raise ValueError(f"{where}: truncated IDX header: {num_dims} dimensions "
                     f"need {header_size} bytes, the file has {len(data)}.")
  shape = struct.unpack(f">{num_dims}I", data[4:header_size])
  dtype = IDX_DTYPES[dtype_code]
  expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  actual = len(data) - header_size
  if actual != expected:
    problem = "truncated" if actual < expected else "has trailing bytes"
    raise ValueError(
        f"{where}: IDX file {problem}: shape {shape} of {dtype.name} needs "
        f"{expected} data bytes, found {actual}.")
  array = np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape)
  return array.astype(dtype.newbyteorder("="))


def encode_idx(array: np.ndarray) -> bytes:
  """Encodes an array as IDX bytes (the inverse of ``parse_idx``)."""
  array = np.asarray(array)
  codes = {dtype.newbyteorder("="): code for code, dtype in IDX_DTYPES.items()}
  native = array.dtype.newbyteorder("=")
  if native not in codes:
    raise ValueError(f"IDX cannot store dtype {array.dtype}; use one of "
                     f"{[d.name for d in IDX_DTYPES.values()]}.")
  header = bytes([0, 0, codes[native], array.ndim])
  header += struct.pack(f">{array.ndim}I", *array.shape)
  big_endian = array.astype(native.newbyteorder(">"))
  return header + big_endian.tobytes(order="C")


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
  """Reads an IDX file, gzip-compressed or not."""
  path = pathlib.Path(path)
  data = path.read_bytes()
  if data[:2] == _GZIP_MAGIC:
    try:
      data = gzip.decompress(data)
    except (EOFError, OSError, zlib.error) as error:
      raise ValueError(f"{path}: corrupt or truncated gzip stream "
                       f"({error}).") from error
  return parse_idx(data, where=str(path))


def _find_idx_file(root: pathlib.Path, stem: str) -> pathlib.Path:
  """Finds ``stem`` under its usual spellings, gzipped or not."""
  # "train-images.idx3-ubyte" is how some archives spell the same file.
  dotted = stem.replace("-idx", ".idx")
  for name in (stem, f"{stem}.gz", dotted, f"{dotted}.gz"):
    if (root / name).is_file():
      return root / name
  raise FileNotFoundError(
      f"No {stem}(.gz) in {root}. On Debian/Ubuntu install Fashion-MNIST "
      "with: apt-get install -y dataset-fashion-mnist (files go to "
      f"{FASHION_MNIST_ROOT}), or pass root= a folder holding the four IDX "
      "files.")


def load_fashion_mnist(root: str | os.PathLike[str] = FASHION_MNIST_ROOT,
                       channels: int = 3) -> base.ArraySource:
  """Fashion-MNIST's official 60k/10k split, as ``28x28xC`` uint8 images.

  Args:
    root: folder holding ``train-images-idx3-ubyte(.gz)``,
      ``train-labels-idx1-ubyte(.gz)``, ``t10k-images-idx3-ubyte(.gz)`` and
      ``t10k-labels-idx1-ubyte(.gz)`` (Debian's dataset-fashion-mnist).
    channels: 3 (default) gives ``28x28x3`` like every other image source,
      so backbones need no special case. The three channels are a read-only
      broadcast view of the one gray channel (no extra memory); copy before
      writing to it. 1 gives plain ``28x28x1``.

  Returns:
    An ArraySource named "fashion_mnist" with splits "train" and "test".
  """
  if channels not in (1, 3):
    raise ValueError(f"channels must be 1 or 3, got {channels}.")
  root = pathlib.Path(root)
  if not root.is_dir():
    raise FileNotFoundError(
        f"Fashion-MNIST folder {root} does not exist. Install it with: "
        "apt-get install -y dataset-fashion-mnist, or pass root=.")
  splits = {}
  for split, prefix in (("train", "train"), ("test", "t10k")):
    images_path = _find_idx_file(root, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_idx_file(root, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(images_path)
    if images.ndim != 3 or images.dtype != np.uint8:
      raise ValueError(f"{images_path}: expected uint8 images of shape "
                       f"(N, H, W), got {images.dtype} {images.shape}.")
    labels = base.check_labels(read_idx(labels_path),
                               len(FASHION_MNIST_CLASSES), str(labels_path))
    if len(images) != len(labels):
      raise ValueError(
          f"Label count mismatch: {images_path} has {len(images)} images but "
          f"{labels_path} has {len(labels)} labels. The two files must come "
          "from the same split and download; re-download the damaged one.")
    images = images[..., None]
    if channels == 3:
      images = np.broadcast_to(images, images.shape[:3] + (3,))
    splits[split] = base.ArraySplit(images, labels)
  return base.ArraySource(name="fashion_mnist",
                          class_names=FASHION_MNIST_CLASSES,
                          kind="image",
                          splits=splits)
