"""Non-private, regularised training of the linear head.

Used for the public initialisation (few-shot public examples only) and for
the non-private paragon (public + private). The weight decay comes from
stratified cross-validation on the SAME data the model is trained on, so
the public initialisation never looks at private data, and the paragon (which
is non-private anyway) is a well-regularised reference, not a straw man.

The default solver is scikit-learn's multinomial L-BFGS logistic regression:
a deterministic, well-tested convex solver in float64, fast on CPU. Objective:
mean cross-entropy + weight_decay / 2 * ||kernel||^2 (bias not penalised).

``solver="jax"`` solves the same objective with optax's L-BFGS (zoom
linesearch) in float32, jitted, with all CV folds of one weight decay solved
in one vmapped call (folds are per-example weights over the shared data),
warm-started along the path from the largest decay down. It is meant for
accelerators; see ``experiments/benchmarks/cv_solver_speed.py`` for its speed
on CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import special
from sklearn import exceptions
from sklearn import linear_model
from sklearn import model_selection

DEFAULT_WEIGHT_DECAYS = tuple(float(v) for v in np.logspace(-6, 0, 7))
SOLVERS = ("sklearn", "jax")
# What a CV fold's held-out examples score: "error" (misclassified count) or
# "log_loss" (summed held-out cross-entropy, a proper scoring rule).
SCORINGS = ("error", "log_loss")
# The JAX path's stopping rule: max |gradient| of the objective (sklearn's
# ``tol`` means the same, but in float64), and an iteration cap.
JAX_TOL = 1e-6
JAX_MAX_ITER = 1000
_ABSENT_LOGIT = -1e9  # masks classes absent from a fold while solving
_ABSENT_BIAS = -1e3   # their bias in the returned head (as the sklearn path)


def _check_solver(solver: str) -> None:
  if solver not in SOLVERS:
    raise ValueError(f"solver must be one of {list(SOLVERS)}, got "
                     f"{solver!r}.")


def _check_scoring(scoring: str) -> None:
  if scoring not in SCORINGS:
    raise ValueError(f"scoring must be one of {list(SCORINGS)}, got "
                     f"{scoring!r}.")


def held_out_score(params, x, y, scoring: str) -> float:
  """The summed held-out score of a head on (x, y): misclassified examples
  ("error") or cross-entropy in nats ("log_loss"; classes the fold never
  saw keep their -1e3 bias, so a held-out example of such a class costs
  ~1e3, the same for every weight decay)."""
  _check_scoring(scoring)
  y = np.asarray(y)
  if scoring == "error":  # in the features' dtype, as every committed run
    logits = (np.asarray(x) @ np.asarray(params["kernel"]) +
              np.asarray(params["bias"]))
    return float(np.sum(np.argmax(logits, -1) != y))
  logits = (np.asarray(x, np.float64) @ np.asarray(params["kernel"],
                                                   np.float64)
            + np.asarray(params["bias"], np.float64))
  return float(-np.sum(special.log_softmax(logits, -1)[np.arange(len(y)), y]))


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


def objective(params, x, y, weight_decay: float) -> float:
  """mean cross-entropy + weight_decay / 2 * ||kernel||^2, in float64.

  Classes with bias <= -1e3 (absent from ``y``) are left out of the softmax,
  as both solvers treat them as never predicted.
  """
  kernel = np.asarray(params["kernel"], np.float64)
  bias = np.asarray(params["bias"], np.float64)
  keep = bias > _ABSENT_BIAS / 2
  logits = np.asarray(x, np.float64) @ kernel[:, keep] + bias[keep]
  logits -= logits.max(-1, keepdims=True)
  log_z = np.log(np.exp(logits).sum(-1))
  col = np.cumsum(keep) - 1  # label -> column among the kept classes
  ce = log_z - logits[np.arange(len(y)), col[np.asarray(y)]]
  return float(ce.mean() + 0.5 * weight_decay * np.sum(kernel ** 2))


# --- the JAX solver -----------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _jax_path_step(max_iter: int, tol: float):
  """Jitted: one weight decay, all folds (leading axis) at once."""

  def solve(x, onehot, weights, present, penalty, decay, params):
    def fun(p):
      logits = jnp.where(present, x @ p["kernel"] + p["bias"], _ABSENT_LOGIT)
      ce = -jnp.sum(onehot * jax.nn.log_softmax(logits), -1)
      return (jnp.sum(weights * ce)
              + 0.5 * decay * penalty * jnp.sum(jnp.square(p["kernel"])))

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(fun)

    def grad_max(state):
      grad = optax.tree_utils.tree_get(state, "grad")
      return jnp.max(jnp.stack([jnp.max(jnp.abs(g))
                                for g in jax.tree_util.tree_leaves(grad)]))

    def cond(carry):
      _, state = carry
      count = optax.tree_utils.tree_get(state, "count")
      return (count == 0) | ((count < max_iter) & (grad_max(state) > tol))

    def body(carry):
      p, state = carry
      value, grad = value_and_grad(p, state=state)
      updates, state = opt.update(grad, state, p, value=value, grad=grad,
                                  value_fn=fun)
      return optax.apply_updates(p, updates), state

    p, state = jax.lax.while_loop(cond, body, (params, opt.init(params)))
    return p, optax.tree_utils.tree_get(state, "count"), grad_max(state)

  batched = jax.vmap(solve, in_axes=(None, None, 0, 0, 0, None, 0))
  return jax.jit(batched)


def _jax_path(x, y, num_classes: int, weight_decays, train_masks,
              max_iter: int = JAX_MAX_ITER, tol: float = JAX_TOL):
  """Per weight decay (in the given order), stacked params for each fold.

  ``train_masks`` (folds, n) bool selects each fold's training examples from
  the shared (x, y). Returns a list over ``weight_decays`` of
  ``{"kernel": (folds, d, c), "bias": (folds, c)}`` numpy arrays, absent
  classes already given a zero kernel column and bias -1e3.
  """
  if min(weight_decays) <= 0:
    raise ValueError(f"weight decays must be > 0, got {weight_decays}.")
  y = np.asarray(y)
  masks = np.asarray(train_masks, bool)
  folds = len(masks)
  counts = np.stack([np.bincount(y[m], minlength=num_classes) for m in masks])
  present = counts > 0
  # sklearn fits a single logit when only two classes are present; split
  # symmetrically over two columns, its penalty equals twice the decay here.
  penalty = np.where(present.sum(1) == 2, 2.0, 1.0).astype(np.float32)
  weights = (masks / masks.sum(1, keepdims=True)).astype(np.float32)
  xj = jnp.asarray(x, jnp.float32)
  onehot = jnp.asarray(np.eye(num_classes, dtype=np.float32)[y])
  step = _jax_path_step(int(max_iter), float(tol))
  params = {"kernel": jnp.zeros((folds, x.shape[1], num_classes), jnp.float32),
            "bias": jnp.zeros((folds, num_classes), jnp.float32)}
  order = sorted(range(len(weight_decays)), key=lambda i: -weight_decays[i])
  fitted = [None] * len(weight_decays)
  for i in order:
    params, _, _ = step(xj, onehot, jnp.asarray(weights), jnp.asarray(present),
                        jnp.asarray(penalty),
                        jnp.float32(weight_decays[i]), params)
    kernel = np.where(present[:, None, :], np.asarray(params["kernel"]), 0.0)
    bias = np.asarray(params["bias"], np.float64)
    # The bias is defined up to a constant over the present classes: centre
    # it (sklearn's L-BFGS keeps it centred, its gradient sums to zero).
    centre = (np.where(present, bias, 0.0).sum(1, keepdims=True)
              / present.sum(1, keepdims=True))
    bias = np.where(present, bias - centre, _ABSENT_BIAS)
    fitted[i] = {"kernel": kernel.astype(np.float32),
                 "bias": bias.astype(np.float32)}
  return fitted


def fit_regularization_path(x, y, num_classes: int,
                            weight_decays, max_iter: int = 500,
                            solver: str = "sklearn") -> list[dict]:
  """One fit per weight decay, warm-started from the next larger decay.

  Classes absent from ``y`` get zero kernel columns and a very negative bias
  (never predicted). Returns params in the order of ``weight_decays``.
  ``solver="jax"``: optax L-BFGS in float32 (``max_iter`` is then at least
  ``JAX_MAX_ITER``, its stopping rule is ``JAX_TOL``).
  """
  _check_solver(solver)
  if solver == "jax":
    y = np.asarray(y)
    path = _jax_path(np.asarray(x), y, num_classes, weight_decays,
                     np.ones((1, len(y)), bool),
                     max_iter=max(max_iter, JAX_MAX_ITER))
    return [{"kernel": jnp.asarray(p["kernel"][0]),
             "bias": jnp.asarray(p["bias"][0])} for p in path]
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
                            max_iter: int = 500,
                            solver: str = "sklearn") -> dict:
  """Deterministic L2-regularised multinomial logistic regression.

  Returns ``{"kernel": (d, c), "bias": (c,)}``.
  """
  return fit_regularization_path(x, y, num_classes, [weight_decay],
                                 max_iter, solver=solver)[0]


@dataclasses.dataclass(frozen=True)
class CrossValidation:
  weight_decay: float
  # weight decay -> mean held-out score per example (error rate, or
  # cross-entropy in nats with scoring="log_loss")
  cv_errors: dict[float, float]
  folds: int
  scoring: str = "error"


def select_weight_decay(x, y, num_classes: int,
                        weight_decays=DEFAULT_WEIGHT_DECAYS, folds: int = 5,
                        seed: int = 0,
                        solver: str = "sklearn",
                        scoring: str = "error") -> CrossValidation:
  """Stratified k-fold CV over ``weight_decays`` on (x, y) only.

  ``scoring``: what the held-out examples score (``held_out_score``). Ties
  go to the larger weight decay (the simpler model). With few-shot data
  the number of folds is capped by the smallest class count; with a single
  example per class there is no held-out signal and the middle of the grid
  is used. ``solver="jax"`` solves all folds of one decay in one call.
  """
  _check_solver(solver)
  _check_scoring(scoring)
  y = np.asarray(y)
  folds = int(min(folds, np.bincount(y, minlength=num_classes).min()))
  if folds < 2:
    return CrossValidation(weight_decays[len(weight_decays) // 2], {}, folds,
                           scoring)
  splitter = model_selection.StratifiedKFold(folds, shuffle=True,
                                             random_state=seed)
  errors = np.zeros(len(weight_decays))
  x = np.asarray(x)
  splits = list(splitter.split(np.zeros(len(y)), y))
  if solver == "jax":  # every fold of one decay in one call
    masks = np.zeros((folds, len(y)), bool)
    for f, (train, _) in enumerate(splits):
      masks[f, train] = True
    path = _jax_path(x, y, num_classes, weight_decays, masks)
    fold_paths = [[{k: v[f] for k, v in params.items()} for params in path]
                  for f in range(folds)]
  else:
    fold_paths = [fit_regularization_path(x[train], y[train], num_classes,
                                          weight_decays)
                  for train, _ in splits]
  for (_, held_out), path in zip(splits, fold_paths):
    for i, params in enumerate(path):
      errors[i] += held_out_score(params, x[held_out], y[held_out], scoring)
  errors /= len(y)
  best = max(range(len(weight_decays)),
             key=lambda i: (-round(float(errors[i]), 12), weight_decays[i]))
  return CrossValidation(float(weight_decays[best]),
                         {float(w): float(e) for w, e in
                          zip(weight_decays, errors)}, folds, scoring)


def train_head(x, y, num_classes: int, weight_decays=DEFAULT_WEIGHT_DECAYS,
               folds: int = 5, seed: int = 0, solver: str = "sklearn",
               scoring: str = "error"):
  """CV-selected weight decay, then a fit on all of (x, y)."""
  cv = select_weight_decay(x, y, num_classes, weight_decays, folds, seed,
                           solver=solver, scoring=scoring)
  return fit_logistic_regression(x, y, num_classes, cv.weight_decay,
                                 solver=solver), cv
