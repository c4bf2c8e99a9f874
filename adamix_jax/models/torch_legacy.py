"""Reads PyTorch's legacy (pre-1.6, non-zip) ``torch.save`` files without torch.

The legacy format is a plain concatenation of pickles followed by raw bytes:

1. the magic number ``0x1950a86a20f9469cfc6c`` (a pickled int),
2. the protocol version (a pickled int, 1001),
3. system info (a pickled dict: endianness and C type sizes),
4. the object itself, pickled with *persistent ids* in place of tensor
   storages: ``('storage', StorageType, key, location, numel[, view])``,
5. a pickled list of the storage keys in the order their data follows,
6. for each key: an 8-byte little-endian element count, then that many
   elements of raw little-endian data.

Tensors inside the object pickle are rebuilt through
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``.
Here every torch name resolves to a small stand-in, so reading needs only
``pickle`` and ``numpy`` and never imports torch.
"""

from __future__ import annotations

import builtins
import collections
import dataclasses
import os
import pickle
from typing import Any, BinaryIO

import numpy as np

LEGACY_MAGIC_NUMBER = 0x1950a86a20f9469cfc6c
LEGACY_PROTOCOL_VERSION = 1001
_ZIP_SIGNATURE = b"PK\x03\x04"

# Storage class name -> numpy dtype of its elements (always little-endian in
# files written on the little-endian machines this format was used on).
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class LegacyTorchFormatError(ValueError):
  """The file is not a readable legacy-format ``torch.save`` file."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """Stands in for a ``torch.*Storage`` class named in the pickle."""

  name: str

  @property
  def dtype(self) -> np.dtype:
    return _STORAGE_DTYPES[self.name]


@dataclasses.dataclass
class _Storage:
  """A storage whose data is filled in once the object pickle is read."""

  key: str
  dtype: np.dtype
  numel: int
  data: np.ndarray | None = None


@dataclasses.dataclass
class _PendingTensor:
  """A tensor view on a storage that may not have been read yet."""

  storage: _Storage
  offset: int
  shape: tuple[int, ...]
  strides: tuple[int, ...]

  def materialise(self) -> np.ndarray:
    data = self.storage.data
    if data is None:
      raise LegacyTorchFormatError(
          f"Storage {self.storage.key!r} is referenced but its data was "
          "never read; the file is incomplete.")
    if not self.shape:
      return data[self.offset].copy()
    # Bounds check before as_strided, which would otherwise read past the
    # end of the buffer silently.
    last_index = self.offset + sum(
        (size - 1) * stride for size, stride in zip(self.shape, self.strides)
        if size > 0)
    if any(size == 0 for size in self.shape):
      return np.zeros(self.shape, dtype=data.dtype)
    if self.offset < 0 or last_index >= data.size:
      raise LegacyTorchFormatError(
          f"Tensor view (offset {self.offset}, shape {self.shape}, strides "
          f"{self.strides}) reaches element {last_index} of storage "
          f"{self.storage.key!r}, which has only {data.size} elements.")
    itemsize = data.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        data[self.offset:],
        shape=self.shape,
        strides=tuple(stride * itemsize for stride in self.strides),
        writeable=False)
    # A contiguous copy so that the result does not pin the whole storage
    # and can be mutated safely by callers.
    return np.array(view, copy=True)


def _rebuild_tensor(storage: _Storage, storage_offset: int, size, stride,
                    *unused_args) -> _PendingTensor:
  """Stand-in for ``torch._utils._rebuild_tensor{,_v2}``.

  The trailing arguments (requires_grad, backward hooks, metadata) do not
  matter for reading values.
  """
  del unused_args
  return _PendingTensor(storage, int(storage_offset), tuple(size),
                        tuple(stride))


def _rebuild_parameter(data, *unused_args):
  """Stand-in for ``torch._utils._rebuild_parameter``: a parameter's data."""
  del unused_args
  return data


_SAFE_BUILTINS = frozenset(("dict", "list", "tuple", "set", "frozenset", "int",
                            "float", "str", "bytes", "bool", "slice"))


class _LegacyUnpickler(pickle.Unpickler):
  """Resolves torch names to stand-ins and storage ids to `_Storage`s.

  Every pickle in the file goes through this class: anything outside a small
  allowlist is refused, so reading an untrusted file cannot run code.
  """

  def __init__(self, file: BinaryIO, storages: dict[str, _Storage]):
    super().__init__(file)
    self._storages = storages

  def find_class(self, module: str, name: str) -> Any:
    if module == "torch._utils" and name in ("_rebuild_tensor",
                                             "_rebuild_tensor_v2"):
      return _rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "builtins" and name in _SAFE_BUILTINS:
      return getattr(builtins, name)
    # Refusing everything else keeps this a data reader: an arbitrary class
    # in the pickle would otherwise be a code execution path.
    raise LegacyTorchFormatError(
        f"Unsupported object {module}.{name} in the pickle; only tensors, "
        "dicts, lists and plain values can be read without torch.")

  def persistent_load(self, persistent_id: Any) -> Any:
    if not (isinstance(persistent_id, tuple) and len(persistent_id) >= 5 and
            persistent_id[0] == "storage"):
      raise LegacyTorchFormatError(
          f"Unknown persistent id {persistent_id!r}; expected a storage.")
    _, storage_type, key, _location, numel = persistent_id[:5]
    view_metadata = persistent_id[5] if len(persistent_id) > 5 else None
    if not isinstance(storage_type, _StorageType):
      raise LegacyTorchFormatError(
          f"Storage {key!r} has unsupported type {storage_type!r}.")
    storage = self._storages.get(key)
    if storage is None:
      storage = _Storage(key=key, dtype=storage_type.dtype, numel=int(numel))
      self._storages[key] = storage
    if view_metadata is not None:
      # Very old files could reference a slice of a storage ("storage
      # views"); those predate _rebuild_tensor_v2 and are not supported.
      raise LegacyTorchFormatError(
          f"Storage {key!r} is a storage view, which is not supported.")
    return storage


def _load_plain_pickle(file: BinaryIO, what: str) -> Any:
  """One of the header/trailer pickles; no storages may appear in it."""
  try:
    return _LegacyUnpickler(file, storages={}).load()
  except EOFError as error:
    raise LegacyTorchFormatError(
        f"File ends before the {what}; it is truncated.") from error
  except pickle.UnpicklingError as error:
    raise LegacyTorchFormatError(
        f"Could not read the {what}: {error}") from error


def _read_exactly(file: BinaryIO, num_bytes: int, what: str) -> bytes:
  data = file.read(num_bytes)
  if len(data) != num_bytes:
    raise LegacyTorchFormatError(
        f"File ends inside {what} (wanted {num_bytes} bytes, got "
        f"{len(data)}); it is truncated.")
  return data


def _flatten_tensors(obj: Any, prefix: str,
                     out: dict[str, np.ndarray]) -> None:
  """Collects every tensor under ``obj`` with a dotted name."""
  if isinstance(obj, _PendingTensor):
    out[prefix] = obj.materialise()
  elif isinstance(obj, dict):
    for key, value in obj.items():
      _flatten_tensors(value, f"{prefix}.{key}" if prefix else str(key), out)
  elif isinstance(obj, (list, tuple)):
    for index, value in enumerate(obj):
      _flatten_tensors(value, f"{prefix}.{index}" if prefix else str(index),
                       out)


def load_legacy_torch_state_dict(path: str | os.PathLike) -> dict[
    str, np.ndarray]:
  """Reads a legacy ``torch.save`` file of tensors into numpy arrays.

  Args:
    path: the ``.pth``/``.pt`` file, written by ``torch.save`` with
      ``_use_new_zipfile_serialization=False`` or by torch < 1.6.

  Returns:
    Name -> array, in file order. A state dict maps directly; a nested
    checkpoint (for example ``{"state_dict": {...}}``) is flattened with
    dotted names. Values keep their stored dtype (float32, float16, int64...).

  Raises:
    LegacyTorchFormatError: the file is a zip-format torch file, is not a
      torch file, uses an unsupported feature, or is truncated.
  """
  path = os.fspath(path)
  with open(path, "rb") as file:
    head = file.read(4)
    if head == _ZIP_SIGNATURE:
      raise LegacyTorchFormatError(
          f"{path} is a zip-format torch file (torch >= 1.6 default). Only the "
          "legacy format can be read without torch; re-save it with "
          "torch.save(obj, path, _use_new_zipfile_serialization=False).")
    file.seek(0)

    magic = _load_plain_pickle(file, "magic number")
    if magic != LEGACY_MAGIC_NUMBER:
      raise LegacyTorchFormatError(
          f"{path} does not start with the legacy torch magic number.")
    protocol = _load_plain_pickle(file, "protocol version")
    if protocol != LEGACY_PROTOCOL_VERSION:
      raise LegacyTorchFormatError(
          f"{path} has torch protocol version {protocol}; expected "
          f"{LEGACY_PROTOCOL_VERSION}.")
    sys_info = _load_plain_pickle(file, "system info")
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
      raise LegacyTorchFormatError(
          f"{path} was written on a big-endian machine; not supported.")

    storages: dict[str, _Storage] = {}
    try:
      obj = _LegacyUnpickler(file, storages).load()
    except LegacyTorchFormatError:
      raise
    except EOFError as error:
      raise LegacyTorchFormatError(
          f"{path} ends inside the object pickle; it is truncated.") from error
    except (pickle.UnpicklingError, TypeError, ValueError, KeyError,
            IndexError, AttributeError) as error:
      # Malformed opcodes or wrong arguments to a rebuild function.
      raise LegacyTorchFormatError(
          f"Could not read the object pickle of {path}: {error!r}") from error

    storage_keys = _load_plain_pickle(file, "storage key list")
    if not isinstance(storage_keys, list):
      raise LegacyTorchFormatError(
          f"{path}: expected a list of storage keys, got {storage_keys!r}.")
    for key in storage_keys:
      storage = storages.get(key)
      if storage is None:
        raise LegacyTorchFormatError(
            f"{path}: storage {key!r} has data but no tensor refers to it.")
      # The count is written as a C int64 regardless of sys_info's sizes.
      (numel,) = np.frombuffer(
          _read_exactly(file, 8, f"the size of storage {key!r}"), dtype="<i8")
      if numel != storage.numel:
        raise LegacyTorchFormatError(
            f"{path}: storage {key!r} declares {storage.numel} elements in "
            f"the pickle but {numel} in its data block.")
      num_bytes = int(numel) * storage.dtype.itemsize
      raw = _read_exactly(file, num_bytes, f"the data of storage {key!r}")
      storage.data = np.frombuffer(raw, dtype=storage.dtype)

  state_dict: dict[str, np.ndarray] = {}
  _flatten_tensors(obj, "", state_dict)
  # Native byte order, so that jax/numpy consumers never see '<f4' vs 'f4'
  # surprises on big-endian hosts.
  return {name: value.astype(value.dtype.newbyteorder("="), copy=False)
          for name, value in state_dict.items()}
