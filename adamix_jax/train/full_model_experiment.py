"""One full-model experiment (``experiments/configs/digits_cnn.py``): a CNN
trained end to end, non-privately (paragon, public-only) and privately
(DP-SGD, AdaMix) for each (epsilon, seed), written like a linear-head run:

  WORKDIR/public_init/seed_S.npz          w_0 (flattened), public data only
  WORKDIR/runs/METHOD[/eps_E]/seed_S/     result.json (+ ledger.json)
  WORKDIR/results.json, results.md        the records and the table

A finished unit (its result.json exists) is skipped, so the same command
resumes an interrupted run.
"""

from __future__ import annotations

import functools
import os
import shutil
import time
from typing import Optional

import jax
import ml_collections
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from adamix_jax import data as data_lib
from adamix_jax.models import cnn
from adamix_jax.privacy import accounting
from adamix_jax.privacy import randomness
from adamix_jax.train import checkpoint as checkpoint_lib
from adamix_jax.train import full_model
from adamix_jax.train import io
from adamix_jax.train import report as report_lib
from adamix_jax.train import stages

PRIVATE_METHODS = ("dp_sgd", "adamix")


def load_images(config):
  """(x_train, y_train, x_test, y_test, num_classes), images NHWC float32."""
  source = data_lib.get_source(config.dataset,
                               **config.dataset_kwargs.to_dict())
  shape = tuple(config.image_shape)
  train, test = source.split("train"), source.split("test")
  x_train = np.asarray(train.as_array(), np.float32).reshape((-1,) + shape)
  x_test = np.asarray(test.as_array(), np.float32).reshape((-1,) + shape)
  return (x_train, np.asarray(train.labels), x_test, np.asarray(test.labels),
          len(source.class_names))


def make_model(config, num_classes: int) -> cnn.SmallCNN:
  return cnn.SmallCNN(num_classes=num_classes,
                      channels=tuple(config.model.channels),
                      hidden=config.model.hidden)


@functools.lru_cache(maxsize=None)
def _sgd(learning_rate: float, momentum: float) -> optax.GradientTransformation:
  # Cached: the jitted private step is cached per optimizer object.
  return optax.sgd(learning_rate, momentum=momentum or None)


def private_optimizer(config) -> optax.GradientTransformation:
  return _sgd(float(config.train.learning_rate), float(config.train.momentum))


def run_unit(config, method: str, epsilon: Optional[float], seed: int, data,
             model, template, w0, mesh=None,
             checkpoint_dir: Optional[str] = None) -> tuple[dict, dict]:
  """Trains one (method, epsilon, seed); returns (params, meta).

  A DP unit with a ``checkpoint_dir`` checkpoints there every
  ``config.train.checkpoint_every`` steps and resumes from it.
  """
  x_train, y_train, public_idx, private_idx = data
  loss_fn = full_model.classification_loss(model)
  if method == "public_only":
    return w0, {}
  if method == "paragon":
    params = full_model.fit_non_private(
        loss_fn, template, x_train, y_train, steps=config.non_private.steps,
        learning_rate=config.non_private.learning_rate,
        weight_decay=config.non_private.weight_decay)
    return params, {}
  train = config.train
  steps = stages.num_steps(config)
  n_private = len(private_idx)
  stages.check_delta(config, n_private)
  sigma = accounting.calibrate_noise_multiplier(
      float(epsilon), float(config.delta), float(train.sampling_rate), steps)
  common = dict(noise_multiplier=sigma,
                expected_batch_size=train.sampling_rate * n_private,
                clip_norm=train.clip_norm, normalize_by_threshold=True,
                microbatch_size=train.microbatch_size or None)
  if method == "dp_sgd":  # no public data at all: random init, fixed C
    cfg = full_model.FullModelConfig(**common)
    init, pub = template, public_idx[:0]
  else:
    cfg = full_model.FullModelConfig(
        **common, adaptive_threshold=config.adamix.adaptive_threshold,
        threshold_quantile=config.adamix.threshold_quantile,
        projection_rank=config.adamix.projection_rank,
        refresh_every=config.adamix.refresh_every)
    init, pub = w0, public_idx
  ledger = accounting.PrivacyLedger(float(config.delta), float(epsilon))
  with checkpoint_lib.checkpointer_or_none(
      checkpoint_dir, config.train.checkpoint_every) as checkpointer:
    resumed_from = checkpointer.latest_step() if checkpointer else None
    params = full_model.train_full_model(
        loss_fn, init, x_train[private_idx], y_train[private_idx],
        x_train[pub], y_train[pub], cfg, private_optimizer(config),
        steps=steps, sampling_rate=train.sampling_rate,
        coins=randomness.run_coins(stages.insecure_noise(config), seed),
        ledger=ledger, mesh=mesh, checkpointer=checkpointer,
        # The optimiser is a closure: its settings are fingerprinted here.
        fingerprint={"train": repr(sorted(config.train.to_dict().items()))})
  return params, {"ledger": ledger, "noise_multiplier": sigma, "steps": steps,
                  "sampling_rate": float(train.sampling_rate),
                  "resumed_from_step": resumed_from}


def run(config: ml_collections.ConfigDict, workdir: str, command: str = "",
        mesh=None) -> list[dict]:
  """Runs every unit of ``config`` in ``workdir`` (resumable); the records."""
  wd = stages.Workdir(workdir)
  os.makedirs(workdir, exist_ok=True)
  stages.check_or_save_config(config, wd)
  x_train, y_train, x_test, y_test, num_classes = load_images(config)
  model = make_model(config, num_classes)
  label = config.get("dataset_label") or config.dataset
  private_cap = (None if config.private_per_class < 0
                 else config.private_per_class)
  records = []
  for seed in config.seeds:
    split = data_lib.few_shot_split(y_train, num_classes,
                                    config.public_per_class, private_cap,
                                    seed=seed)
    template = jax.tree_util.tree_map(np.asarray, model.init(
        jax.random.key(seed), x_train[:1])["params"])
    flat_template, unravel = ravel_pytree(template)
    init_path = wd.public_init(seed)
    if not os.path.exists(init_path):
      w0 = full_model.fit_non_private(
          full_model.classification_loss(model), template,
          x_train[split.public], y_train[split.public],
          steps=config.non_private.steps,
          learning_rate=config.non_private.learning_rate,
          weight_decay=config.non_private.weight_decay)
      io.save_npz(init_path, params=np.asarray(ravel_pytree(w0)[0]))
    w0 = jax.tree_util.tree_map(np.asarray,
                                unravel(io.load_npz(init_path)["params"]))
    data = (x_train, y_train, split.public, split.private)
    units = [(m, None) for m in ("paragon", "public_only")
             if m in config.methods]
    units += [(m, float(e)) for m in PRIVATE_METHODS if m in config.methods
              for e in config.epsilons]
    for method, epsilon in units:
      out = (wd.path("runs", method, f"seed_{seed}") if epsilon is None else
             wd.path("runs", method, f"eps_{epsilon:g}", f"seed_{seed}"))
      result_path = os.path.join(out, "result.json")
      if not os.path.exists(result_path):
        start = time.time()
        checkpoints = os.path.join(out, "checkpoints")
        params, meta = run_unit(config, method, epsilon, seed, data, model,
                                template, w0, mesh, checkpoint_dir=checkpoints)
        record = {
            "dataset": label, "method": method, "epsilon": epsilon,
            "delta": config.delta if epsilon else None, "seed": seed,
            "public_per_class": config.public_per_class,
            "test_error": full_model.error_rate(model, params, x_test, y_test),
            "epsilon_spent": None, "epsilon_spent_rdp": None,
            "noise_multiplier": meta.get("noise_multiplier"),
            "steps": meta.get("steps"),
            "sampling_rate": meta.get("sampling_rate"),
            "insecure_reproducible_noise": (stages.insecure_noise(config)
                                            if epsilon else None)}
        ledger = meta.get("ledger")
        if ledger is not None:
          ledger.save(os.path.join(out, "ledger.json"))
          record["epsilon_spent"] = ledger.epsilon("pld")
          record["epsilon_spent_rdp"] = ledger.epsilon("rdp")
          if record["epsilon_spent"] > epsilon:
            raise accounting.BudgetExceededError(
                f"{out}: spent {record['epsilon_spent']:.4f} > {epsilon}.")
        io.save_npz(os.path.join(out, "params.npz"),
                    params=np.asarray(ravel_pytree(params)[0]))
        record["seconds"] = round(time.time() - start, 2)
        io.save_json(result_path, record)  # last: marks the unit done
        shutil.rmtree(checkpoints, ignore_errors=True)
      record = io.load_json(result_path)
      record.pop("seconds", None)
      records.append(record)
  io.save_json(wd.path("results.json"), records)
  table = report_lib.markdown_table(records, config.epsilons)
  with open(wd.path("results.md.tmp"), "w") as f:
    f.write(report_lib.provenance(config, command) + "\n" + table + "\n")
  os.replace(wd.path("results.md.tmp"), wd.path("results.md"))
  return records
