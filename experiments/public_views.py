r"""Do label-preserving views of the PUBLIC images help? DEVELOPMENT splits.

  adamix-train --config fashion_mnist --workdir /tmp/dev_fm \
      --config.methods=public_only        # features, splits, public starts
  python -m experiments.public_views --config fashion_mnist \
      --workdir /tmp/dev_fm --views flip --out /tmp/public_views_flip

The lead it tests: with 5 public images per class the public subspace has
at most n - 1 directions and w_0 is fitted on 50 points; more public views
(a horizontal flip; ``flip_shift`` adds shifts by 2 pixels of both) would
give more of both at no privacy cost (public images only; the private set
is not touched). For each seed, the views of its public images are
embedded by the config's backbone and normalised by the seed's public
preprocessor; w_0 is refitted on all views with its weight decay chosen by
cross-validation over whole images (every view of an image in one fold,
scored on the unaltered held-out images); then public-only and the
methods' private runs (rules unchanged) are scored on the development
quarter of the private set (``experiments/development.py``; the test split
is never read), with and without the views. Image datasets only. Writes
OUT/public_views.json and OUT/public_views.md, each with this command.
"""

from __future__ import annotations

import copy
import dataclasses
import json

from absl import flags
import numpy as np
from sklearn import model_selection

from adamix_jax import configs as configs_lib
from adamix_jax import data as data_lib
from adamix_jax import io
from adamix_jax.adamix import public_init as public_init_lib
from adamix_jax.experiment import recipe as recipe_lib
from adamix_jax.experiment import stages
from adamix_jax.experiment.workdir import Workdir
from adamix_jax.features import extract
from adamix_jax.features import preprocess
from adamix_jax.launch import cli
from adamix_jax.models import registry
from experiments import development

PROG = "experiments.public_views"
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "A finished adamix-train workdir of the config (its "
    "features, splits and public starts are read).", required=True)
_OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)
_VIEWS = flags.DEFINE_enum("views", "flip", ["flip", "flip_shift"],
                           "The views of each public image.")
_EPSILONS = flags.DEFINE_list("epsilons", ["1"], "Target epsilons.")
_METHODS = flags.DEFINE_list("methods", ["adamix"], "Private methods.")
_SHIFT = 2  # pixels


def _shift(image: np.ndarray, dx: int, dy: int) -> np.ndarray:
  """``image`` moved by (dx, dy) pixels, the uncovered border zero."""
  out = np.zeros_like(image)
  height, width = image.shape[:2]
  src_y = slice(max(0, -dy), height - max(0, dy))
  dst_y = slice(max(0, dy), height - max(0, -dy))
  src_x = slice(max(0, -dx), width - max(0, dx))
  dst_x = slice(max(0, dx), width - max(0, -dx))
  out[dst_y, dst_x] = image[src_y, src_x]
  return out


def views(image: np.ndarray, kind: str) -> list[np.ndarray]:
  """The image first (view 0, the original), then its views."""
  flipped = np.ascontiguousarray(image[:, ::-1])
  out = [image, flipped]
  if kind == "flip_shift":
    out += [_shift(base, dx, dy) for base in (image, flipped)
            for dx, dy in ((_SHIFT, 0), (-_SHIFT, 0), (0, _SHIFT),
                           (0, -_SHIFT))]
  return out


def grouped_public_head(x, y, groups, original, num_classes: int, seed: int):
  """w_0 on every view; weight decay by CV over whole images (folds of
  image ids, stratified by class), scored on the held-out originals."""
  images = np.unique(groups)
  image_y = np.array([y[groups == g][0] for g in images])
  folds = int(min(5, np.bincount(image_y, minlength=num_classes).min()))
  splitter = model_selection.StratifiedKFold(folds, shuffle=True,
                                             random_state=seed)
  errors = {}
  for decay in public_init_lib.DEFAULT_WEIGHT_DECAYS:
    fold_errors = []
    for train, held in splitter.split(np.zeros(len(images)), image_y):
      fit_rows = np.isin(groups, images[train])
      score_rows = np.isin(groups, images[held]) & original
      head = public_init_lib.fit_logistic_regression(
          x[fit_rows], y[fit_rows], num_classes, decay)
      logits = x[score_rows] @ np.asarray(head["kernel"]) + np.asarray(
          head["bias"])
      fold_errors.append(np.mean(logits.argmax(1) != y[score_rows]))
    errors[decay] = float(np.mean(fold_errors))
  decay = min(errors, key=lambda d: (errors[d], -d))  # ties: larger decay
  head = public_init_lib.fit_logistic_regression(x, y, num_classes, decay)
  return {k: np.asarray(v) for k, v in head.items()}, decay


def view_cosine(x, groups, original) -> float:
  """Mean cosine between each extra view and its own image, after centring
  on the mean of all views (about 0 between unrelated images)."""
  centred = x - x.mean(axis=0)
  centred /= np.linalg.norm(centred, axis=1, keepdims=True)
  image_of = {int(g): centred[i] for i, g in enumerate(groups) if original[i]}
  return float(np.mean([centred[i] @ image_of[int(g)]
                        for i, g in enumerate(groups) if not original[i]]))


def main(argv):
  del argv
  config = flags.FLAGS.config
  configs_lib.split_comma_lists(config)
  source = data_lib.get_source(config.dataset,
                               **config.dataset_kwargs.to_dict())
  if source.kind != "image":
    raise cli.UserError(f"{config.dataset} holds {source.kind} items: views "
                        "need images.")
  train = source.split("train")
  num_classes = len(source.class_names)
  # The training rows the workdir embedded, in its order: those of the
  # seeds it was made with (config.json), which --config.seeds may subset.
  workdir = Workdir(_WORKDIR.value)
  made_with = copy.deepcopy(config)
  made_with.seeds = io.load_json(workdir.path("config.json"))["seeds"]
  _, used = stages.embedded_train_rows(made_with, np.asarray(train.labels),
                                       num_classes)
  backbone = registry.get_backbone(config.backbone,
                                   **config.backbone_kwargs.to_dict())
  features = stages.load_features(workdir)
  splits = np.load(workdir.splits)
  recipe = recipe_lib.make_recipe(config)
  rows, cosines = [], []
  for seed in config.seeds:
    base = stages.load_seed(config, workdir, seed, features)
    public_rows = used[splits[f"public_{seed}"]]
    items, view_y, groups, original = [], [], [], []
    for image_id, row in enumerate(public_rows):
      image, label = train[int(row)]
      for k, view in enumerate(views(np.asarray(image), _VIEWS.value)):
        items.append(view)
        view_y.append(label)
        groups.append(image_id)
        original.append(k == 0)
    view_y, groups = np.asarray(view_y), np.asarray(groups)
    prep = preprocess.Preprocessor.from_arrays(
        np.load(workdir.public_init(seed)))
    view_x = prep(extract.compute_features(
        data_lib.ArraySplit(np.stack(items), view_y), backbone,
        batch_size=config.feature_batch_size, progress=False))
    head, decay = grouped_public_head(view_x, view_y, groups,
                                      np.asarray(original), num_classes, seed)
    cosines.append(view_cosine(view_x, groups, np.asarray(original)))
    with_views = dataclasses.replace(base, public_x=view_x, public_y=view_y,
                                     public_params=head)
    for variant, data in (("images", base), ("views", with_views)):
      dev = development.development_split(data, seed)
      num_train = len(dev.private_y)
      record = dict(seed=seed, variant=variant, public_rows=len(data.public_y),
                    weight_decay=decay if variant == "views" else None)
      rows.append(dict(record, method="public_only", epsilon=None,
                       dev_error=100 * float(recipe.test_error(
                           data.public_params, dev))))
      print(json.dumps(rows[-1]), flush=True)
      for eps in (float(e) for e in _EPSILONS.value):
        run_eps = development.matched_epsilon(
            eps, float(config.delta), num_train, num_train + len(dev.test_y))
        for method in _METHODS.value:
          run = recipe.train_dp(method, run_eps, seed, dev)
          rows.append(dict(record, method=method, epsilon=eps,
                           steps=run.meta.get("steps"),
                           dev_error=100 * float(recipe.test_error(
                               run.params, dev))))
          print(json.dumps(rows[-1]), flush=True)
  body = [f"Development error (%), mean ± standard error over seeds "
          f"{list(config.seeds)}; views: {_VIEWS.value} "
          f"({len(views(np.zeros((4, 4)), _VIEWS.value))} per public image; "
          "mean cosine of a view to its own image after centring "
          f"{np.mean(cosines):.2f}).",
          "", "| method | epsilon | public images | public views |",
          "|---|---|---|---|"]
  cells = sorted({(r["method"], r["epsilon"] or 0.0) for r in rows})
  for method, eps in cells:
    means = [development.mean_and_error(
        [r["dev_error"] for r in rows if r["variant"] == variant and
         r["method"] == method and (r["epsilon"] or 0.0) == eps])
             for variant in ("images", "views")]
    shown = "-" if method == "public_only" else f"{eps:g}"
    body.append(f"| {method} | {shown} | {means[0]} | {means[1]} |")
  development.write_outputs(_OUT.value, "public_views", PROG, config, rows,
                            "Public views on development splits", body)


if __name__ == "__main__":
  development.run(PROG, main)
