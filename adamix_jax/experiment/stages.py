"""The stages of one experiment, each reading the previous one's output.

  features     source -> (backbone) -> WORKDIR/features/features.npz + splits
  public_init  per seed: the public start w_0 (recipe.public_init)
  private      per (method, epsilon, seed): paragon, dp_sgd, adamix
  accounting   every ledger -> epsilon spent (PLD, RDP cross-check)
  report       test errors -> WORKDIR/results.json and results.md
  analysis     who pays for privacy (not run by default): individual
               epsilons vs isolation -> WORKDIR/analysis/ (``analysis.stage``)

What each method trains is the recipe's business (``recipe``: a linear head
or a whole Flax model); this module walks the units of work and their files.
Every unit writes its output atomically and is skipped when that output
already exists, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Iterable, Optional

import ml_collections
import numpy as np

from adamix_jax import configs as configs_lib
from adamix_jax import data as data_lib
from adamix_jax import io
from adamix_jax.data import fingerprint as fingerprint_lib
from adamix_jax.adamix import noise_aware
from adamix_jax.experiment import recipe as recipe_lib
from adamix_jax.experiment import report as report_lib
from adamix_jax.experiment import workdir as workdir_lib
from adamix_jax.features import subset as subset_lib
from adamix_jax.privacy import accounting
from adamix_jax.train import fit as fit_lib

STAGES = ("features", "public_init", "private", "accounting", "report",
          "analysis")
# What a run does unless told otherwise: the analysis is asked for by name.
DEFAULT_STAGES = STAGES[:-1]
# Next to a run's ledger when it recorded individual privacy counts.
INDIVIDUAL_COUNTS = "individual_counts.npz"
PLOT_FILE = "privacy_utility.png"
STAGE_TITLES = {
    "features": "data -> backbone -> features/",
    "public_init": "public model w_0 per seed (public examples only)",
    "private": "paragon and the private runs",
    "accounting": "epsilon spent by each private run",
    "report": "results.json, results.md, privacy_utility.png",
    "analysis": "individual privacy against isolation -> analysis/",
}
METHODS = recipe_lib.METHODS
DP_METHODS = recipe_lib.DP_METHODS
Workdir = workdir_lib.Workdir


def _say(config, text: str, end: str = "\n") -> None:
  """A progress line on stdout (``config.progress``)."""
  if config.progress:
    print(text, end=end, flush=True)


# --- stage: features -------------------------------------------------------


def _feature_cache_dir(config) -> str:
  if config.feature_cache_dir:
    return config.feature_cache_dir
  base = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
  return os.path.join(base, "adamix_jax", "features")


class DataChangedError(ValueError):
  """The workdir's outputs were computed from other data than the source's
  current content."""


def _check_source_unchanged(config, workdir: Workdir, fingerprint: str) -> None:
  path = workdir.path("features", "source.json")
  if not os.path.exists(path):
    return  # made before sources were fingerprinted: nothing to compare
  recorded = workdir_lib.load_json_output(path, "features")
  if recorded.get("fingerprint") != fingerprint:
    raise DataChangedError(
        f"The data of dataset {config.dataset!r} changed since {workdir.root} "
        f"was made (fingerprint {recorded.get('fingerprint')} -> "
        f"{fingerprint}): its features, splits and results belong to the old "
        "data. Use a new --workdir for the new data, or restore the old data; "
        "nothing in the workdir was changed.")


def embedded_train_rows(config, train_labels: np.ndarray, num_classes: int):
  """({seed: its few-shot split of the training set}, the sorted training
  rows some seed uses). Only those rows are embedded, and the workdir's
  splits index into them (``public_{seed}`` = positions in the second)."""
  private_cap = None if config.private_per_class < 0 else config.private_per_class
  per_seed = {seed: data_lib.few_shot_split(
      train_labels, num_classes, config.public_per_class, private_cap,
      seed=seed, allow_no_public=True) for seed in config.seeds}
  used = np.unique(np.concatenate(
      [np.concatenate([s.public, s.private]) for s in per_seed.values()]))
  return per_seed, used


def run_features(config, workdir: Workdir) -> None:
  source = data_lib.get_source(config.dataset, **config.dataset_kwargs.to_dict())
  fingerprint = fingerprint_lib.source_fingerprint(source)
  if os.path.exists(workdir.features) and os.path.exists(workdir.splits):
    _check_source_unchanged(config, workdir, fingerprint)
    return
  num_classes = len(source.class_names)
  train_labels = data_lib.check_labels(source.split("train").labels,
                                       num_classes, f"{config.dataset} train")
  per_seed, used = embedded_train_rows(config, train_labels, num_classes)
  test_split = source.split("test")
  test_indices = np.arange(len(test_split))
  if config.max_test_examples > 0 and len(test_indices) > config.max_test_examples:
    rng = np.random.default_rng(0)  # fixed: every run sees the same test set
    test_indices = np.sort(rng.choice(test_indices, config.max_test_examples,
                                      replace=False))
  # One view per split, each named after the indices it keeps: the feature
  # cache keys on (source name, split, labels), and two subsets with the same
  # size and label sequence (e.g. of a class-sorted folder) must not share an
  # entry; a full split keeps the plain name, so every run that embeds the
  # whole test set shares one entry whatever its seeds.
  train_source = subset_lib.SubsetSource(
      source, {"train": used}, subset_lib.subset_suffix(used,
                                                        len(train_labels)))
  test_source = subset_lib.SubsetSource(
      source, {"test": test_indices},
      subset_lib.subset_suffix(test_indices, len(test_split)))
  if config.backbone == "identity" and source.kind == "feature":
    x_train = np.asarray(train_source.split("train").as_array(), np.float32)
    x_test = np.asarray(test_source.split("test").as_array(), np.float32)
    y_train = train_source.split("train").labels
    y_test = test_source.split("test").labels
  else:
    from adamix_jax import features as features_lib  # heavy: lazy
    from adamix_jax.models import registry
    backbone = registry.get_backbone(config.backbone,
                                     **config.backbone_kwargs.to_dict())
    cache_dir = _feature_cache_dir(config)
    x_train = features_lib.extract_features(
        train_source, "train", backbone, cache_dir,
        batch_size=config.feature_batch_size, progress=config.progress,
        data_fingerprint=fingerprint)
    x_test = features_lib.extract_features(
        test_source, "test", backbone, cache_dir,
        batch_size=config.feature_batch_size, progress=config.progress,
        data_fingerprint=fingerprint)
    y_train = train_source.split("train").labels
    y_test = test_source.split("test").labels
  x_train = x_train.reshape(len(x_train), -1)
  x_test = x_test.reshape(len(x_test), -1)
  data_lib.check_finite(x_train, f"{config.dataset} train features")
  data_lib.check_finite(x_test, f"{config.dataset} test features")
  y_test = data_lib.check_labels(y_test, num_classes, f"{config.dataset} test")
  position = {int(i): p for p, i in enumerate(used)}
  split_arrays = {}
  for seed, split in per_seed.items():
    split_arrays[f"public_{seed}"] = np.array(
        [position[int(i)] for i in split.public], np.int64)
    split_arrays[f"private_{seed}"] = np.array(
        [position[int(i)] for i in split.private], np.int64)
  io.save_json(workdir.path("features", "source.json"),
               {"dataset": config.dataset, "fingerprint": fingerprint,
                "train_examples": len(train_labels),
                "test_examples": len(test_split)})
  io.save_npz(workdir.splits, **split_arrays)
  io.save_npz(workdir.features, x_train=x_train, y_train=np.asarray(y_train),
              x_test=x_test, y_test=np.asarray(y_test),
              class_names=np.array(source.class_names))


def load_features(workdir: Workdir) -> dict[str, np.ndarray]:
  features = workdir_lib.load_npz_output(workdir.features, "features")
  missing = [key for key in ("x_train", "y_train", "x_test", "y_test",
                             "class_names") if key not in features]
  if missing:
    raise ValueError(
        f"{workdir.features} lacks key(s) {missing}. Delete it and rerun the "
        "'features' stage (--stages=features,...) to rebuild it.")
  return features


# --- stage: public_init ----------------------------------------------------


def run_public_init(config, workdir: Workdir) -> None:
  recipe = recipe_lib.make_recipe(config)
  features = splits = None
  for seed in config.seeds:
    path = workdir.public_init(seed)
    if os.path.exists(path):
      continue
    if features is None:
      features = load_features(workdir)
      splits = workdir_lib.load_npz_output(workdir.splits, "features")
    public_idx = splits[f"public_{seed}"]
    arrays, info = recipe.public_init(
        features["x_train"][public_idx], features["y_train"][public_idx],
        [str(c) for c in features["class_names"]], seed,
        features["x_train"].shape[1])
    io.save_npz(path, **arrays)
    io.save_json(path.replace(".npz", ".json"), info)
    start = ("zero-shot head (no public example)"
             if info.get("init") == "zero_shot" else
             f"public model from {len(public_idx)} public examples")
    _say(config, f"  seed {seed}: {start}")


def load_seed(config, workdir: Workdir, seed: int,
              features: Optional[dict] = None) -> recipe_lib.SeedData:
  """One seed's model-ready data and public start (for the recipe)."""
  features = features if features is not None else load_features(workdir)
  splits = workdir_lib.load_npz_output(workdir.splits, "features")
  saved = workdir_lib.load_npz_output(workdir.public_init(seed),
                                      "public_init")
  return recipe_lib.make_recipe(config).seed_data(
      features, splits[f"public_{seed}"], splits[f"private_{seed}"], saved)


# --- stage: private --------------------------------------------------------


def _private_jobs(config) -> list[tuple[str, Optional[float], int]]:
  jobs = []
  for seed in config.seeds:
    for method in ("paragon", "zero_noise"):  # non-private, trained
      if method in config.methods:
        jobs.append((method, None, seed))
    for method in DP_METHODS:
      if method in config.methods:
        jobs.extend((method, float(eps), seed) for eps in config.epsilons)
  return jobs


def trained_runs(config, workdir: Workdir, recipe, seed: int,
                 data: recipe_lib.SeedData):
  """(method, epsilon, run dir, params) of every trained run of ``seed``
  (the paragon, the zero-noise diagnostic and the DP runs), from the
  'private' stage's outputs."""
  for method, epsilon, job_seed in _private_jobs(config):
    if job_seed != seed:
      continue
    out = workdir.run_dir(method, seed, epsilon)
    yield method, epsilon, out, recipe.params_from_arrays(
        workdir_lib.load_npz_output(os.path.join(out, "params.npz"),
                                    "private"), data)


def run_private(config, workdir: Workdir, mesh=None) -> None:
  jobs = [j for j in _private_jobs(config)
          if not os.path.exists(os.path.join(
              workdir.run_dir(j[0], j[2], j[1]), "params.npz"))]
  if not jobs:
    return
  recipe = recipe_lib.make_recipe(config)
  features = load_features(workdir)
  # sigma_1 depends on (epsilon, delta) only; every run's own sigma is
  # calibrated from it with its planned T (cached for the seeds): one line
  # per epsilon here, as the PLD accountant takes seconds.
  for epsilon in sorted({e for m, e, _ in jobs if m in DP_METHODS}):
    start = time.time()
    _say(config, f"  calibrating the noise for eps={epsilon:g}, "
         f"delta={config.delta:g} (PLD) ...", end="")
    if config.train.get("schedule", "fixed") == "fixed":
      sigma = recipe_lib.noise_multiplier(config, epsilon)
    else:
      sigma = noise_aware.single_release_sigma(epsilon, config.delta)
    _say(config, f" sigma_1={sigma:.3f}, {time.time() - start:.1f}s")
  seeds: dict[int, recipe_lib.SeedData] = {}
  for method, epsilon, seed in jobs:
    if seed not in seeds:
      seeds[seed] = load_seed(config, workdir, seed, features)
    data = seeds[seed]
    out = workdir.run_dir(method, seed, epsilon)
    start = time.time()
    if method == "paragon":
      _say(config, f"  paragon seed={seed}: non-private, on all "
           f"{len(data.public_y) + len(data.private_y)} training examples "
           "...", end="")
      params, meta = recipe.paragon(data, seed)
      meta = {"method": method, "seed": seed, **meta}
      _say(config, f" {time.time() - start:.1f}s")
    elif method == "zero_noise":
      params, meta = recipe.zero_noise(data, seed)
      meta = {"method": method, "seed": seed, **meta}
      _say(config, f"  zero_noise seed={seed}: AdaMix's optimiser without "
           f"noise (a diagnostic, not private), {meta['steps']} steps, "
           f"{time.time() - start:.1f}s")
    else:
      checkpoints = os.path.join(out, "checkpoints")
      progress = None
      if config.progress:
        progress = fit_lib.BarProgress(
            description=f"{method} eps={epsilon:g} seed={seed}")
      run = recipe.train_dp(method, epsilon, seed, data, mesh=mesh,
                            checkpoint_dir=checkpoints, progress=progress)
      params, meta = run.params, run.meta
      resumed = ("" if meta["resumed_from_step"] is None else
                 f", resumed at step {meta['resumed_from_step']}")
      _say(config, f"  {method} eps={epsilon:g} seed={seed}: {meta['steps']} "
           f"steps at q={meta['sampling_rate']:g}, sigma="
           f"{meta['noise_multiplier']:.3f}{resumed}, "
           f"{time.time() - start:.1f}s")
      run.ledger.save(os.path.join(out, "ledger.json"))
      if run.individual is not None:
        # Derived from the private data: for the 'analysis' stage (the data
        # owner), not a release.
        io.save_npz(os.path.join(out, INDIVIDUAL_COUNTS),
                    **run.individual.to_arrays())
    meta["seconds"] = round(time.time() - start, 3)
    io.save_json(os.path.join(out, "meta.json"), meta)
    # params.npz last: its presence marks the run as done.
    io.save_npz(os.path.join(out, "params.npz"),
                **recipe.params_to_arrays(params))
    if method in DP_METHODS:
      # Done: the outputs above (params, ledger, meta) are the record now;
      # the checkpoints (which hold the secret coins) go.
      shutil.rmtree(checkpoints, ignore_errors=True)


# --- stage: accounting -----------------------------------------------------


def run_accounting(config, workdir: Workdir) -> None:
  entries = []
  for method, epsilon, seed in _private_jobs(config):
    if method not in DP_METHODS:
      continue
    path = os.path.join(workdir.run_dir(method, seed, epsilon), "ledger.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} is missing: run the 'private' stage.")
    ledger = accounting.PrivacyLedger.load(path)
    meta = workdir_lib.load_json_output(
        os.path.join(workdir.run_dir(method, seed, epsilon), "meta.json"),
        "the 'private' stage")
    if ledger.total_steps != meta["steps"]:
      raise accounting.BudgetExceededError(
          f"{path} records {ledger.total_steps} steps but the run took "
          f"{meta['steps']}: the ledger does not cover the released model. "
          "Do not report this run; rerun it in a new workdir.")
    spent_pld = ledger.epsilon("pld")
    spent_rdp = ledger.epsilon("rdp")
    entry = {"method": method, "epsilon": epsilon, "seed": seed,
             "delta": ledger.delta, "steps": ledger.total_steps,
             "epsilon_spent": spent_pld, "epsilon_spent_rdp": spent_rdp,
             "within_budget": spent_pld <= epsilon}
    if spent_pld > epsilon:
      raise accounting.BudgetExceededError(
          f"{path}: spent epsilon {spent_pld:.4f} > target {epsilon}.")
    entries.append(entry)
    _say(config, f"  {method} eps={epsilon:g} seed={seed}: epsilon spent "
         f"{spent_pld:.3f} (PLD; RDP {spent_rdp:.3f}) of {epsilon:g}, "
         f"delta={ledger.delta:g}")
  io.save_json(workdir.path("accounting.json"), entries)


# --- stage: report ---------------------------------------------------------


def run_report(config, workdir: Workdir, command: str = "",
               plot: bool = True) -> list[dict]:
  """Test errors -> results.json, results.md (and privacy_utility.png)."""
  recipe = recipe_lib.make_recipe(config)
  features = load_features(workdir)
  accounting_path = workdir.path("accounting.json")
  spent = {}
  if os.path.exists(accounting_path):
    for e in workdir_lib.load_json_output(accounting_path, "accounting"):
      spent[(e["method"], e["epsilon"], e["seed"])] = e
  records = []
  for seed in config.seeds:
    data = load_seed(config, workdir, seed, features)

    def record(method, epsilon, params, meta=None):
      meta = meta or {}
      entry = spent.get((method, epsilon, seed), {})
      if method in DP_METHODS and not entry:
        raise FileNotFoundError(
            f"No accounting for {method} eps={epsilon} seed={seed}: run the "
            "'accounting' stage before 'report'.")
      records.append({
          "dataset": configs_lib.label(config),
          "method": method,
          "epsilon": epsilon, "delta": config.delta if epsilon else None,
          "seed": seed, "public_per_class": config.public_per_class,
          "test_error": recipe.test_error(params, data),
          "epsilon_spent": entry.get("epsilon_spent"),
          "epsilon_spent_rdp": entry.get("epsilon_spent_rdp"),
          "noise_multiplier": meta.get("noise_multiplier"),
          "steps": meta.get("steps"),
          "sampling_rate": meta.get("sampling_rate"),
          "private_examples": int(len(data.private_y)),
          "public_examples": int(len(data.public_y)),
          "insecure_reproducible_noise": (
              recipe_lib.insecure_noise(config) if method in DP_METHODS
              else None)})

    if "public_only" in config.methods:
      record("public_only", None, data.public_params)
    for method, epsilon, out, params in trained_runs(config, workdir, recipe,
                                                     seed, data):
      record(method, epsilon, params, workdir_lib.load_json_output(
          os.path.join(out, "meta.json"), "the 'private' stage"))
  io.save_json(workdir.path("results.json"), records)
  io.save_text(workdir.path("results.md"), report_lib.results_markdown(
      config, records, command, configs_lib.label(config)))
  if plot:
    from adamix_jax.experiment import aggregate  # matplotlib: lazy
    aggregate.plot(records, workdir.path(PLOT_FILE))
  return records


# --- stage: analysis ------------------------------------------------------


def run_analysis(config, workdir: Workdir) -> None:
  """Individual epsilons vs isolation, per method, epsilon and seed."""
  from adamix_jax.analysis import stage as analysis_stage  # matplotlib: lazy
  analysis_stage.run_analysis(config, workdir)


# --- all stages --------------------------------------------------------------


def run(config: ml_collections.ConfigDict, workdir: str,
        stages: Iterable[str] = DEFAULT_STAGES, command: str = "",
        mesh=None, plot: bool = True) -> list[dict] | None:
  """Runs ``stages`` in order, each skipping the work it finds done.

  Args:
    config: the experiment (``adamix_jax/configs``).
    workdir: where every stage writes (``workdir.Workdir``); held with a
      lock for the whole run (one process per workdir).
    stages: which of ``STAGES`` to run (default: all but "analysis").
    command: the command line, recorded in results.md.
    mesh: data-parallel private steps on this mesh (None: one device).
    plot: the report stage also draws ``WORKDIR/privacy_utility.png``.

  Returns:
    The records of results.json when the report stage ran, else None.
  """
  stages = list(stages)
  unknown = [s for s in stages if s not in STAGES]
  if unknown:
    raise ValueError(f"Unknown stage(s) {unknown}; stages are {list(STAGES)}.")
  recipe_lib.validate_config(config)
  wd = Workdir(workdir)
  runners = {"features": run_features, "public_init": run_public_init,
             "private": lambda c, w: run_private(c, w, mesh=mesh),
             "accounting": run_accounting, "analysis": run_analysis}
  records = None
  chosen = [stage for stage in STAGES if stage in stages]
  with workdir_lib.exclusive(workdir):
    workdir_lib.check_or_save_config(config, wd)
    for number, stage in enumerate(chosen, 1):
      start = time.time()
      _say(config, f"[{number}/{len(chosen)}] {stage}: {STAGE_TITLES[stage]}")
      if stage == "report":
        records = run_report(config, wd, command, plot=plot)
      else:
        runners[stage](config, wd)
      _say(config, f"[{number}/{len(chosen)}] {stage}: done in "
           f"{time.time() - start:.1f}s")
  return records
