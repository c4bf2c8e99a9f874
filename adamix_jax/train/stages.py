"""The stages of one experiment, each reading the previous one's output.

  features     source -> (backbone) -> WORKDIR/features/features.npz + splits
  public_init  per seed: preprocessing fitted on public data, the public
               model w_0 (few-shot, CV'd weight decay) or a zero-shot head
  private      per (method, epsilon, seed): paragon, dp_sgd, adamix
  accounting   every ledger -> epsilon spent (PLD, RDP cross-check)
  report       test errors -> WORKDIR/results.json and results.md

Every unit of work writes its output atomically and is skipped when that
output already exists, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import shutil
import sys
import time
from typing import Any, Iterable, Optional
import zipfile

import ml_collections
import numpy as np
import tqdm

from adamix_jax import data as data_lib
from adamix_jax.adamix import public_init as public_init_lib
from adamix_jax.adamix import step as step_lib
from adamix_jax.features import preprocess as preprocess_lib
from adamix_jax.models import linear
from adamix_jax.privacy import accounting
from adamix_jax.privacy import randomness
from adamix_jax.train import checkpoint as checkpoint_lib
from adamix_jax.train import io
from adamix_jax.train import private_linear
from adamix_jax.train import report as report_lib

STAGES = ("features", "public_init", "private", "accounting", "report")
METHODS = ("paragon", "public_only", "dp_sgd", "adamix")
DP_METHODS = ("dp_sgd", "adamix")

logger = logging.getLogger(__name__)


class ConfigMismatchError(ValueError):
  """The workdir holds outputs made with a different configuration."""


# --- validation ------------------------------------------------------------


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Clear errors for bad settings before any work is done."""
  unknown = [m for m in config.methods if m not in METHODS]
  if unknown:
    raise ValueError(f"Unknown method(s) {unknown}; known methods: "
                     f"{list(METHODS)}.")
  if not config.methods:
    raise ValueError("config.methods is empty; choose from "
                     f"{list(METHODS)}.")
  if config.dataset not in data_lib.KNOWN_SOURCES:
    raise ValueError(f"Unknown config.dataset {config.dataset!r}; known "
                     f"datasets: {', '.join(sorted(data_lib.KNOWN_SOURCES))}.")
  from adamix_jax.models import registry  # pylint: disable=g-import-not-at-top
  if config.backbone not in registry.KNOWN_BACKBONES:
    raise ValueError(f"Unknown config.backbone {config.backbone!r}; known "
                     f"backbones: {', '.join(registry.KNOWN_BACKBONES)}.")
  for eps in config.epsilons:
    if not eps > 0:
      raise ValueError(f"Every epsilon must be > 0, got {eps} in "
                       "config.epsilons; remove it or use a positive budget "
                       "such as 1.0.")
  if not 0.0 < config.delta < 1.0:
    raise ValueError(f"config.delta must be in (0, 1), got {config.delta}; use "
                     "a small value below 1/n_private, such as 1e-5.")
  if config.public_per_class < 0:
    raise ValueError("config.public_per_class must be >= 0 (0 = zero-shot), "
                     f"got {config.public_per_class}.")
  train = config.train
  if not 0.0 < train.sampling_rate <= 1.0:
    raise ValueError(f"config.train.sampling_rate must be in (0, 1], got "
                     f"{train.sampling_rate}.")
  if train.epochs <= 0 or train.learning_rate <= 0 or train.clip_norm <= 0:
    raise ValueError("config.train.epochs, learning_rate and clip_norm must "
                     "be > 0.")
  if config.preprocess not in preprocess_lib.MODES:
    raise ValueError(f"config.preprocess must be one of "
                     f"{preprocess_lib.MODES}, got {config.preprocess!r}.")
  if not config.seeds:
    raise ValueError("config.seeds is empty.")


def num_steps(config) -> int:
  return max(1, int(round(config.train.epochs / config.train.sampling_rate)))


# --- workdir ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Workdir:
  root: str

  def path(self, *parts: str) -> str:
    return os.path.join(self.root, *parts)

  @property
  def features(self) -> str:
    return self.path("features", "features.npz")

  @property
  def splits(self) -> str:
    return self.path("features", "splits.npz")

  def public_init(self, seed: int) -> str:
    return self.path("public_init", f"seed_{seed}.npz")

  def run_dir(self, method: str, seed: int, epsilon: Optional[float]) -> str:
    if epsilon is None:
      return self.path("private", method, f"seed_{seed}")
    return self.path("private", method, f"eps_{epsilon:g}", f"seed_{seed}")


def check_or_save_config(config: ml_collections.ConfigDict,
                         workdir: Workdir) -> None:
  """Refuses to mix outputs of two different configs in one workdir."""
  path = workdir.path("config.json")
  current = config.to_dict()
  current.pop("progress", None)
  if os.path.exists(path):
    saved = io.load_json(path)
    saved.pop("progress", None)
    current_json = io.load_json_string(io.dump_json_string(current))
    if saved != current_json:
      changed = sorted(k for k in set(saved) | set(current_json)
                       if saved.get(k) != current_json.get(k))
      raise ConfigMismatchError(
          f"{workdir.root} holds a run made with a different config (fields "
          f"{changed} differ). Use a new --workdir, or restore the old "
          "config; nothing in the workdir was changed.")
  else:
    io.save_json(path, current)


# --- stage: features -------------------------------------------------------


def _feature_cache_dir(config) -> str:
  if config.feature_cache_dir:
    return config.feature_cache_dir
  base = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
  return os.path.join(base, "adamix_jax", "features")


class _Subset:
  """A view of a split restricted to some indices (only those get embedded)."""

  def __init__(self, split, indices: np.ndarray):
    self._split, self._indices = split, indices
    self.labels = np.asarray(split.labels)[indices]

  def __len__(self):
    return len(self._indices)

  def __getitem__(self, i):
    return self._split[int(self._indices[i])]

  def as_array(self):
    full = self._split.as_array()
    return None if full is None else full[self._indices]


class _SubsetSource:

  def __init__(self, source, subsets: dict[str, np.ndarray], suffix: str):
    self._source, self._subsets = source, subsets
    self.name = f"{source.name}{suffix}"
    self.class_names = source.class_names
    self.kind = source.kind

  def split(self, name):
    split = self._source.split(name)
    return _Subset(split, self._subsets[name]) if name in self._subsets else split


def _subset_suffix(indices: np.ndarray, total: int) -> str:
  """"" for a whole split, else "-subset<N>-<digest of the indices>"."""
  if len(indices) == total:
    return ""
  digest = hashlib.sha256(
      np.ascontiguousarray(np.asarray(indices).astype("<i8")).tobytes())
  return f"-subset{len(indices)}-{digest.hexdigest()[:12]}"


def run_features(config, workdir: Workdir) -> None:
  if os.path.exists(workdir.features) and os.path.exists(workdir.splits):
    return
  source = data_lib.get_source(config.dataset, **config.dataset_kwargs.to_dict())
  num_classes = len(source.class_names)
  train_labels = data_lib.check_labels(source.split("train").labels,
                                       num_classes, f"{config.dataset} train")
  private_cap = None if config.private_per_class < 0 else config.private_per_class
  per_seed = {}
  for seed in config.seeds:
    per_seed[seed] = data_lib.few_shot_split(
        train_labels, num_classes, config.public_per_class, private_cap,
        seed=seed, allow_no_public=True)
  # Only the training examples some seed uses are embedded.
  used = np.unique(np.concatenate(
      [np.concatenate([s.public, s.private]) for s in per_seed.values()]))
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
  train_source = _SubsetSource(source, {"train": used},
                               _subset_suffix(used, len(train_labels)))
  test_source = _SubsetSource(source, {"test": test_indices},
                              _subset_suffix(test_indices, len(test_split)))
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
        batch_size=config.feature_batch_size, progress=config.progress)
    x_test = features_lib.extract_features(
        test_source, "test", backbone, cache_dir,
        batch_size=config.feature_batch_size, progress=config.progress)
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
  io.save_npz(workdir.splits, **split_arrays)
  io.save_npz(workdir.features, x_train=x_train, y_train=np.asarray(y_train),
              x_test=x_test, y_test=np.asarray(y_test),
              class_names=np.array(source.class_names))


def _load_output(path: str, stage: str) -> dict[str, np.ndarray]:
  """Reads one stage's npz output; a damaged file is reported, never removed.

  Stages skip outputs that exist, so rerunning alone would keep a truncated
  file forever: the message says to delete it first.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing: run the {stage!r} stage "
                            f"first (--stages={stage},...).")
  try:
    return io.load_npz(path)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
    raise ValueError(
        f"{path} is unreadable: truncated or corrupt ({type(error).__name__}: "
        f"{error}). It was left in place: delete it and rerun the {stage!r} "
        f"stage (--stages={stage},...) to rebuild it.") from error


def load_features(workdir: Workdir) -> dict[str, np.ndarray]:
  features = _load_output(workdir.features, "features")
  missing = [key for key in ("x_train", "y_train", "x_test", "y_test",
                             "class_names") if key not in features]
  if missing:
    raise ValueError(
        f"{workdir.features} lacks key(s) {missing}. Delete it and rerun the "
        "'features' stage (--stages=features,...) to rebuild it.")
  return features


# --- stage: public_init ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SeedData:
  """One seed's preprocessed public/private/test data and public model."""

  public_x: np.ndarray
  public_y: np.ndarray
  private_x: np.ndarray
  private_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray
  num_classes: int
  public_params: dict
  zero_shot: bool


def _zero_shot_head(config, class_names, dim: int) -> dict:
  from adamix_jax.models import registry, zero_shot  # heavy: lazy
  backbone = registry.get_backbone(config.backbone,
                                   **config.backbone_kwargs.to_dict())
  if not hasattr(backbone, "text_embeddings"):
    raise ValueError(
        "public_per_class=0 (zero-shot) needs a CLIP backbone for the text "
        f"head, but config.backbone={config.backbone!r} has no text tower. "
        "Use backbone='clip_vit_b32' or public_per_class > 0.")
  templates = tuple(config.zero_shot_templates) or zero_shot.CLIP_TEMPLATES
  head = zero_shot.zero_shot_head(backbone, list(class_names), templates)
  if head["kernel"].shape[0] != dim:
    raise ValueError(f"zero-shot head has dim {head['kernel'].shape[0]} but "
                     f"the features have dim {dim}.")
  return head


def run_public_init(config, workdir: Workdir) -> None:
  features = None
  for seed in config.seeds:
    path = workdir.public_init(seed)
    if os.path.exists(path):
      continue
    if features is None:
      features = load_features(workdir)
      splits = _load_output(workdir.splits, "features")
    num_classes = len(features["class_names"])
    public_idx = splits[f"public_{seed}"]
    x_pub_raw = features["x_train"][public_idx]
    y_pub = features["y_train"][public_idx]
    dim = features["x_train"].shape[1]
    prep = preprocess_lib.fit_preprocessor(x_pub_raw, config.preprocess, dim)
    info: dict[str, Any] = {"seed": seed, "public_examples": int(len(y_pub))}
    if len(y_pub) == 0:
      params = _zero_shot_head(config, features["class_names"], dim)
      info["init"] = "zero_shot"
    else:
      params, cv = public_init_lib.train_head(prep(x_pub_raw), y_pub,
                                              num_classes,
                                              folds=config.cv_folds, seed=seed)
      info.update(init="few_shot", weight_decay=cv.weight_decay,
                  cv_folds=cv.folds, cv_errors=cv.cv_errors)
    io.save_npz(path, kernel=np.asarray(params["kernel"]),
                bias=np.asarray(params["bias"]), **prep.to_arrays())
    io.save_json(path.replace(".npz", ".json"), info)


def load_seed(config, workdir: Workdir, seed: int,
              features: Optional[dict] = None) -> SeedData:
  features = features if features is not None else load_features(workdir)
  splits = _load_output(workdir.splits, "features")
  saved = _load_output(workdir.public_init(seed), "public_init")
  prep = preprocess_lib.Preprocessor.from_arrays(saved)
  public_idx, private_idx = splits[f"public_{seed}"], splits[f"private_{seed}"]
  x_train = prep(features["x_train"])
  return SeedData(
      public_x=x_train[public_idx], public_y=features["y_train"][public_idx],
      private_x=x_train[private_idx], private_y=features["y_train"][private_idx],
      test_x=prep(features["x_test"]), test_y=features["y_test"],
      num_classes=len(features["class_names"]),
      public_params={"kernel": saved["kernel"], "bias": saved["bias"]},
      zero_shot=len(public_idx) == 0)


# --- stage: private --------------------------------------------------------


def public_weight(config, seed_data: SeedData) -> float:
  if config.adamix.public_weight_by_set_size:
    n_pub, n_priv = len(seed_data.public_y), len(seed_data.private_y)
    return n_pub / (n_pub + n_priv)
  return float(config.adamix.public_weight)


def step_config(config, method: str, sigma: float,
                seed_data: SeedData) -> step_lib.StepConfig:
  train = config.train
  common = dict(noise_multiplier=sigma,
                expected_batch_size=train.sampling_rate * len(seed_data.private_y),
                learning_rate=train.learning_rate, clip_norm=train.clip_norm,
                normalize_by_threshold=config.adamix.normalize_by_threshold,
                path=train.path)
  if method == "dp_sgd":
    return step_lib.StepConfig(**common)
  return step_lib.StepConfig(
      **common, adaptive_threshold=config.adamix.adaptive_threshold,
      threshold_quantile=config.adamix.threshold_quantile,
      public_weight=public_weight(config, seed_data), pull=config.adamix.pull)


def check_delta(config, num_private: int) -> None:
  if num_private <= 0:
    raise ValueError(
        "No private examples are left after taking the public ones, so there "
        "is nothing to train privately on. Lower config.public_per_class or "
        "use more training data.")
  if config.delta >= 1.0 / num_private and not config.allow_large_delta:
    raise ValueError(
        f"delta={config.delta:g} >= 1/n_private = 1/{num_private}: a mechanism "
        "that publishes one random private example outright satisfies such a "
        "guarantee. Lower config.delta (e.g. below 1/(10 n)), or set "
        "config.allow_large_delta=True if you really mean it.")


@dataclasses.dataclass(frozen=True)
class PrivateRunInputs:
  """What a DP method's private run starts from, besides the private set."""

  anchor: dict  # W_0: the start and the pull target
  public_x: np.ndarray  # the public set the step may use (empty for dp_sgd)
  public_y: np.ndarray
  subspace: private_linear.SubspaceSpec
  fallback_basis: Optional[np.ndarray]  # zero-shot: the text head's columns


def private_run_inputs(config, method: str,
                       seed_data: SeedData) -> PrivateRunInputs:
  """The start, public data and subspace of ``method`` (dp_sgd or adamix)."""
  dim = seed_data.private_x.shape[1]
  zeros = linear.zeros(dim, seed_data.num_classes)
  if method == "dp_sgd":
    # DP-SGD uses no public data at all: zero init, fixed clipping norm.
    return PrivateRunInputs(zeros, seed_data.public_x[:0],
                            seed_data.public_y[:0],
                            private_linear.SubspaceSpec(), None)
  return PrivateRunInputs(
      anchor=seed_data.public_params if config.adamix.public_init else zeros,
      public_x=seed_data.public_x, public_y=seed_data.public_y,
      subspace=private_linear.SubspaceSpec(
          config.adamix.subspace, config.adamix.subspace_rank,
          config.adamix.refresh_every, method=config.adamix.subspace_method),
      fallback_basis=(linear.stack(seed_data.public_params)
                      if seed_data.zero_shot else None))


def train_dp_method(config, method: str, epsilon: float, seed: int,
                    seed_data: SeedData,
                    ledger: Optional[accounting.PrivacyLedger] = None,
                    mesh=None, checkpoint_dir: Optional[str] = None
                    ) -> tuple[dict, accounting.PrivacyLedger, dict]:
  """Trains dp_sgd or adamix for one (epsilon, seed); returns params, ledger.

  With a ``mesh`` (``adamix_jax.parallel.make_data_mesh``) the private step
  runs data parallel over it; the result is the same up to float rounding.
  With a ``checkpoint_dir`` the run checkpoints its state and ledger every
  ``config.train.checkpoint_every`` steps and resumes from the latest
  checkpoint there (``meta["resumed_from_step"]``). The sampler and the
  noise use fresh secret coins (``privacy.randomness``; ``seed`` only picks
  the split and the public start), unless ``config.insecure_reproducible_noise``.
  """
  train = config.train
  steps = num_steps(config)
  check_delta(config, len(seed_data.private_y))
  sigma = accounting.calibrate_noise_multiplier(
      float(epsilon), float(config.delta), float(train.sampling_rate), steps)
  ledger = ledger or accounting.PrivacyLedger(float(config.delta),
                                              float(epsilon))
  cfg = step_config(config, method, sigma, seed_data)
  inputs = private_run_inputs(config, method, seed_data)
  train_head = private_linear.train_private_head
  if mesh is not None:
    from adamix_jax import parallel  # pylint: disable=g-import-not-at-top
    train_head = functools.partial(parallel.train_private_head_sharded,
                                   mesh=mesh)
  with checkpoint_lib.checkpointer_or_none(
      checkpoint_dir, train.checkpoint_every) as checkpointer:
    resumed_from = checkpointer.latest_step() if checkpointer else None
    params = train_head(
        seed_data.private_x, seed_data.private_y, inputs.public_x,
        inputs.public_y, inputs.anchor, cfg, steps=steps,
        sampling_rate=train.sampling_rate, ledger=ledger,
        coins=randomness.run_coins(insecure_noise(config), seed),
        subspace=inputs.subspace, average_tail=train.average_tail,
        lr_schedule=train.lr_schedule, fallback_basis=inputs.fallback_basis,
        checkpointer=checkpointer)
  meta = {"method": method, "epsilon": float(epsilon), "seed": seed,
          "resumed_from_step": resumed_from,
          "noise_multiplier": sigma, "steps": steps,
          "sampling_rate": float(train.sampling_rate),
          "private_examples": int(len(seed_data.private_y)),
          "public_examples": int(len(seed_data.public_y)),
          "public_weight": cfg.public_weight,
          "insecure_reproducible_noise": insecure_noise(config)}
  return params, ledger, meta


def insecure_noise(config) -> bool:
  """Whether the run derives its mechanism's coins from the public seed."""
  return bool(config.get("insecure_reproducible_noise", False))


def _private_jobs(config) -> list[tuple[str, Optional[float], int]]:
  jobs = []
  for seed in config.seeds:
    if "paragon" in config.methods:
      jobs.append(("paragon", None, seed))
    for method in DP_METHODS:
      if method in config.methods:
        jobs.extend((method, float(eps), seed) for eps in config.epsilons)
  return jobs


def run_private(config, workdir: Workdir, mesh=None) -> None:
  jobs = [j for j in _private_jobs(config)
          if not os.path.exists(os.path.join(workdir.run_dir(*_key(j)),
                                             "params.npz"))]
  if not jobs:
    return
  features = load_features(workdir)
  seeds: dict[int, SeedData] = {}
  bar = tqdm.tqdm(jobs, desc="private runs", unit="run",
                  disable=not config.progress, file=sys.stdout)
  for method, epsilon, seed in bar:
    bar.set_postfix_str(f"{method} eps={epsilon} seed={seed}")
    if seed not in seeds:
      seeds[seed] = load_seed(config, workdir, seed, features)
    data = seeds[seed]
    out = workdir.run_dir(method, seed, epsilon)
    start = time.time()
    if method == "paragon":
      # Non-private upper bound on ALL training data, weight decay by CV.
      x = np.concatenate([data.public_x, data.private_x])
      y = np.concatenate([data.public_y, data.private_y])
      params, cv = public_init_lib.train_head(x, y, data.num_classes,
                                              folds=config.cv_folds, seed=seed)
      meta = {"method": method, "seed": seed, "weight_decay": cv.weight_decay,
              "cv_errors": cv.cv_errors}
    else:
      checkpoints = os.path.join(out, "checkpoints")
      params, ledger, meta = train_dp_method(config, method, epsilon, seed, data,
                                             mesh=mesh,
                                             checkpoint_dir=checkpoints)
      if meta["resumed_from_step"] is not None:
        logger.info("%s eps=%s seed=%s resumed at step %d of %d", method,
                    epsilon, seed, meta["resumed_from_step"], meta["steps"])
      ledger.save(os.path.join(out, "ledger.json"))
    meta["seconds"] = round(time.time() - start, 3)
    io.save_json(os.path.join(out, "meta.json"), meta)
    # params.npz last: its presence marks the run as done.
    io.save_npz(os.path.join(out, "params.npz"),
                kernel=np.asarray(params["kernel"]),
                bias=np.asarray(params["bias"]))
    if method != "paragon":
      # Done: the outputs above (params, ledger, meta) are the record now.
      shutil.rmtree(checkpoints, ignore_errors=True)


def _key(job):
  method, epsilon, seed = job
  return method, seed, epsilon


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
  io.save_json(workdir.path("accounting.json"), entries)


# --- stage: report ---------------------------------------------------------


def run_report(config, workdir: Workdir, command: str = "") -> list[dict]:
  features = load_features(workdir)
  accounting_path = workdir.path("accounting.json")
  spent = {}
  if os.path.exists(accounting_path):
    for e in io.load_json(accounting_path):
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
          "dataset": config.get("dataset_label") or config.dataset,
          "method": method,
          "epsilon": epsilon, "delta": config.delta if epsilon else None,
          "seed": seed, "public_per_class": config.public_per_class,
          "test_error": linear.error_rate(params, data.test_x, data.test_y),
          "epsilon_spent": entry.get("epsilon_spent"),
          "epsilon_spent_rdp": entry.get("epsilon_spent_rdp"),
          "noise_multiplier": meta.get("noise_multiplier"),
          "steps": meta.get("steps"),
          "sampling_rate": meta.get("sampling_rate"),
          "insecure_reproducible_noise": (
              insecure_noise(config) if method in DP_METHODS else None)})

    if "public_only" in config.methods:
      record("public_only", None, data.public_params)
    for method, epsilon, job_seed in _private_jobs(config):
      if job_seed != seed:
        continue
      out = workdir.run_dir(method, seed, epsilon)
      params = io.load_npz(os.path.join(out, "params.npz"))
      record(method, epsilon, params, io.load_json(os.path.join(out,
                                                                "meta.json")))
  io.save_json(workdir.path("results.json"), records)
  table = report_lib.markdown_table(records, config.epsilons)
  header = report_lib.provenance(config, command)
  with open(workdir.path("results.md.tmp"), "w") as f:
    f.write(header + "\n" + table + "\n")
  os.replace(workdir.path("results.md.tmp"), workdir.path("results.md"))
  return records


# --- all stages --------------------------------------------------------------


def run(config: ml_collections.ConfigDict, workdir: str,
        stages: Iterable[str] = STAGES, command: str = "",
        mesh=None) -> list[dict] | None:
  """Runs ``stages`` in order; ``mesh``: data-parallel private steps."""
  stages = list(stages)
  unknown = [s for s in stages if s not in STAGES]
  if unknown:
    raise ValueError(f"Unknown stage(s) {unknown}; stages are {list(STAGES)}.")
  validate_config(config)
  wd = Workdir(workdir)
  os.makedirs(workdir, exist_ok=True)
  check_or_save_config(config, wd)
  runners = {"features": run_features, "public_init": run_public_init,
             "private": functools.partial(run_private, mesh=mesh),
             "accounting": run_accounting}
  records = None
  for stage in STAGES:
    if stage not in stages:
      continue
    start = time.time()
    if stage == "report":
      records = run_report(config, wd, command)
    else:
      runners[stage](config, wd)
    if config.progress:
      print(f"stage {stage}: done in {time.time() - start:.1f}s", flush=True)
  return records
