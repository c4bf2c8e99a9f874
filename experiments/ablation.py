r"""AdaMix with each component switched off (or an optional one on), side by side.

  python -m experiments.ablation --workdir /tmp/adamix_ablation
  python -m experiments.ablation --workdir /tmp/abl --config experiments/configs/fashion_mnist.py

Every variant is the dataset config plus a few overrides, run through the
same stages as the main job in its own sub-workdir (so variants resume
independently); the baseline variant also runs the paragon, public-only and
DP-SGD references. Writes WORKDIR/ablation.md and ablation.json.
"""

from __future__ import annotations

import copy
import os
import shlex
import sys

from absl import app
from absl import logging as absl_logging
from absl import flags
from ml_collections import config_flags
import numpy as np

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                               "configs", "digits.py")
config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG,
                                "Dataset config (ml_collections).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.",
                               required=True)
_VARIANTS = flags.DEFINE_list("variants", [], "Subset of variants to run "
                              "(default: all).")

# name -> (overrides of config.adamix, what it tests)
VARIANTS = {
    "adamix (defaults)": ({}, "the configured AdaMix"),
    "no public init": ({"public_init": False}, "start from zero, not w_0"),
    "fixed threshold": ({"adaptive_threshold": False},
                        "C = train.clip_norm instead of public quantile"),
    "max-norm threshold": ({"threshold_quantile": 1.0},
                           "C_t = max public norm instead of the median"),
    "no lr/C_t normalisation": ({"normalize_by_threshold": False},
                                "step lr instead of lr / C_t"),
    "+ gradient subspace k=20": ({"subspace": "gradients", "subspace_rank": 20},
                                 "project on top-20 public-gradient directions"),
    "+ feature subspace k=20": ({"subspace": "features", "subspace_rank": 20},
                                "project the feature factor on 20 public PCs"),
    "no public-gradient mixing": ({"public_weight_by_set_size": False},
                                  "private gradient only (alpha = 0)"),
    "+ pull to w_0 (0.01)": ({"pull": 0.01}, "lambda (w - w_0) towards w_0"),
}


def variant_config(base, overrides: dict, with_references: bool):
  config = copy.deepcopy(base)
  with config.unlocked():
    for key, value in overrides.items():
      config.adamix[key] = value
    if not with_references:
      config.methods = ("adamix",)
  return config


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  from adamix_jax.train import report, stages, io  # after flags
  base = flags.FLAGS.config
  names = _VARIANTS.value or list(VARIANTS)
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    raise app.UsageError(f"Unknown variants {unknown}; known: {list(VARIANTS)}")
  command = "python -m experiments.ablation " + " ".join(
      shlex.quote(a) for a in sys.argv[1:])
  rows, references = [], {}
  for index, name in enumerate(names):
    overrides, meaning = VARIANTS[name]
    config = variant_config(base, overrides, with_references=index == 0)
    workdir = os.path.join(_WORKDIR.value, f"variant_{list(VARIANTS).index(name)}")
    print(f"== {name}: {meaning}", flush=True)
    records = stages.run(config, workdir, command=command)
    means = report.mean_errors(records)
    if index == 0:
      references = {k: v for k, v in means.items() if k[0] != "adamix"}
    rows.append({"variant": name, "meaning": meaning, "overrides": overrides,
                 "adamix_error": {str(eps): means[("adamix", float(eps))][0]
                                  for eps in base.epsilons}})
  paragon = references.get(("paragon", None), (np.nan,))[0]
  lines = [f"# AdaMix ablation: {base.dataset}", "", f"- command: `{command}`",
           f"- seeds: {list(base.seeds)}; test error % (mean over seeds), "
           "increase vs paragon in brackets", "",
           "| variant | " + " | ".join(f"eps={e:g}" for e in base.epsilons) +
           " |", "|---|" + "---|" * len(base.epsilons)]
  for name, key in (("DP-SGD (reference)", "dp_sgd"),):
    if (key, float(base.epsilons[0])) in references:
      lines.append(f"| {name} | " + " | ".join(
          f"{100 * references[(key, float(e))][0]:.2f} "
          f"(+{report.error_increase(references[(key, float(e))][0], paragon):.0f}%)"
          for e in base.epsilons) + " |")
  for row in rows:
    lines.append(f"| {row['variant']} | " + " | ".join(
        f"{100 * row['adamix_error'][str(e)]:.2f} "
        f"(+{report.error_increase(row['adamix_error'][str(e)], paragon):.0f}%)"
        for e in base.epsilons) + " |")
  if ("public_only", None) in references:
    lines.append("")
    lines.append(f"Paragon {100 * paragon:.2f}%, public-only "
                 f"{100 * references[('public_only', None)][0]:.2f}%.")
  text = "\n".join(lines) + "\n"
  print(text)
  with open(os.path.join(_WORKDIR.value, "ablation.md"), "w") as f:
    f.write(text)
  io.save_json(os.path.join(_WORKDIR.value, "ablation.json"), rows)


if __name__ == "__main__":
  app.run(main)
