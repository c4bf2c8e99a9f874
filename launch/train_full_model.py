r"""Full-model DP fine-tuning of a Flax model (default: a small CNN on digits).

  python -m launch.train_full_model --workdir /tmp/adamix_digits_cnn
  python -m launch.train_full_model --workdir /tmp/cnn_quick \
      --config.train.epochs=5 --config.seeds=0, --config.epsilons=3,
  python -m launch.train_full_model --workdir /tmp/cnn --data_parallel

Writes WORKDIR/results.{json,md} (same record format as ``launch.main``, so
``python -m experiments.aggregate`` collects both); re-running resumes.
"""

from __future__ import annotations

import os
import shlex
import sys

from absl import app
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "experiments", "configs", "digits_cnn.py")

config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG,
                                "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.",
                               required=True)
_DATA_PARALLEL = flags.DEFINE_bool("data_parallel", False,
                                   "Data parallel over all devices.")
_MULTIHOST = flags.DEFINE_bool("multihost", False,
                               "jax.distributed.initialize() first.")


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)  # e.g. orbax's INFO lines
  from adamix_jax import parallel  # after flags: faster --help
  from adamix_jax.train import full_model_experiment, report
  mesh = parallel.launch_mesh(_DATA_PARALLEL.value, _MULTIHOST.value)
  command = "python -m launch.train_full_model " + " ".join(
      shlex.quote(a) for a in sys.argv[1:])
  records = full_model_experiment.run(flags.FLAGS.config, _WORKDIR.value,
                                      command, mesh)
  print(report.markdown_table(records, flags.FLAGS.config.epsilons))
  print(f"\nWrote {os.path.join(_WORKDIR.value, 'results.json')} and "
        "results.md")


if __name__ == "__main__":
  app.run(main)
