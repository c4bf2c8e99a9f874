r"""Runs a grid of AdaMix experiments, resumably, then aggregates the results.

  adamix-sweep --root /tmp/adamix_sweep --configs digits,fashion_mnist \
      --epsilons 1,3,8 --seeds 0,1,2 --public_per_class 5,10 --processes 2

Axes: dataset configs (names or files) x public_per_class x seed x epsilon; ``--methods``
picks the methods (default: each config's own). A point is one (config, k,
seed, epsilon) running the private methods (dp_sgd, pillar, dp_prototypes,
adamix) at that epsilon, plus
one "references" point per (config, k, seed) running paragon and
public-only, which do not depend on epsilon. Each point is a
``experiment.stages.run`` in its own workdir under ROOT/points (see
``sweep_lib``); a point whose results.json exists is skipped, so
re-running the same command resumes an interrupted sweep (use a new --root
after changing a setting: a point refuses a different config). ``--set
key=value`` (repeatable) overrides a config field for every point, e.g.
``--set train.epochs=10``.

At the end, ``experiment.aggregate`` writes ROOT/summary/{results.md,
results.csv, privacy_utility.png}, and the command for running the same
sweep on a Cloud TPU pod is printed. Every flag takes ``--name=value`` (or
``--name value``) with lists comma separated: ``--seeds=0,1``; a stray
argument (``--seeds 0 1``) is an error. A bad command line, config or
override stops the sweep with one line on stderr and exit code 2.
"""

from __future__ import annotations

import shlex
import sys

from absl import app
from absl import flags

from adamix_jax import configs as configs_lib
from adamix_jax.launch import cli
from adamix_jax.launch import sweep_lib

PROG = "adamix-sweep"

_ROOT = flags.DEFINE_string("root", None, "Sweep output folder.",
                            required=True)
_CONFIGS = flags.DEFINE_list(
    "configs", ["digits"],
    "Dataset configs, one per dataset: packaged names (digits, "
    "fashion_mnist, ...) or config files.")
_METHODS = flags.DEFINE_list(
    "methods", None, "Methods to run (default: each config's own), from "
    f"{', '.join(sweep_lib.ALL_METHODS)}.")
_EPSILONS = flags.DEFINE_list("epsilons", None,
                              "Epsilons (default: each config's own).")
_SEEDS = flags.DEFINE_list("seeds", None, "Seeds (default: each config's own).")
_PUBLIC_PER_CLASS = flags.DEFINE_list(
    "public_per_class", None, "Public examples per class (default: each "
    "config's own).")
_SET = flags.DEFINE_multi_string(
    "set", [], "key=value override applied to every point's config, e.g. "
    "train.epochs=10 (values are Python literals).")
_PROCESSES = flags.DEFINE_integer(
    "processes", 1, "Local worker processes (groups of points in parallel).")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 1,
                                   "Split the groups over this many hosts.")
_SHARD_INDEX = flags.DEFINE_integer("shard_index", 0, "This host's share.")
_SHARD_BY_JAX_PROCESS = flags.DEFINE_bool(
    "shard_by_jax_process", False,
    "Multi-host: call jax.distributed.initialize() and take num_shards / "
    "shard_index from jax.process_count() / jax.process_index().")
_DATA_PARALLEL = flags.DEFINE_bool(
    "data_parallel", False, "Private steps data parallel over this host's "
    "local devices.")
_AGGREGATE = flags.DEFINE_bool("aggregate", True,
                               "Aggregate ROOT into ROOT/summary at the end.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "List the points and exit.")


def _numbers(name: str, values, kind):
  try:
    return [kind(v) for v in values]
  except ValueError:
    raise cli.UserError(f"--{name}={','.join(values)}: expected comma-"
                        f"separated {kind.__name__}s, e.g. --{name}=0,1."
                        ) from None


def set_flags() -> list[tuple[str, object]]:
  """(name, parsed value) of every flag of this module the user set."""
  out = []
  for flag in flags.FLAGS.get_key_flags_for_module(sys.modules[__name__]):
    if not flag.present:
      continue
    if flag.name == "set":
      out.extend(("set", value) for value in flag.value)
    else:
      out.append((flag.name, flag.value))
  return out


def main(argv):
  del argv  # stray arguments were refused by the flags parser
  cli.quiet_third_party_logs()
  command = "adamix-sweep " + " ".join(
      shlex.quote(a) for a in sys.argv[1:])
  points = sweep_lib.build_points(
      _ROOT.value, [configs_lib.resolve(c) for c in _CONFIGS.value],
      _METHODS.value,
      epsilons=None if _EPSILONS.value is None else _numbers(
          "epsilons", _EPSILONS.value, float),
      seeds=None if _SEEDS.value is None else _numbers(
          "seeds", _SEEDS.value, int),
      public_per_class=None if _PUBLIC_PER_CLASS.value is None else _numbers(
          "public_per_class", _PUBLIC_PER_CLASS.value, int),
      overrides=[sweep_lib.parse_override(s) for s in _SET.value])
  num_shards, shard_index, processes = (_NUM_SHARDS.value, _SHARD_INDEX.value,
                                        _PROCESSES.value)
  if _SHARD_BY_JAX_PROCESS.value:
    import jax  # pylint: disable=g-import-not-at-top
    from adamix_jax import parallel  # pylint: disable=g-import-not-at-top
    parallel.initialize_multihost()
    num_shards, shard_index = jax.process_count(), jax.process_index()
    processes = 1  # one JAX runtime per host
  groups = sweep_lib.shard(sweep_lib.groups_of(points), num_shards,
                           shard_index)
  mine = [p for g in groups for p in g]
  if _DRY_RUN.value:
    for p in mine:
      print(("[finished] " if p.finished else "[todo]     ") + p.describe() +
            f"  -> {p.workdir}")
    return
  results = sweep_lib.run_points(mine, processes, command,
                                 _DATA_PARALLEL.value)
  failed = [r for r in results if r["status"] == "failed"]
  for r in failed:
    if r.get("user_error"):
      print(f"{PROG}: error: {r['point']}: {r['error']}", file=sys.stderr)
    else:
      print(f"\n--- {r['point']} failed ---\n{r['traceback']}",
            file=sys.stderr)
  if _AGGREGATE.value and shard_index == 0:
    from adamix_jax.experiment import aggregate  # pylint: disable=g-import-not-at-top
    try:
      paths = aggregate.aggregate(_ROOT.value)
    except FileNotFoundError as error:
      print(f"Nothing to aggregate: {error}")
    else:
      print()
      print(aggregate.summary_table(aggregate.collect(_ROOT.value)))
      print()
      for name, path in paths.items():
        print(f"wrote {name}: {path}")
  print("\nThe same sweep on a Cloud TPU pod (ROOT on a file system every "
        "host sees; each host runs its share of the groups):\n  " +
        sweep_lib.pod_command(set_flags()))
  if failed:
    print(f"{PROG}: error: {len(failed)} point(s) failed (above); re-run the "
          "same command to retry them (finished points are skipped).",
          file=sys.stderr)
    sys.exit(1 if any(not r.get("user_error") for r in failed)
             else cli.EXIT_USER_ERROR)


def run() -> None:
  """Console entry point ``adamix-sweep``."""
  cli.configure_xla()
  app.run(lambda argv: cli.report_errors(PROG, main, argv),
          flags_parser=cli.flags_parser(PROG))


if __name__ == "__main__":
  run()
