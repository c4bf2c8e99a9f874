"""Shared pytest setup.

XLA_FLAGS must be set before jax is first imported anywhere: the data
parallel tests run the same step on 8 simulated CPU devices.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
