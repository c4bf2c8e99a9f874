"""Sweep points, their workdirs, and how they run (the flag-free part of
``adamix_jax.launch.sweep``, importable from tests and from worker processes).

A point is one (dataset config, public_per_class, seed, epsilon) with the
private methods the sweep asks for (e.g. ``dp_sgd``, ``adamix``), or, with
epsilon None, the references of that (config, k, seed): ``paragon`` and
``public_only``, which do not depend on epsilon and so run once, not once
per epsilon. Each point is a plain ``experiment.stages.run`` in its own workdir

  ROOT/points/LABEL/kK/seed_S/eps_E        (private methods at epsilon E)
  ROOT/points/LABEL/kK/seed_S/references   (paragon, public_only)

and is finished when its ``results.json`` exists: a re-run skips it (and
inside a point the stages skip their finished units), so an interrupted
sweep resumes where it stopped. The points of one (config, k, seed) form a
group that runs in one process, one point after the other (the group shares
jit compilations and the backbone's feature cache); groups run in parallel
with ``processes > 1``.
"""

from __future__ import annotations

import ast
import concurrent.futures
import dataclasses
import multiprocessing
import os
import time
import traceback
from typing import Any, Iterable, Optional, Sequence

import ml_collections

from adamix_jax.experiment import recipe as recipe_lib

ALL_METHODS = recipe_lib.METHODS
PRIVATE_METHODS = recipe_lib.DP_METHODS
REFERENCE_METHODS = tuple(m for m in ALL_METHODS if m not in PRIVATE_METHODS)


@dataclasses.dataclass(frozen=True)
class Point:
  """One unit of a sweep: a stages.run in its own workdir."""

  config_path: str
  label: str
  public_per_class: int
  seed: int
  epsilon: Optional[float]  # None: the references
  methods: tuple[str, ...]
  overrides: tuple[tuple[str, str], ...]
  workdir: str

  @property
  def group(self) -> tuple[str, int, int]:
    return (self.label, self.public_per_class, self.seed)

  @property
  def finished(self) -> bool:
    return os.path.exists(os.path.join(self.workdir, "results.json"))

  def describe(self) -> str:
    eps = "references" if self.epsilon is None else f"eps={self.epsilon:g}"
    return (f"{self.label} k={self.public_per_class} seed={self.seed} {eps} "
            f"[{','.join(self.methods)}]")


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """``get_config()`` of a config (as ``--config`` would load it): a file,
  or a packaged name, optionally with ``:arg``."""
  from adamix_jax import configs  # pylint: disable=g-import-not-at-top
  return configs.load(path)


def parse_override(text: str) -> tuple[str, str]:
  if "=" not in text:
    raise ValueError(f"--set expects key=value, got {text!r}.")
  key, value = text.split("=", 1)
  return key.strip(), value.strip()


def _literal(value: str) -> Any:
  try:
    return ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return value  # a bare string


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Iterable[tuple[str, str]]) -> None:
  """``train.epochs=2`` style overrides (values parsed as Python literals)."""
  with config.unlocked():
    for key, raw in overrides:
      parts = key.split(".")
      parent = config
      for part in parts[:-1]:
        if part not in parent:
          raise KeyError(f"--set {key}: no field {part!r} in the config.")
        parent = parent[part]
      if parts[-1] not in parent:
        raise KeyError(f"--set {key}: no field {parts[-1]!r} in the config.")
      value = _literal(raw)
      if isinstance(parent[parts[-1]], tuple):
        if isinstance(value, list):
          value = tuple(value)
        elif isinstance(value, str):  # methods=dp_sgd,adamix
          value = tuple(v.strip() for v in value.split(",") if v.strip())
        elif not isinstance(value, tuple):  # seeds=0
          value = (value,)
      parent[parts[-1]] = value


def config_label(path: str, config: ml_collections.ConfigDict) -> str:
  """``dataset_label``, a generic dataset's own name, or the file's name."""
  from adamix_jax import configs  # pylint: disable=g-import-not-at-top
  if config.get("dataset_label"):
    return config.dataset_label
  if config.dataset in configs.GENERIC_DATASET_CONFIGS:
    return configs.label(config)
  return os.path.splitext(os.path.basename(path.partition(":")[0]))[0]


def build_points(root: str,
                 config_paths: Sequence[str],
                 methods: Optional[Sequence[str]] = None,
                 epsilons: Optional[Sequence[float]] = None,
                 seeds: Optional[Sequence[int]] = None,
                 public_per_class: Optional[Sequence[int]] = None,
                 overrides: Sequence[tuple[str, str]] = ()) -> list[Point]:
  """The grid: configs x k x seeds x (references + epsilons).

  ``methods``, ``epsilons``, ``seeds``, ``public_per_class``: None takes
  each config's own values (after the overrides).
  """
  unknown = [m for m in methods or () if m not in ALL_METHODS]
  if unknown:
    raise ValueError(f"Unknown method(s) {unknown}; known: "
                     f"{list(ALL_METHODS)}.")
  points, labels = [], {}
  for path in config_paths:
    file_path, sep, arg = path.partition(":")
    if os.path.isfile(file_path):
      path = os.path.abspath(file_path) + sep + arg
    config = load_config_file(path)
    apply_overrides(config, overrides)
    wanted = config.methods if methods is None else methods
    references = tuple(m for m in ALL_METHODS
                       if m in wanted and m in REFERENCE_METHODS)
    private = tuple(m for m in ALL_METHODS
                    if m in wanted and m in PRIVATE_METHODS)
    label = config_label(path, config)
    if labels.setdefault(label, path) != path:
      raise ValueError(f"Two configs have the label {label!r} ({path}, "
                       f"{labels[label]}); set config.dataset_label.")
    ks = public_per_class if public_per_class is not None else [
        config.public_per_class]
    for k in ks:
      for seed in (seeds if seeds is not None else config.seeds):
        base = os.path.join(root, "points", label, f"k{k}", f"seed_{seed}")
        common = dict(config_path=path, label=label, public_per_class=int(k),
                      seed=int(seed), overrides=tuple(overrides))
        if references:
          points.append(Point(epsilon=None, methods=references,
                              workdir=os.path.join(base, "references"),
                              **common))
        if private:
          for eps in (epsilons if epsilons is not None else config.epsilons):
            points.append(Point(epsilon=float(eps), methods=private,
                                workdir=os.path.join(base, f"eps_{eps:g}"),
                                **common))
  return points


def point_config(point: Point) -> ml_collections.ConfigDict:
  config = load_config_file(point.config_path)
  apply_overrides(config, point.overrides)
  with config.unlocked():
    config.dataset_label = point.label
    config.public_per_class = point.public_per_class
    config.seeds = (point.seed,)
    config.epsilons = () if point.epsilon is None else (point.epsilon,)
    config.methods = point.methods
    config.progress = False
  return config


def run_point(point: Point, command: str = "", data_parallel: bool = False
              ) -> dict:
  """Runs one point (skipped if finished); returns a status dict."""
  if point.finished:
    return {"point": point.describe(), "status": "skipped", "seconds": 0.0}
  from adamix_jax.experiment import stages  # pylint: disable=g-import-not-at-top
  mesh = None
  if data_parallel:
    import jax  # pylint: disable=g-import-not-at-top
    from adamix_jax import parallel  # pylint: disable=g-import-not-at-top
    mesh = parallel.make_data_mesh(devices=jax.local_devices())
  start = time.time()
  stages.run(point_config(point), point.workdir,
             command=f"{command} # point: {point.describe()}", mesh=mesh,
             plot=False)
  return {"point": point.describe(), "status": "done",
          "seconds": round(time.time() - start, 1)}


def run_group(points: Sequence[Point], command: str = "",
              data_parallel: bool = False) -> list[dict]:
  """Runs a group's points in order; a failure is reported, not raised.

  A user error (``cli.is_user_error``: bad data, a workdir made by another
  config, ...) is reported by its message; any other failure also by its
  traceback.
  """
  from adamix_jax.launch import cli  # pylint: disable=g-import-not-at-top
  cli.quiet_third_party_logs()  # also in spawned worker processes
  results = []
  for point in points:
    try:
      results.append(run_point(point, command, data_parallel))
    except Exception as error:  # pylint: disable=broad-except
      user_error = cli.is_user_error(error)
      results.append({"point": point.describe(), "status": "failed",
                      "error": (cli.one_line(error) if user_error else
                                f"{type(error).__name__}: {error}"),
                      "user_error": user_error,
                      "traceback": traceback.format_exc()})
  return results


def groups_of(points: Sequence[Point]) -> list[list[Point]]:
  grouped: dict[tuple, list[Point]] = {}
  for p in points:
    grouped.setdefault(p.group, []).append(p)
  return list(grouped.values())


def shard(groups: Sequence[Sequence[Point]], num_shards: int,
          shard_index: int) -> list[Sequence[Point]]:
  if not 0 <= shard_index < num_shards:
    raise ValueError(f"shard_index={shard_index} not in [0, {num_shards}).")
  return [g for i, g in enumerate(groups) if i % num_shards == shard_index]


def run_points(points: Sequence[Point], processes: int = 1, command: str = "",
               data_parallel: bool = False, log=print) -> list[dict]:
  """Runs the unfinished points, group by group; ``processes`` in parallel."""
  todo = [g for g in groups_of(points) if not all(p.finished for p in g)]
  skipped = sum(p.finished for p in points)
  log(f"{len(points)} points: {skipped} finished (skipped), "
      f"{len(points) - skipped} to run in {len(todo)} group(s), "
      f"{processes} process(es).")
  results = []

  def report(group_results):
    for r in group_results:
      results.append(r)
      if r["status"] == "failed":
        log(f"  FAILED {r['point']}: {r['error']}")
      elif r["status"] == "done":
        log(f"  done   {r['point']} ({r['seconds']}s)")

  if processes <= 1:
    for group in todo:
      report(run_group(group, command, data_parallel))
    return results
  # spawn, not fork: a forked JAX runtime is not safe.
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(processes,
                                              mp_context=context) as pool:
    futures = [pool.submit(run_group, group, command, data_parallel)
               for group in todo]
    for future in concurrent.futures.as_completed(futures):
      report(future.result())
  return results


POD_DROPPED_FLAGS = ("processes", "num_shards", "shard_index",
                     "shard_by_jax_process", "dry_run")


def flag_argument(name: str, value: Any) -> str:
  """``--name=value`` as absl parses it back (lists comma separated)."""
  if isinstance(value, bool):
    return f"--{name}" if value else f"--no{name}"
  if isinstance(value, (list, tuple)):
    value = ",".join(str(v) for v in value)
  return f"--{name}={value}"


def pod_command(flag_values: Sequence[tuple[str, Any]]) -> str:
  """The same sweep on a Cloud TPU pod: every host runs a share of groups.

  Args:
    flag_values: (name, parsed value) of every sweep flag the user set (a
      multi flag such as ``--set`` gives one pair per value). Built from
      parsed values, never from the command's text, so ``--seeds 0`` and
      ``--seeds=0`` give the same command. The local parallelism flags
      (``POD_DROPPED_FLAGS``) are replaced by ``--shard_by_jax_process``.
  """
  import shlex  # pylint: disable=g-import-not-at-top
  kept = [flag_argument(name, value) for name, value in flag_values
          if name not in POD_DROPPED_FLAGS]
  inner = " ".join(["adamix-sweep"] + [shlex.quote(a) for a in kept]
                   + ["--shard_by_jax_process"])
  return ("gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all "
          f"--command={shlex.quote('cd ~/adamix-jax && ' + inner)}")
