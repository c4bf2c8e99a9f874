r"""Runs one AdaMix experiment: features -> public_init -> private -> accounting -> report.

  adamix-train --workdir /tmp/adamix_digits
  adamix-train --config fashion_mnist --workdir /tmp/fmnist --config.seeds=0,1
  adamix-train --config digits_cnn --workdir /tmp/cnn      # a whole CNN
  adamix-train --config.dataset=image_folder \
      --config.dataset_kwargs.data_dir=DIR --workdir /tmp/mine  # your images
  adamix-train --config.dataset=npz --config.dataset_kwargs.path=F.npz \
      --workdir /tmp/mine_npz                                   # your features
  adamix-train --workdir /tmp/adamix_digits --stages report
  adamix-train --workdir /tmp/adamix_digits --stages analysis  # data owner
  adamix-train --workdir /tmp/adamix_digits --data_parallel
  adamix-train --config fashion_mnist --config_help   # every --config.* field

(``python -m adamix_jax.launch.main`` is the same command.) ``--config``
takes a packaged config name (``adamix_jax/configs``) or a config file; with
no ``--config``, ``--config.dataset=image_folder`` or ``=npz`` starts from
that generic dataset's packaged config, anything else from ``digits``.
Override any field with ``--config.FIELD=VALUE``; lists are comma separated
(``--config.seeds=0,1``, ``--config.methods=dp_sgd,adamix``).
``--data_parallel`` runs the private steps data parallel over all devices;
``--multihost`` first calls ``jax.distributed.initialize()``, for a TPU pod,
where the same command runs on every host (see WORKSPACE.md, "Scale out").

Each stage reads the previous stage's output from the workdir; finished work
is skipped, so re-running the same command resumes an interrupted run. A
problem with the input (an unknown config field, a workdir made by another
config, a missing data folder, ...) stops the run with one line on stderr
and exit code 2, keeping every finished unit; ``ADAMIX_TRACEBACK=1`` shows
its traceback.
"""

from __future__ import annotations

import os
import sys

from absl import flags

from adamix_jax import configs as configs_lib
from adamix_jax.launch import cli

PROG = "adamix-train"

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output directory (required, except with --config_help).")
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
_CONFIG_HELP = flags.DEFINE_bool(
    "config_help", False,
    "Print every field of the config (--config.FIELD=VALUE overrides it), "
    "its value and what it means, and exit.")

CONFIG_HELP = ("Experiment config: a packaged name (" +
               ", ".join(configs_lib.names()) + ") or a config file. Override "
               "any field with --config.FIELD=VALUE (lists comma separated); "
               "--config_help lists the fields.")


def main(argv):
  del argv  # stray arguments were refused by the flags parser
  config = flags.FLAGS.config
  configs_lib.split_comma_lists(config)
  if _CONFIG_HELP.value:
    print(configs_lib.reference(config, cli.config_value(sys.argv)))
    return
  if not _WORKDIR.value:
    raise cli.UserError("--workdir is required: the folder for this run's "
                        "outputs (a rerun with the same one resumes).")
  cli.quiet_third_party_logs()
  from adamix_jax import parallel  # after flags: faster --help
  from adamix_jax.experiment import report, stages
  mesh = parallel.launch_mesh(_DATA_PARALLEL.value, _MULTIHOST.value)
  command = cli.typed_command(PROG)
  records = stages.run(config, _WORKDIR.value, _STAGES.value, command=command,
                       mesh=mesh)
  if records is not None:
    print("\n" + report.markdown_table(records, config.epsilons))
    if any(r.get("epsilon") is not None for r in records):
      print("\nEpsilon spent by each private run:\n")
      print(report.privacy_table(records))
    outputs = ", ".join(os.path.join(_WORKDIR.value, name) for name in (
        "results.json", "results.md", stages.PLOT_FILE))
    print(f"\nWrote {outputs}")


def run() -> None:
  """Console entry point ``adamix-train``."""
  cli.run_with_config(PROG, main, CONFIG_HELP)


if __name__ == "__main__":
  run()
