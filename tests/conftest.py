"""Shared pytest setup.

XLA_FLAGS must be set before jax is first imported anywhere: the data
parallel tests run the same step on 8 simulated CPU devices, with the CPU
collective timeouts of the console scripts (a loaded CI machine otherwise
gets XLA's 40 s abort).
"""

import hashlib
import os

import pytest

from adamix_jax.launch import cli

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
cli.configure_xla()


@pytest.fixture(scope="module")
def meshes():
  """(1-device mesh, 8-device mesh) for the multidevice tests."""
  import jax  # pylint: disable=g-import-not-at-top
  from adamix_jax import parallel  # pylint: disable=g-import-not-at-top
  from multidevice_helpers import NUM_DEVICES  # pylint: disable=g-import-not-at-top
  if jax.device_count() < NUM_DEVICES:
    pytest.skip(f"needs {NUM_DEVICES} devices (XLA_FLAGS above)")
  return parallel.make_data_mesh(1), parallel.make_data_mesh(NUM_DEVICES)


def _file_hashes(root, skip=(".lock",)) -> dict:
  """Relative path -> sha256 of every file under ``root`` (the workdir's
  lock file, which only names its holder, is not an output)."""
  out = {}
  for directory, _, names in os.walk(root):
    for name in names:
      if name in skip:
        continue
      path = os.path.join(directory, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture
def file_hashes():
  """``file_hashes(root)``: what a failed run must leave untouched."""
  return _file_hashes
