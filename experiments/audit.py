"""``python experiments/audit.py ARGS`` is ``adamix-audit ARGS`` (a shim)."""
import os, sys; sys.path.insert(0, os.path.abspath(__file__ + "/../.."))
from adamix_jax.launch.audit import run; run()
