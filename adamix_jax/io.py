"""Atomic writes: a crash leaves the old file or the new one, never half.

The one writer of every output (stage files, ledgers, caches, summaries).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import numpy as np


def _atomic(path: str, write) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    # mkstemp creates 0600 files; give outputs the usual umask permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def save_json(path: str, data: Any) -> None:
  _atomic(path, lambda f: f.write(
      (json.dumps(data, indent=2, sort_keys=False, default=_json_default) +
       "\n").encode()))


def load_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def save_text(path: str, text: str) -> None:
  _atomic(path, lambda f: f.write(text.encode()))


def save_bytes(path: str, data: bytes) -> None:
  _atomic(path, lambda f: f.write(data))


def save_npz(path: str, **arrays: np.ndarray) -> None:
  _atomic(path, lambda f: np.savez(f, **arrays))


def load_npz(path: str) -> dict[str, np.ndarray]:
  with np.load(path, allow_pickle=False) as data:
    return {k: data[k] for k in data.files}


def _json_default(value):
  if isinstance(value, (np.integer,)):
    return int(value)
  if isinstance(value, (np.floating,)):
    return float(value)
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, tuple):
    return list(value)
  raise TypeError(f"not JSON serialisable: {type(value)}")


def dump_json_string(data: Any) -> str:
  return json.dumps(data, default=_json_default)


def load_json_string(text: str) -> Any:
  return json.loads(text)
