"""The recipe: the one place where an experiment config becomes objects.

Given a config (``adamix_jax/configs``), a recipe decides what each method
trains and how: the public start (few-shot or zero-shot), the non-private
paragon, and the private runs (DP-SGD and AdaMix: the calibrated sigma, the
``StepConfig``, the projection, the performance flags, the program ``fit``
runs). Two kinds:

* ``LinearHeadRecipe`` (``config.model.kind = "linear"``, the default): a
  linear head on frozen features, preprocessed with statistics of the public
  examples only;
* ``FullModelRecipe`` (``config.model.kind = "cnn"``): every parameter of a
  Flax model trained privately (``experiments``' digits CNN).

The stage runner (``stages``) only walks units and files; the workdir
(``workdir``) only knows paths.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from adamix_jax import data as data_lib
from adamix_jax.adamix import noise_aware
from adamix_jax.adamix import public_init as public_init_lib
from adamix_jax.adamix import settings as settings_lib
from adamix_jax.features import preprocess as preprocess_lib
from adamix_jax.models import linear
from adamix_jax.privacy import accounting
from adamix_jax.privacy import individual as individual_lib
from adamix_jax.privacy import randomness
from adamix_jax.privacy import selection as selection_lib
from adamix_jax.train import checkpoint as checkpoint_lib
from adamix_jax.train import fit as fit_lib
from adamix_jax.train import placement as placement_lib

METHODS = ("paragon", "public_only", "dp_sgd", "pillar", "dp_prototypes",
           "adamix", "zero_noise")
# The others are non-private references (epsilon None). "zero_noise":
# AdaMix's optimiser with the noise switched off (same clipping, geometry,
# rules at sigma = 0): a diagnostic of convergence, NOT private (the
# ablation reports it).
DP_METHODS = ("dp_sgd", "pillar", "dp_prototypes", "adamix")
MODEL_KINDS = ("linear", "cnn")
SCHEDULES = ("noise_aware", "fixed")
PUBLIC_WEIGHT_RULES = ("noise_aware", "set_size", "constant")


# --- validation of the whole config, before any work -------------------------


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
  if model_kind(config) not in MODEL_KINDS:
    raise ValueError(f"Unknown config.model.kind {model_kind(config)!r}; "
                     f"known: {list(MODEL_KINDS)}.")
  for name, kind, example in (("epsilons", (int, float), "1,8"),
                              ("seeds", int, "0,1")):
    bad = [v for v in config[name]
           if isinstance(v, bool) or not isinstance(v, kind)]
    if bad:
      raise ValueError(f"config.{name} holds {bad}, not "
                       f"{'numbers' if name == 'epsilons' else 'integers'}; "
                       f"pass them comma separated, e.g. "
                       f"--config.{name}={example}.")
  for eps in config.epsilons:
    if not eps > 0:
      raise ValueError(f"Every epsilon must be > 0, got {eps} in "
                       "config.epsilons; remove it or use a positive budget "
                       "such as 1.0.")
    if eps > accounting.MAX_CALIBRATION_EPSILON:
      raise ValueError(
          f"epsilon {eps} in config.epsilons is above "
          f"{accounting.MAX_CALIBRATION_EPSILON:g}: no meaningful privacy, "
          "and the accountant cannot calibrate it. Use the paragon (method "
          "'paragon') for a non-private reference.")
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
  for field, value, allowed in (
      ("train.schedule", train.get("schedule", "fixed"), SCHEDULES),
      ("adamix.geometry", config.adamix.get("geometry", "none"),
       noise_aware.GEOMETRIES),
      ("adamix.public_weight_rule",
       config.adamix.get("public_weight_rule", "constant"),
       PUBLIC_WEIGHT_RULES)):
    if value not in allowed:
      raise ValueError(f"config.{field} must be one of {list(allowed)}, got "
                       f"{value!r}.")
  if model_kind(config) != "linear":
    linear_only = [m for m in config.methods
                   if m in ("pillar", "dp_prototypes", "zero_noise")]
    if linear_only or train.get("schedule", "fixed") != "fixed":
      raise ValueError(
          "a full model (config.model.kind != 'linear') runs the fixed "
          "schedule with paragon, public_only, dp_sgd and adamix; set "
          "config.train.schedule='fixed' and drop "
          f"{linear_only or 'nothing'} from config.methods.")
  _validate_selection(config)
  cv_solver = config.get("cv_solver", "sklearn")
  if cv_solver not in public_init_lib.SOLVERS:
    raise ValueError(f"config.cv_solver must be one of "
                     f"{list(public_init_lib.SOLVERS)}, got {cv_solver!r}: "
                     "'sklearn' (CPU default) or 'jax' (for accelerators).")
  scoring = config.get("public_cv_scoring", "error")
  if scoring not in public_init_lib.SCORINGS:
    raise ValueError(f"config.public_cv_scoring must be one of "
                     f"{list(public_init_lib.SCORINGS)}, got {scoring!r}: "
                     "what w_0's cross-validation folds score.")
  if config.preprocess not in preprocess_lib.MODES:
    raise ValueError(f"config.preprocess must be one of "
                     f"{preprocess_lib.MODES}, got {config.preprocess!r}.")
  if not config.seeds:
    raise ValueError("config.seeds is empty.")
  if config.get("rules") is not None:
    try:  # the rules' own checks, before any work
      noise_aware.Rules(**config.rules.to_dict())
    except ValueError as error:
      raise ValueError(str(error).replace("rules.", "config.rules.")
                       ) from None
  if "zero_noise" in config.methods and train.get(
      "schedule", "fixed") != "noise_aware":
    raise ValueError("method 'zero_noise' is AdaMix's optimiser under the "
                     "noise-aware rules: set config.train.schedule="
                     "'noise_aware' or drop it from config.methods.")


def model_kind(config) -> str:
  model = config.get("model")
  return "linear" if model is None else model.get("kind", "linear")


def num_steps(config) -> int:
  return max(1, int(round(config.train.epochs / config.train.sampling_rate)))


def _validate_selection(config) -> None:
  adamix = config.adamix
  fraction = adamix.get("selection_fraction", 0.0)
  if fraction == 0:
    return
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"config.adamix.selection_fraction must be in [0, 1) "
                     f"(0 = no private selection), got {fraction}.")
  path = list(adamix.get("selection_path", ()))
  if not path or any(isinstance(t, bool) or not isinstance(t, (int, float))
                     for t in path):
    raise ValueError("config.adamix.selection_path must list the points t of "
                     "w_0 + t (w - w_0) to choose from, e.g. "
                     "--config.adamix.selection_path=0,0.5,1.")
  if model_kind(config) != "linear":
    raise ValueError("private selection (config.adamix.selection_fraction) "
                     "is for linear heads; set it to 0 for a full model.")
  if config.train.get("schedule", "fixed") != "noise_aware":
    raise ValueError("private selection needs the noise-aware rules "
                     "(config.train.schedule='noise_aware') or "
                     "config.adamix.selection_fraction=0.")
  if individual_levels(config) is not None:
    raise ValueError(
        "private selection trains on a random part of the private set, which "
        "individual-privacy recording does not follow: set "
        "config.analysis.individual_privacy=False, or "
        "config.adamix.selection_fraction=0.")


def selection_fraction(config, method: str) -> float:
  """The private-selection validation fraction of ``method``'s runs (0:
  off). AdaMix only: its path starts at the public model."""
  if method != "adamix" or model_kind(config) != "linear":
    return 0.0
  return float(config.adamix.get("selection_fraction", 0.0))


def individual_levels(config) -> Optional[int]:
  """The ratio grid L of individual privacy recording, None when off.

  On (``config.analysis.individual_privacy``) for linear heads only: each
  private run then records every private example's clipping ratio at every
  step (``adamix.sensitivity``) for the 'analysis' stage.
  """
  analysis = config.get("analysis")
  if (analysis is None or not analysis.get("individual_privacy", False) or
      model_kind(config) != "linear"):
    return None
  return int(analysis.get("individual_levels",
                          individual_lib.DEFAULT_LEVELS))


def insecure_noise(config) -> bool:
  """Whether the runs derive their mechanism's coins from the public seed."""
  return bool(config.get("insecure_reproducible_noise", False))


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


def noise_multiplier(config, epsilon: float) -> float:
  """Sigma calibrated for (epsilon, delta, q, T) of the whole run."""
  return accounting.calibrate_noise_multiplier(
      float(epsilon), float(config.delta), float(config.train.sampling_rate),
      num_steps(config))


@dataclasses.dataclass(frozen=True)
class SeedData:
  """One seed's public/private/test data (model-ready) and public model."""

  public_x: np.ndarray
  public_y: np.ndarray
  private_x: np.ndarray
  private_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray
  num_classes: int
  public_params: Any
  zero_shot: bool


@dataclasses.dataclass(frozen=True)
class DPRun:
  """What a finished private run hands to the stage runner.

  ``individual``: the run's clipping-ratio counts when it recorded them
  (``individual_levels``); derived from the private data, not a release.
  """

  params: Any
  ledger: accounting.PrivacyLedger
  meta: dict
  individual: Optional[individual_lib.IndividualRecorder] = None


def _dp_meta(config, method, epsilon, seed, sigma, data, resumed_from, *,
             steps: int, sampling_rate: float, extra=None) -> dict:
  """A private run's meta.json."""
  return {"method": method, "epsilon": float(epsilon), "seed": seed,
          "resumed_from_step": resumed_from, "noise_multiplier": sigma,
          "steps": int(steps), "sampling_rate": float(sampling_rate),
          "private_examples": int(len(data.private_y)),
          "public_examples": int(len(data.public_y)),
          "insecure_reproducible_noise": insecure_noise(config),
          **(extra or {})}


def _run_with_checkpoints(config, checkpoint_dir, train):
  """Runs ``train(checkpointer)``; returns (result, resumed_from_step)."""
  with checkpoint_lib.checkpointer_or_none(
      checkpoint_dir, config.train.checkpoint_every) as checkpointer:
    resumed_from = checkpointer.latest_step() if checkpointer else None
    return train(checkpointer), resumed_from


@dataclasses.dataclass
class RunPlan:
  """A private linear-head run: steps, rate, step settings, inputs."""

  steps: int
  sampling_rate: float
  step_config: settings_lib.StepConfig
  inputs: dict  # anchor_params, public_x/public_y, subspace, fallback_basis
  feature_map: Optional[np.ndarray] = None
  lr_schedule: str = "constant"
  info: dict = dataclasses.field(default_factory=dict)


# --- the linear head -------------------------------------------------------------


class LinearHeadRecipe:
  """A linear head on frozen (backbone) features."""

  kind = "linear"

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  # public start ------------------------------------------------------------

  def public_init(self, x_public_raw, y_public, class_names, seed: int,
                  dim: int) -> tuple[dict, dict]:
    """(arrays to save, info): preprocessing fitted on the public examples
    and the public model w_0 (few-shot, CV'd weight decay) or a CLIP
    zero-shot head."""
    config = self.config
    prep = preprocess_lib.fit_preprocessor(x_public_raw, config.preprocess,
                                           dim)
    info: dict[str, Any] = {"seed": seed,
                            "public_examples": int(len(y_public))}
    if len(y_public) == 0:
      params = self._zero_shot_head(class_names, dim)
      info["init"] = "zero_shot"
    else:
      params, cv = public_init_lib.train_head(
          prep(x_public_raw), y_public, len(class_names),
          folds=config.cv_folds, seed=seed,
          solver=config.get("cv_solver", "sklearn"),
          scoring=config.get("public_cv_scoring", "error"))
      info.update(init="few_shot", weight_decay=cv.weight_decay,
                  cv_folds=cv.folds, cv_scoring=cv.scoring,
                  cv_errors=cv.cv_errors)
    arrays = {"kernel": np.asarray(params["kernel"]),
              "bias": np.asarray(params["bias"]), **prep.to_arrays()}
    return arrays, info

  def _zero_shot_head(self, class_names, dim: int) -> dict:
    from adamix_jax.models import registry, zero_shot  # heavy: lazy
    config = self.config
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

  def seed_data(self, features: dict, public_idx, private_idx,
                saved: dict) -> SeedData:
    prep = preprocess_lib.Preprocessor.from_arrays(saved)
    x_train = prep(features["x_train"])
    return SeedData(
        public_x=x_train[public_idx], public_y=features["y_train"][public_idx],
        private_x=x_train[private_idx],
        private_y=features["y_train"][private_idx],
        test_x=prep(features["x_test"]), test_y=features["y_test"],
        num_classes=len(features["class_names"]),
        public_params={"kernel": saved["kernel"], "bias": saved["bias"]},
        zero_shot=len(public_idx) == 0)

  # references and private runs ---------------------------------------------

  def paragon(self, data: SeedData, seed: int) -> tuple[dict, dict]:
    """Non-private upper bound on ALL training data, weight decay by CV."""
    x = np.concatenate([data.public_x, data.private_x])
    y = np.concatenate([data.public_y, data.private_y])
    params, cv = public_init_lib.train_head(x, y, data.num_classes,
                                            folds=self.config.cv_folds,
                                            seed=seed,
                                            solver=self.config.get(
                                                "cv_solver", "sklearn"))
    return params, {"weight_decay": cv.weight_decay,
                    "cv_errors": cv.cv_errors}

  # --- the plan of a private run --------------------------------------------

  def rules(self) -> noise_aware.Rules:
    return noise_aware.Rules(**self.config.rules.to_dict())

  def public_weight(self, data: SeedData, sigma_1: float = 0.0,
                    dim: Optional[int] = None) -> float:
    """AdaMix's weight alpha of the exact public gradient
    (``config.adamix.public_weight_rule``)."""
    adamix = self.config.adamix
    n_pub, n_priv = len(data.public_y), len(data.private_y)
    rule = adamix.public_weight_rule
    if rule == "noise_aware":
      return noise_aware.public_gradient_weight(
          sigma_1, n_pub, n_priv, dim or data.private_x.shape[1] + 1,
          data.num_classes, self.rules())
    if rule == "set_size":
      return n_pub / (n_pub + n_priv)
    return float(adamix.public_weight)

  def plan(self, method: str, epsilon: Optional[float],
           data: SeedData) -> RunPlan:
    """What a DP method's run does at ``epsilon`` (public data and
    (sigma_1, N, D, c) only; see ``adamix.noise_aware``). ``epsilon`` None:
    the same rules at sigma = 0 (the zero-noise diagnostic; not private)."""
    config, train, adamix = self.config, self.config.train, self.config.adamix
    n_priv, c = len(data.private_y), data.num_classes
    dim = data.private_x.shape[1]
    zeros = linear.zeros(dim, c)
    no_public = dict(public_x=data.public_x[:0], public_y=data.public_y[:0])
    if train.schedule == "fixed":
      if epsilon is None:
        raise ValueError("a zero-noise plan (epsilon None) needs the "
                         "noise-aware rules: config.train.schedule="
                         "'noise_aware'.")
      steps = num_steps(config)
      sigma = noise_multiplier(config, epsilon)
      common = dict(noise_multiplier=sigma,
                    expected_batch_size=train.sampling_rate * n_priv,
                    learning_rate=train.learning_rate,
                    clip_norm=train.clip_norm,
                    normalize_by_threshold=adamix.normalize_by_threshold)
      if method == "dp_sgd":
        return RunPlan(steps, train.sampling_rate,
                       settings_lib.StepConfig(**common),
                       dict(anchor_params=zeros, **no_public),
                       lr_schedule=train.lr_schedule)
      if method == "adamix":
        return RunPlan(
            steps, train.sampling_rate, settings_lib.StepConfig(
                **common, adaptive_threshold=adamix.adaptive_threshold,
                threshold_quantile=adamix.threshold_quantile,
                public_weight=self.public_weight(data), pull=adamix.pull),
            self._adamix_inputs(data, zeros), lr_schedule=train.lr_schedule)
      raise ValueError(f"method {method!r} needs train.schedule="
                       "'noise_aware'.")
    public_x_aug = np.asarray(linear.augment(np.asarray(data.public_x,
                                                        np.float32)))
    rules = self.rules()
    sigma_1 = (0.0 if epsilon is None else
               noise_aware.single_release_sigma(epsilon, config.delta))

    def full_batch(public_z, dim_z, inputs, geometry, feature_map=None,
                   **step):
      steps, eta = noise_aware.schedule(public_z, dim_z, sigma_1, n_priv, c,
                                        rules, geometry)
      tau = noise_aware.step_budget(dim_z, sigma_1, n_priv, c, rules,
                                    geometry)  # recorded with the plan
      sigma = 0.0 if epsilon is None else (
          accounting.calibrate_noise_multiplier(
              float(epsilon), float(config.delta), 1.0, steps))
      step_config = settings_lib.StepConfig(
          noise_multiplier=sigma, expected_batch_size=float(n_priv),
          learning_rate=eta, clip_norm=rules.clip_norm,
          normalize_by_threshold=False, **step)
      return RunPlan(steps, 1.0, step_config, inputs, feature_map=feature_map,
                     info={"sigma_1": sigma_1, "learning_rate": eta,
                           "dim": dim_z, "geometry": geometry,
                           # the planned step budget and what T reaches
                           # (within half a step of it, unless
                           # rules.max_steps binds)
                           "tau": tau if math.isfinite(tau) else None,
                           "tau_reached": eta * steps})

    if method == "dp_sgd":  # the same rules, no public examples in training
      return full_batch(public_x_aug, dim + 1,
                        dict(anchor_params=zeros, **no_public), "none")
    if method == "pillar":
      geometry = noise_aware.principal_components(public_x_aug, sigma_1,
                                                  n_priv, c, rules)
      return full_batch(public_x_aug @ geometry.feature_map, geometry.dim,
                        dict(anchor_params=zeros, **no_public), geometry.kind,
                        feature_map=geometry.feature_map)
    if method != "adamix":
      raise ValueError(f"no private run plan for method {method!r}.")
    inputs = self._adamix_inputs(data, zeros)
    feature_map, public_z, dim_z, kind = None, public_x_aug, dim + 1, "none"
    if adamix.geometry == "whitened" and len(data.public_y) >= 2:
      geometry = noise_aware.public_geometry(public_x_aug, sigma_1, n_priv,
                                             c, rules)
      feature_map, kind = geometry.feature_map, geometry.kind
      public_z, dim_z = public_x_aug @ feature_map, geometry.dim
    return full_batch(
        public_z, dim_z, inputs, kind, feature_map=feature_map,
        adaptive_threshold=adamix.adaptive_threshold,
        threshold_quantile=adamix.threshold_quantile,
        public_weight=self.public_weight(data, sigma_1, dim_z),
        pull=adamix.pull)

  def zero_noise(self, data: SeedData, seed: int) -> tuple[dict, dict]:
    """AdaMix's optimiser without noise (``plan(.., epsilon=None)``): the
    convergence diagnostic, NOT private (its params are not a release)."""
    del seed
    plan = self.plan("adamix", None, data)
    params = fit_lib.fit(self.program(plan, data), steps=plan.steps,
                         ledger=accounting.PrivacyLedger(
                             float(self.config.delta)))
    return params, {"steps": plan.steps, "sampling_rate": 1.0,
                    "noise_multiplier": 0.0, "private": False, **plan.info}

  def _adamix_inputs(self, data: SeedData, zeros: dict) -> dict:
    adamix = self.config.adamix
    return dict(
        anchor_params=data.public_params if adamix.public_init else zeros,
        public_x=data.public_x, public_y=data.public_y,
        subspace=settings_lib.SubspaceSpec(
            adamix.subspace, adamix.subspace_rank, adamix.refresh_every,
            method=adamix.subspace_method),
        fallback_basis=(np.asarray(linear.stack(data.public_params))
                        if data.zero_shot else None))

  def flags(self) -> settings_lib.PerformanceFlags:
    return settings_lib.PerformanceFlags(path=self.config.train.path)

  def program(self, plan: RunPlan, data: SeedData, *, mesh=None,
              individual: Optional[individual_lib.IndividualRecorder] = None,
              tap=None):
    """The private linear-head program a plan runs on ``data``'s private
    set (``train_dp``; the white-box audit adds its ``tap``)."""
    from adamix_jax.train import linear_head  # pylint: disable=g-import-not-at-top
    return linear_head.LinearHeadProgram(
        data.private_x, data.private_y, config=plan.step_config,
        steps=plan.steps, sampling_rate=plan.sampling_rate,
        flags=self.flags(), average_tail=self.config.train.average_tail,
        lr_schedule=plan.lr_schedule, mesh=mesh, individual=individual,
        feature_map=plan.feature_map, tap=tap, **plan.inputs)

  def train_dp(self, method: str, epsilon: float, seed: int, data: SeedData,
               *, mesh=None, checkpoint_dir: Optional[str] = None,
               ledger: Optional[accounting.PrivacyLedger] = None,
               coins: Optional[randomness.MechanismCoins] = None,
               progress: Optional[fit_lib.Progress] = None,
               plan: Optional[RunPlan] = None) -> DPRun:
    """One (method, epsilon, seed) private run of the linear head.

    The sampler and the noise use fresh secret coins (``seed`` only picks
    the split and the public start) unless ``coins`` are given or
    ``config.insecure_reproducible_noise``. With a ``checkpoint_dir`` the
    run checkpoints every ``train.checkpoint_every`` steps and resumes.
    ``plan`` overrides ``self.plan(method, epsilon, data)`` (the audit).
    """
    config = self.config
    check_delta(config, len(data.private_y))
    ledger = ledger or accounting.PrivacyLedger(float(config.delta),
                                                float(epsilon))
    if coins is None and insecure_noise(config):
      coins = randomness.MechanismCoins.insecure_from_seed(seed)
    if method == "dp_prototypes":
      return self._prototypes(epsilon, seed, data, ledger, coins)
    fraction = selection_fraction(config, method)
    levels = individual_levels(config)

    def train(checkpointer):
      # With private selection the validation split comes from the run's
      # coins, so they are fixed before fit() would fix them: a resume takes
      # the checkpoint's (no record changes part), and on a pod every host
      # takes process 0's (one split, the one fit() trains on).
      run_coins = coins
      if fraction:
        saved = checkpointer.saved_coins() if checkpointer else None
        run_coins = placement_lib.placement_for(mesh).share_coins(
            saved or run_coins or randomness.MechanismCoins.fresh())
      held_out = (None if not fraction else selection_lib.validation_mask(
          len(data.private_y), fraction, run_coins))
      fit_data = data if held_out is None else dataclasses.replace(
          data, private_x=data.private_x[~held_out],
          private_y=data.private_y[~held_out])
      run_plan = plan or self.plan(method, epsilon, fit_data)
      recorder = None if levels is None else (
          individual_lib.IndividualRecorder(len(fit_data.private_y), levels))
      params = fit_lib.fit(
          self.program(run_plan, fit_data, mesh=mesh, individual=recorder),
          steps=run_plan.steps, ledger=ledger, coins=run_coins,
          checkpointer=checkpointer, progress=progress)
      info = {}
      if held_out is not None:
        params, info = self._select(params, data, held_out, epsilon,
                                    run_coins, ledger)
      return params, run_plan, fit_data, recorder, info

    (params, plan, fit_data, recorder, info), resumed_from = (
        _run_with_checkpoints(config, checkpoint_dir, train))
    meta = _dp_meta(config, method, epsilon, seed,
                    plan.step_config.noise_multiplier, fit_data, resumed_from,
                    steps=plan.steps, sampling_rate=plan.sampling_rate,
                    extra={"public_weight": plan.step_config.public_weight,
                           "clip_norm": plan.step_config.clip_norm,
                           **plan.info, **info})
    return DPRun(params, ledger, meta, individual=recorder)

  def path_start(self, data: SeedData) -> dict:
    """w_0 of AdaMix's path w_0 + t (w - w_0): the public model, or zero
    without ``adamix.public_init``."""
    return (data.public_params if self.config.adamix.public_init
            else linear.zeros(data.private_x.shape[1], data.num_classes))

  def _select(self, params, data: SeedData, held_out: np.ndarray,
              epsilon: float, coins, ledger) -> tuple[dict, dict]:
    """Private model selection (``privacy.selection``): the candidates
    w_0 + t (w - w_0) of the run trained on the training part, chosen by
    report-noisy-max at ``epsilon`` on the validation part's error counts
    (disjoint records: parallel composition, recorded in the ledger)."""
    path = tuple(float(t) for t in self.config.adamix.selection_path)
    candidates = selection_lib.path_candidates(
        self.path_start(data), {k: np.asarray(v) for k, v in params.items()},
        path)
    val_x, val_y = data.private_x[held_out], data.private_y[held_out]
    index = selection_lib.select_on_validation(
        candidates,
        lambda c: linear.error_count(c, val_x, val_y),
        float(epsilon), coins, ledger, num_validation=len(val_y))
    # The chosen t is a function of the two releases (public); the
    # validation counts are not, and are not written anywhere.
    return candidates[index], {"selection_t": path[index],
                               "selection_records": int(len(val_y)),
                               "selection_path": list(path)}

  def _prototypes(self, epsilon, seed, data, ledger, coins) -> DPRun:
    """DP class prototypes: one Gaussian release of the private class sums
    (through the one mechanism), the public class sums added, nearest class
    mean."""
    from adamix_jax.train import prototypes  # pylint: disable=g-import-not-at-top
    sigma_1 = noise_aware.single_release_sigma(epsilon, self.config.delta)
    params = prototypes.train_prototypes(
        data.private_x, data.private_y, data.public_x, data.public_y,
        data.num_classes, noise_multiplier=sigma_1, ledger=ledger,
        coins=coins)
    return DPRun(params, ledger, _dp_meta(
        self.config, "dp_prototypes", epsilon, seed, sigma_1, data, None,
        steps=1, sampling_rate=1.0,
        extra={"clip_norm": prototypes.CLIP_NORM}))

  def test_error(self, params: dict, data: SeedData) -> float:
    return linear.error_rate(params, data.test_x, data.test_y)

  def params_to_arrays(self, params: dict) -> dict:
    return {"kernel": np.asarray(params["kernel"]),
            "bias": np.asarray(params["bias"])}

  def params_from_arrays(self, arrays: dict, data: SeedData) -> dict:
    del data
    return {"kernel": arrays["kernel"], "bias": arrays["bias"]}


# --- a whole Flax model ------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _sgd(learning_rate: float, momentum: float) -> optax.GradientTransformation:
  # Cached: one optimiser object per setting.
  return optax.sgd(learning_rate, momentum=momentum or None)


class FullModelRecipe:
  """Every parameter of a Flax model trained privately (a small CNN)."""

  kind = "cnn"

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  def model(self, num_classes: int):
    from adamix_jax.models import cnn  # pylint: disable=g-import-not-at-top
    model = self.config.model
    return cnn.SmallCNN(num_classes=num_classes, channels=tuple(model.channels),
                        hidden=model.hidden)

  def _images(self, x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).reshape(
        (-1,) + tuple(self.config.image_shape))

  def _template(self, num_classes: int, seed: int, example: np.ndarray):
    return jax.tree_util.tree_map(np.asarray, self.model(num_classes).init(
        jax.random.key(seed), example[:1])["params"])

  def _fit(self, num_classes, params, x, y):
    from adamix_jax.train import full_model  # pylint: disable=g-import-not-at-top
    non_private = self.config.non_private
    return full_model.fit_non_private(
        full_model.classification_loss(self.model(num_classes)), params, x, y,
        steps=non_private.steps, learning_rate=non_private.learning_rate,
        weight_decay=non_private.weight_decay)

  def public_init(self, x_public_raw, y_public, class_names, seed: int,
                  dim: int) -> tuple[dict, dict]:
    del dim
    if len(y_public) == 0:
      raise ValueError("the full-model recipe needs public examples "
                       "(config.public_per_class > 0).")
    x = self._images(x_public_raw)
    template = self._template(len(class_names), seed, x)
    w0 = self._fit(len(class_names), template, x, y_public)
    return ({"params": np.asarray(ravel_pytree(w0)[0])},
            {"seed": seed, "public_examples": int(len(y_public)),
             "init": "few_shot", "steps": self.config.non_private.steps})

  def seed_data(self, features: dict, public_idx, private_idx,
                saved: dict) -> SeedData:
    num_classes = len(features["class_names"])
    x_train = self._images(features["x_train"])
    seed_template = self._template(num_classes, 0, x_train)
    _, unravel = ravel_pytree(seed_template)
    return SeedData(
        public_x=x_train[public_idx], public_y=features["y_train"][public_idx],
        private_x=x_train[private_idx],
        private_y=features["y_train"][private_idx],
        test_x=self._images(features["x_test"]), test_y=features["y_test"],
        num_classes=num_classes,
        public_params=jax.tree_util.tree_map(np.asarray,
                                             unravel(saved["params"])),
        zero_shot=False)

  def paragon(self, data: SeedData, seed: int) -> tuple[Any, dict]:
    """Non-private: full-batch AdamW on all training images, from the
    seed's random init, for ``non_private.steps`` steps."""
    x = np.concatenate([data.public_x, data.private_x])
    y = np.concatenate([data.public_y, data.private_y])
    template = self._template(data.num_classes, seed, x)
    return self._fit(data.num_classes, template, x, y), {
        "steps": self.config.non_private.steps}

  def train_dp(self, method: str, epsilon: float, seed: int, data: SeedData,
               *, mesh=None, checkpoint_dir: Optional[str] = None,
               ledger: Optional[accounting.PrivacyLedger] = None,
               coins: Optional[randomness.MechanismCoins] = None,
               progress: Optional[fit_lib.Progress] = None) -> DPRun:
    from adamix_jax.train import full_model  # pylint: disable=g-import-not-at-top
    config, train, adamix = self.config, self.config.train, self.config.adamix
    check_delta(config, len(data.private_y))
    sigma = noise_multiplier(config, epsilon)
    ledger = ledger or accounting.PrivacyLedger(float(config.delta),
                                                float(epsilon))
    common = dict(noise_multiplier=sigma,
                  expected_batch_size=train.sampling_rate * len(data.private_y),
                  clip_norm=train.clip_norm, normalize_by_threshold=True)
    if method == "dp_sgd":  # no public data at all: random init, fixed C
      step_config = settings_lib.StepConfig(**common)
      init = self._template(data.num_classes, seed, data.private_x)
      public = (data.public_x[:0], data.public_y[:0])
      subspace = settings_lib.SubspaceSpec()
    else:
      step_config = settings_lib.StepConfig(
          **common, adaptive_threshold=adamix.adaptive_threshold,
          threshold_quantile=adamix.threshold_quantile)
      init, public = data.public_params, (data.public_x, data.public_y)
      subspace = settings_lib.SubspaceSpec(
          "gradients" if adamix.projection_rank else "none",
          adamix.projection_rank, adamix.refresh_every)
    if coins is None and insecure_noise(config):
      coins = randomness.MechanismCoins.insecure_from_seed(seed)
    model = self.model(data.num_classes)
    params, resumed_from = _run_with_checkpoints(
        config, checkpoint_dir, lambda checkpointer:
        full_model.train_full_model(
            full_model.classification_loss(model), init, data.private_x,
            data.private_y, *public, step_config,
            _sgd(float(train.learning_rate), float(train.momentum)),
            steps=num_steps(config), sampling_rate=train.sampling_rate,
            ledger=ledger, coins=coins, subspace=subspace,
            flags=settings_lib.PerformanceFlags(
                microbatch_size=train.microbatch_size or None),
            mesh=mesh, checkpointer=checkpointer, progress=progress,
            # The optimiser is a closure: its settings are fingerprinted here.
            fingerprint={"train": repr(sorted(train.to_dict().items()))},
            model=model))
    return DPRun(params, ledger, _dp_meta(
        config, method, epsilon, seed, sigma, data, resumed_from,
        steps=num_steps(config), sampling_rate=train.sampling_rate))

  def test_error(self, params, data: SeedData) -> float:
    from adamix_jax.train import full_model  # pylint: disable=g-import-not-at-top
    return full_model.error_rate(self.model(data.num_classes), params,
                                 data.test_x, data.test_y)

  def params_to_arrays(self, params) -> dict:
    return {"params": np.asarray(ravel_pytree(params)[0])}

  def params_from_arrays(self, arrays: dict, data: SeedData):
    _, unravel = ravel_pytree(data.public_params)
    return jax.tree_util.tree_map(np.asarray, unravel(arrays["params"]))


def make_recipe(config: ml_collections.ConfigDict):
  """The recipe of ``config.model.kind``."""
  if model_kind(config) == "cnn":
    return FullModelRecipe(config)
  return LinearHeadRecipe(config)
