r"""Runs one AdaMix experiment: features -> public_init -> private -> accounting -> report.

  python -m launch.main --workdir /tmp/adamix_digits
  python -m launch.main --config experiments/configs/fashion_mnist.py \
      --workdir /tmp/fmnist --config.seeds=0,1
  python -m launch.main --workdir /tmp/adamix_digits --stages report

Each stage reads the previous stage's output from the workdir; finished work
is skipped, so re-running the same command resumes an interrupted run.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys

from absl import app
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


def main(argv):
  del argv
  logging.getLogger("absl").setLevel(logging.WARNING)
  from adamix_jax.train import report, stages  # after flags: faster --help
  command = "python -m launch.main " + " ".join(
      shlex.quote(a) for a in sys.argv[1:])
  records = stages.run(flags.FLAGS.config, _WORKDIR.value, _STAGES.value,
                       command=command)
  if records is not None:
    print(report.markdown_table(records, flags.FLAGS.config.epsilons))
    print(f"\nWrote {os.path.join(_WORKDIR.value, 'results.json')} and "
          f"results.md")


if __name__ == "__main__":
  app.run(main)
