r"""Runs one AdaMix experiment: features -> public_init -> private -> accounting -> report.

  python -m launch.main --workdir /tmp/adamix_digits
  python -m launch.main --config experiments/configs/fashion_mnist.py \
      --workdir /tmp/fmnist --config.seeds=0,1
  python -m launch.main --workdir /tmp/adamix_digits --stages report
  python -m launch.main --workdir /tmp/adamix_digits --data_parallel

``--data_parallel`` runs the private steps data parallel over all devices
(``adamix_jax.parallel``); ``--multihost`` first calls
``jax.distributed.initialize()``, for a TPU pod, where the same command runs
on every host (see WORKSPACE.md, "Scale out").

Each stage reads the previous stage's output from the workdir; finished work
is skipped, so re-running the same command resumes an interrupted run.
"""

from __future__ import annotations

import os
import shlex
import sys

from absl import app
from absl import logging as absl_logging
from absl import flags
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "experiments", "configs", "digits.py")

config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Experiment config file (ml_collections).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.",
                               required=True)
_STAGES = flags.DEFINE_list(
    "stages", "features,public_init,private,accounting,report",
    "Stages to run, in order.")
_DATA_PARALLEL = flags.DEFINE_bool(
    "data_parallel", False,
    "Run the private steps data parallel over a mesh of all devices.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False,
    "Call jax.distributed.initialize() first (multi-host TPU pods); implies "
    "--data_parallel.")


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  from adamix_jax import parallel  # after flags: faster --help
  from adamix_jax.train import report, stages
  mesh = parallel.launch_mesh(_DATA_PARALLEL.value, _MULTIHOST.value)
  command = "python -m launch.main " + " ".join(
      shlex.quote(a) for a in sys.argv[1:])
  records = stages.run(flags.FLAGS.config, _WORKDIR.value, _STAGES.value,
                       command=command, mesh=mesh)
  if records is not None:
    print(report.markdown_table(records, flags.FLAGS.config.epsilons))
    print(f"\nWrote {os.path.join(_WORKDIR.value, 'results.json')} and "
          f"results.md")


if __name__ == "__main__":
  app.run(main)
