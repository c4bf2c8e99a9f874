"""Experiment configs (``get_config()`` files that carry their run command).

Each dataset config builds on ``base.py``, where every default is written
with the rule that chose it. The launchers accept a config by file path or
by name: ``--config fashion_mnist`` is ``adamix_jax/configs/fashion_mnist.py``
(``--config oxford_pets:clip_vit_b32`` passes the string after ``:`` to its
``get_config``).
"""

from __future__ import annotations

import os

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
