"""Non-private, regularised training of the linear head.

Used for the public initialisation (few-shot public examples only) and for
the non-private paragon (public + private). The weight decay comes from
stratified cross-validation on the SAME data the model is trained on, so
the public initialisation never looks at private data, and the paragon (which
is non-private anyway) is a well-regularised reference, not a straw man.

The solver is scikit-learn's multinomial L-BFGS logistic regression: a
deterministic, well-tested convex solver, much faster on CPU than an
L-BFGS written in JAX and vmapped over folds. Objective:
mean cross-entropy + weight_decay / 2 * ||kernel||^2 (bias not penalised).
"""

from __future__ import annotations

import dataclasses
import warnings

import jax.numpy as jnp
import numpy as np
from sklearn import exceptions
from sklearn import linear_model
from sklearn import model_selection

DEFAULT_WEIGHT_DECAYS = tuple(float(v) for v in np.logspace(-6, 0, 7))


def _to_params(model, dim: int, num_classes: int) -> dict:
  kernel = np.zeros((dim, num_classes), np.float32)
  bias = np.full((num_classes,), -1e3, np.float32)
  present = model.classes_.astype(int)
  if len(present) == 2:
    # Binary sklearn models keep one logit: split it symmetrically.
    kernel[:, present[1]] = 0.5 * model.coef_[0]
    kernel[:, present[0]] = -0.5 * model.coef_[0]
    bias[present[1]], bias[present[0]] = (0.5 * model.intercept_[0],
                                          -0.5 * model.intercept_[0])
  else:
    kernel[:, present] = model.coef_.T
    bias[present] = model.intercept_
  return {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}


def fit_regularization_path(x, y, num_classes: int,
                            weight_decays, max_iter: int = 500) -> list[dict]:
  """One fit per weight decay, warm-started from the next larger decay.

  Classes absent from ``y`` get zero kernel columns and a very negative bias
  (never predicted). Returns params in the order of ``weight_decays``.
  """
  x = np.asarray(x, np.float64)
  y = np.asarray(y)
  if min(weight_decays) <= 0:
    raise ValueError(f"weight decays must be > 0, got {weight_decays}.")
  order = sorted(range(len(weight_decays)), key=lambda i: -weight_decays[i])
  model = linear_model.LogisticRegression(max_iter=max_iter, tol=1e-4,
                                          warm_start=True)
  fitted = [None] * len(weight_decays)
  for i in order:
    # sklearn minimises 0.5||w||^2 + C * sum(loss): C = 1 / (n * decay).
    model.set_params(C=1.0 / (len(y) * weight_decays[i]))
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", exceptions.ConvergenceWarning)
      model.fit(x, y)
    fitted[i] = _to_params(model, x.shape[1], num_classes)
  return fitted


def fit_logistic_regression(x, y, num_classes: int, weight_decay: float,
                            max_iter: int = 500) -> dict:
  """Deterministic L2-regularised multinomial logistic regression.

  Returns ``{"kernel": (d, c), "bias": (c,)}``.
  """
  return fit_regularization_path(x, y, num_classes, [weight_decay],
                                 max_iter)[0]


@dataclasses.dataclass(frozen=True)
class CrossValidation:
  weight_decay: float
  cv_errors: dict[float, float]  # weight decay -> mean held-out error
  folds: int


def select_weight_decay(x, y, num_classes: int,
                        weight_decays=DEFAULT_WEIGHT_DECAYS, folds: int = 5,
                        seed: int = 0) -> CrossValidation:
  """Stratified k-fold CV over ``weight_decays`` on (x, y) only.

  Ties go to the larger weight decay (the simpler model). With few-shot data
  the number of folds is capped by the smallest class count; with a single
  example per class there is no held-out signal and the middle of the grid
  is used.
  """
  y = np.asarray(y)
  folds = int(min(folds, np.bincount(y, minlength=num_classes).min()))
  if folds < 2:
    return CrossValidation(weight_decays[len(weight_decays) // 2], {}, folds)
  splitter = model_selection.StratifiedKFold(folds, shuffle=True,
                                             random_state=seed)
  errors = np.zeros(len(weight_decays))
  x = np.asarray(x)
  for train, held_out in splitter.split(np.zeros(len(y)), y):
    path = fit_regularization_path(x[train], y[train], num_classes,
                                   weight_decays)
    for i, params in enumerate(path):
      logits = x[held_out] @ np.asarray(params["kernel"]) + \
          np.asarray(params["bias"])
      errors[i] += np.sum(np.argmax(logits, -1) != y[held_out])
  errors /= len(y)
  best = max(range(len(weight_decays)),
             key=lambda i: (-round(float(errors[i]), 12), weight_decays[i]))
  return CrossValidation(float(weight_decays[best]),
                         {float(w): float(e) for w, e in
                          zip(weight_decays, errors)}, folds)


def train_head(x, y, num_classes: int, weight_decays=DEFAULT_WEIGHT_DECAYS,
               folds: int = 5, seed: int = 0):
  """CV-selected weight decay, then a fit on all of (x, y)."""
  cv = select_weight_decay(x, y, num_classes, weight_decays, folds, seed)
  return fit_logistic_regression(x, y, num_classes, cv.weight_decay), cv
