"""Experiment configs (``get_config()`` files that carry their run command).

Each dataset config builds on ``base.py``, where every default is written
with the rule that chose it. The launchers accept a config by file path or
by name: ``--config fashion_mnist`` is ``adamix_jax/configs/fashion_mnist.py``
(``--config oxford_pets:clip_vit_b32`` passes the string after ``:`` to its
``get_config``).
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
from typing import Any, Sequence

import ml_collections

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))
# Files here that are shared pieces, not runnable configs.
_NOT_CONFIGS = ("__init__", "base", "paper_common")


def names() -> list[str]:
  """The packaged config names."""
  return sorted(f[:-3] for f in os.listdir(CONFIG_DIR)
                if f.endswith(".py") and f[:-3] not in _NOT_CONFIGS)


def resolve(value: str) -> str:
  """A ``--config`` value -> a config file path (names -> packaged files).

  ``NAME`` or ``NAME:arg`` with a packaged NAME becomes its path (keeping
  ``:arg``); anything else (a path) is returned unchanged.
  """
  name, sep, arg = value.partition(":")
  if os.sep not in name and not name.endswith(".py") and name in names():
    return os.path.join(CONFIG_DIR, name + ".py") + sep + arg
  return value


def default_path() -> str:
  return os.path.join(CONFIG_DIR, "digits.py")


# --- loading, checking and describing a config (the launchers use these) ----

# Datasets that have a generic packaged config of the same name: with no
# --config, ``--config.dataset=NAME`` starts from it (see ``default_for``).
GENERIC_DATASET_CONFIGS = ("image_folder", "npz")


def default_for(argv: Sequence[str]) -> str:
  """The config a command line without ``--config`` starts from.

  ``digits``, unless it sets ``--config.dataset`` to a generic dataset
  (``image_folder``, ``npz``): then that dataset's packaged config, which
  declares its fields (``dataset_kwargs.data_dir`` / ``path``) and a
  fitting backbone.
  """
  for i, arg in enumerate(argv):
    value = None
    if arg.startswith("--config.dataset="):
      value = arg.split("=", 1)[1]
    elif arg == "--config.dataset" and i + 1 < len(argv):
      value = argv[i + 1]
    if value in GENERIC_DATASET_CONFIGS:
      return os.path.join(CONFIG_DIR, value + ".py")
  return default_path()


def load(value: str) -> ml_collections.ConfigDict:
  """``get_config()`` of a ``--config`` value: a name, a file, ``X:arg``.

  Raises:
    FileNotFoundError: no packaged config of that name and no such file.
    ValueError: the file has no ``get_config``.
  """
  path, sep, arg = resolve(value).partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"config {value!r}: no such config file and no packaged config of "
        f"that name (packaged: {', '.join(names())}).")
  name = "_adamix_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"--config {value!r}: {path} has no get_config().")
  return module.get_config(arg) if sep else module.get_config()


def fields(config: ml_collections.ConfigDict, prefix: str = ""
           ) -> dict[str, Any]:
  """Dotted field name -> value, for every leaf of ``config``."""
  out = {}
  for key in sorted(config.keys()):
    value = config[key]
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      nested = fields(value, name + ".")
      out.update(nested if nested else {name: value})
    else:
      out[name] = value
  return out


def override_names(argv: Sequence[str], flag: str = "config") -> list[str]:
  """The dotted fields that ``--config.FIELD=...`` arguments override."""
  prefix = f"--{flag}."
  return [arg[len(prefix):].split("=", 1)[0] for arg in argv
          if arg.startswith(prefix)]


def check_overrides(config: ml_collections.ConfigDict, argv: Sequence[str],
                    config_name: str, flag: str = "config") -> None:
  """Refuses ``--config.FIELD`` for a FIELD the config does not declare.

  Raises:
    ValueError: naming the field, the closest declared ones, and
      ``--config_help``.
  """
  declared = fields(config)
  groups = {name.rsplit(".", 1)[0] for name in declared if "." in name}
  for name in override_names(argv, flag):
    if name in declared or name in groups:
      continue
    close = difflib.get_close_matches(name, list(declared), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    if name.startswith("dataset_kwargs.") and not close:
      hint = (" The dataset's own config declares its fields: e.g. --config "
              "image_folder (dataset_kwargs.data_dir) or --config npz "
              "(dataset_kwargs.path).")
    raise ValueError(
        f"--{flag}.{name}: config {config_name!r} has no field {name!r}.{hint}"
        f" --config_help lists every field.")


def split_comma_lists(config: ml_collections.ConfigDict) -> None:
  """``--config.methods=dp_sgd,adamix`` -> ``('dp_sgd', 'adamix')``.

  ml_collections reads an unquoted tuple of strings as ONE string; every
  tuple field whose strings hold commas is split at them (in place).
  """
  for name, value in fields(config).items():
    if isinstance(value, tuple) and any(
        isinstance(v, str) and "," in v for v in value):
      parts = []
      for v in value:
        if isinstance(v, str):
          parts.extend(p.strip() for p in v.split(",") if p.strip())
        else:
          parts.append(v)
      *parents, leaf = name.split(".")
      target = config
      for parent in parents:
        target = target[parent]
      target[leaf] = tuple(parts)


def label(config: ml_collections.ConfigDict) -> str:
  """The dataset's name in results: ``dataset_label``, else a generic
  dataset's ``name`` or folder / file name, else ``config.dataset``."""
  if config.get("dataset_label"):
    return config.dataset_label
  kwargs = config.get("dataset_kwargs") or {}
  if config.dataset in GENERIC_DATASET_CONFIGS:
    if kwargs.get("name"):
      return kwargs["name"]
    where = kwargs.get("data_dir") or kwargs.get("path")
    if where:
      base_name = os.path.basename(os.path.normpath(str(where)))
      return os.path.splitext(base_name)[0] or config.dataset
  return config.dataset


def _comments(path: str) -> dict[str, str]:
  """What a config file says of each field: the comment at the end of its
  ``config.x.y = ...`` line, else the comment lines right above it."""
  out = {}
  try:
    with open(path) as f:
      lines = f.read().splitlines()
  except OSError:
    return out
  assignment = re.compile(r"^\s*config\.([\w.]+)\s*=(.*)$")
  above: list[str] = []
  for line in lines:
    stripped = line.strip()
    if stripped.startswith("#"):
      text = stripped.lstrip("#").strip()
      if not text.startswith("---"):
        above.append(text)
      continue
    match = assignment.match(line)
    if match:
      _, hash_sign, trailing = match.group(2).partition("  #")
      comment = trailing.strip() if hash_sign else " ".join(above)
      if comment:
        out[match.group(1)] = comment
    above = []
  return out


def _shown(value: Any) -> str:
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  return repr(value)


def reference(config: ml_collections.ConfigDict, config_value: str) -> str:
  """``--config_help``: every field, its value here, and its comment."""
  comments = _comments(os.path.join(CONFIG_DIR, "base.py"))
  path = resolve(config_value).partition(":")[0]
  comments.update(_comments(path))
  name = os.path.splitext(os.path.basename(path))[0]
  lines = [f"Fields of config {name!r} ({path}); set any with "
           "--config.FIELD=VALUE. Lists are comma separated: "
           "--config.seeds=0,1, --config.methods=dp_sgd,adamix.", ""]
  for field, value in fields(config).items():
    comment = comments.get(field)
    lines.append(f"  --config.{field}={_shown(value)}" +
                 (f"    # {comment}" if comment else ""))
  return "\n".join(lines)
