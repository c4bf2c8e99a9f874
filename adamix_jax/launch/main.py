r"""Runs one AdaMix experiment: features -> public_init -> private -> accounting -> report.

  adamix-train --workdir /tmp/adamix_digits
  adamix-train --config fashion_mnist --workdir /tmp/fmnist --config.seeds=0,1
  adamix-train --config digits_cnn --workdir /tmp/cnn      # a whole CNN
  adamix-train --workdir /tmp/adamix_digits --stages report
  adamix-train --workdir /tmp/adamix_digits --stages analysis  # data owner
  adamix-train --workdir /tmp/adamix_digits --data_parallel

(``python -m adamix_jax.launch.main`` is the same command.) ``--config``
takes a packaged config name (``adamix_jax/configs``) or a config file.
``--data_parallel`` runs the private steps data parallel over all devices;
``--multihost`` first calls ``jax.distributed.initialize()``, for a TPU pod,
where the same command runs on every host (see WORKSPACE.md, "Scale out").

Each stage reads the previous stage's output from the workdir; finished work
is skipped, so re-running the same command resumes an interrupted run.
"""

from __future__ import annotations

import os
import shlex
import sys

from absl import app
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from adamix_jax import configs as configs_lib

config_flags.DEFINE_config_file(
    "config", configs_lib.default_path(),
    "Experiment config: a packaged name (" + ", ".join(configs_lib.names()) +
    ") or a config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.",
                               required=True)
_STAGES = flags.DEFINE_list(
    "stages", "features,public_init,private,accounting,report",
    "Stages to run, in order; 'analysis' (individual privacy vs isolation, "
    "for the data owner) runs only when named.")
_DATA_PARALLEL = flags.DEFINE_bool(
    "data_parallel", False,
    "Run the private steps data parallel over a mesh of all devices.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False,
    "Call jax.distributed.initialize() first (multi-host TPU pods); implies "
    "--data_parallel.")


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)  # e.g. orbax's INFO lines
  from adamix_jax import parallel  # after flags: faster --help
  from adamix_jax.experiment import report, stages
  mesh = parallel.launch_mesh(_DATA_PARALLEL.value, _MULTIHOST.value)
  command = "adamix-train " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  records = stages.run(flags.FLAGS.config, _WORKDIR.value, _STAGES.value,
                       command=command, mesh=mesh)
  if records is not None:
    print(report.markdown_table(records, flags.FLAGS.config.epsilons))
    print(f"\nWrote {os.path.join(_WORKDIR.value, 'results.json')} and "
          f"results.md")


def resolve_config_names(argv: list[str]) -> list[str]:
  """``--config NAME`` (packaged) -> ``--config PATH``, before absl parses."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith("--config=") and not arg.startswith("--config.="):
      out[i] = "--config=" + configs_lib.resolve(arg[len("--config="):])
    elif arg == "--config" and i + 1 < len(out):
      out[i + 1] = configs_lib.resolve(out[i + 1])
  return out


def run() -> None:
  """Console entry point ``adamix-train``."""
  sys.argv = resolve_config_names(sys.argv)
  app.run(main)


if __name__ == "__main__":
  run()
