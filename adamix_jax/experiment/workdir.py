"""A run's working directory: where each stage writes, and what it holds.

A workdir remembers the config that made it (``config.json``) and refuses
another one, so outputs of two configurations never mix. Stage outputs are
written atomically (``adamix_jax.io``); a damaged one is reported, never
removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import os
import zipfile
from typing import Optional

import ml_collections
import numpy as np

from adamix_jax import io

# Not part of the experiment: a run with another value is the same run.
UNSAVED_FIELDS = ("progress",)
# Fields added after workdirs were already made, with the value that older
# workdirs (whose config.json lacks them) were run with; nested fields by
# their dotted names ("train.epochs").
LATER_FIELDS = {"cv_solver": "sklearn", "public_cv_scoring": "error"}


class ConfigMismatchError(ValueError):
  """The workdir holds outputs made with a different configuration."""


class WorkdirBusyError(RuntimeError):
  """Another process is running in the same workdir."""


@contextlib.contextmanager
def exclusive(root: str):
  """Holds an exclusive lock on ``root`` for the duration of a run.

  Two runs in one workdir would write the same checkpoints and outputs (one
  dies with a raw orbax error, or worse, both finish): the second is
  refused at once. The kernel releases the lock when the holder exits, even
  by SIGKILL, so a killed run never blocks its resume.
  """
  os.makedirs(root, exist_ok=True)
  path = os.path.join(root, ".lock")
  handle = open(path, "a+")
  try:
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.seek(0)
      holder = handle.read().strip() or "unknown"
      raise WorkdirBusyError(
          f"Another process is running in {root} ({holder}). Wait for it to "
          "finish, or use another --workdir.") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}, started "
                 f"{datetime.datetime.now().isoformat(timespec='seconds')}")
    handle.flush()
    yield
  finally:
    handle.close()


@dataclasses.dataclass(frozen=True)
class Workdir:
  """Paths of one run's outputs (see WORKSPACE.md "How a run flows")."""

  root: str

  def path(self, *parts: str) -> str:
    return os.path.join(self.root, *parts)

  @property
  def features(self) -> str:
    return self.path("features", "features.npz")

  @property
  def splits(self) -> str:
    return self.path("features", "splits.npz")

  def public_init(self, seed: int) -> str:
    return self.path("public_init", f"seed_{seed}.npz")

  def run_dir(self, method: str, seed: int, epsilon: Optional[float]) -> str:
    if epsilon is None:
      return self.path("private", method, f"seed_{seed}")
    return self.path("private", method, f"eps_{epsilon:g}", f"seed_{seed}")


def _saved_form(config: ml_collections.ConfigDict) -> dict:
  current = config.to_dict()
  for field in UNSAVED_FIELDS:
    current.pop(field, None)
  return io.load_json_string(io.dump_json_string(current))


_MISSING = object()


def _flat(tree: dict, prefix: str = "") -> dict:
  """{"train": {"epochs": 3}} -> {"train.epochs": 3}."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _show(value) -> str:
  return "(absent)" if value is _MISSING else repr(value)


def config_differences(config: ml_collections.ConfigDict,
                       workdir: Workdir) -> Optional[list[str]]:
  """``"field: saved -> given"`` for each field where ``config`` differs
  from the workdir's ``config.json``; None when it has none. Reads only."""
  path = workdir.path("config.json")
  if not os.path.exists(path):
    return None
  saved = load_json_output(path, "the first run of this workdir")
  for field in UNSAVED_FIELDS:
    saved.pop(field, None)
  given = _saved_form(config)
  old, new = _flat(saved), _flat(given)
  for field, value in LATER_FIELDS.items():
    old.setdefault(field, value)
    new.setdefault(field, value)
  return [f"{k}: {_show(old.get(k, _MISSING))} -> {_show(new.get(k, _MISSING))}"
          for k in sorted(set(old) | set(new))
          if old.get(k, _MISSING) != new.get(k, _MISSING)]


def check_or_save_config(config: ml_collections.ConfigDict,
                         workdir: Workdir) -> None:
  """Refuses to mix outputs of two different configs in one workdir."""
  changed = config_differences(config, workdir)
  if changed is None:
    io.save_json(workdir.path("config.json"), _saved_form(config))
  elif changed:
    shown = "; ".join(changed[:5]) + ("; ..." if len(changed) > 5 else "")
    raise ConfigMismatchError(
        f"{workdir.root} holds a run made with a different config "
        f"({len(changed)} field(s) differ: {shown}). Use a new --workdir, "
        "or rerun with the workdir's config (its config.json); nothing in "
        "the workdir was changed.")


def load_npz_output(path: str, stage: str) -> dict[str, np.ndarray]:
  """Reads one stage's npz output; a damaged file is reported, never removed.

  Stages skip outputs that exist, so rerunning alone would keep a truncated
  file forever: the message says to delete it first.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing: run the {stage!r} stage "
                            f"first (--stages={stage},...).")
  try:
    return io.load_npz(path)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
    raise ValueError(
        f"{path} is unreadable: truncated or corrupt ({type(error).__name__}: "
        f"{error}). It was left in place: delete it and rerun the {stage!r} "
        f"stage (--stages={stage},...) to rebuild it.") from error


def load_json_output(path: str, stage: str):
  """Reads one JSON output; a damaged file is reported, never removed."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing: run the {stage!r} stage "
                            f"first.")
  try:
    return io.load_json(path)
  except (OSError, ValueError) as error:
    raise ValueError(
        f"{path} is unreadable: truncated or corrupt ({type(error).__name__}: "
        f"{error}). It was left in place: delete it and rerun {stage} to "
        "rebuild it.") from error
