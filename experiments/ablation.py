r"""AdaMix with each component switched off (or an optional one on), side by side.

  python -m experiments.ablation --workdir /tmp/adamix_ablation
  python -m experiments.ablation --workdir /tmp/abl --config fashion_mnist
  python -m experiments.ablation --workdir /tmp/abl \
      --main_workdir /tmp/adamix_digits      # reuse a finished main run

Every variant is the dataset config plus a few overrides, run through the
same stages as the main job in its own sub-workdir (so variants resume
independently); the baseline variant also runs the paragon, public-only and
DP-SGD references. ``--main_workdir`` names a finished ``adamix-train`` run
of the SAME config (checked against its config.json): its references and
its AdaMix row are read from its results.json instead of being recomputed
(the paragon's cross-validation takes minutes on the larger datasets).
Writes WORKDIR/ablation.md and ablation.json.
"""

from __future__ import annotations

import copy
import os
import shlex
import sys

from absl import app
from absl import flags
import numpy as np

from adamix_jax import configs as configs_lib
from adamix_jax.launch import cli

PROG = "experiments.ablation"
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.",
                               required=True)
_VARIANTS = flags.DEFINE_list("variants", [], "Subset of variants to run "
                              "(default: all).")
_MAIN_WORKDIR = flags.DEFINE_string(
    "main_workdir", None, "A finished adamix-train workdir of the same "
    "config: its references and AdaMix results are reused.")

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


def main_run_means(base, main_workdir: str) -> dict:
  """(method, epsilon) -> mean errors of a finished main run of ``base``."""
  from adamix_jax import io  # pylint: disable=g-import-not-at-top
  from adamix_jax.experiment import report, workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  wd = workdir_lib.Workdir(main_workdir)
  changed = workdir_lib.config_differences(base, wd)
  results = wd.path("results.json")
  if changed is None or not os.path.exists(results):
    raise cli.UserError(f"--main_workdir {main_workdir} holds no finished "
                        "run (no config.json or results.json): run "
                        "adamix-train there first, or drop --main_workdir.")
  if changed:
    raise cli.UserError(
        f"--main_workdir {main_workdir} was made with another config "
        f"({'; '.join(changed[:5])}): its results cannot stand in for this "
        "ablation's. Drop --main_workdir or pass the same config.")
  return report.mean_errors(io.load_json(results))


def main(argv):
  del argv
  cli.quiet_third_party_logs()
  from adamix_jax import io  # pylint: disable=g-import-not-at-top
  from adamix_jax.experiment import report, stages  # pylint: disable=g-import-not-at-top
  base = flags.FLAGS.config
  configs_lib.split_comma_lists(base)
  names = _VARIANTS.value or list(VARIANTS)
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    raise cli.UserError(f"Unknown variants {unknown}; known: "
                        f"{list(VARIANTS)}")
  command = "python -m experiments.ablation " + " ".join(
      shlex.quote(a) for a in sys.argv[1:])
  reused = {}
  if _MAIN_WORKDIR.value:
    reused = main_run_means(base, _MAIN_WORKDIR.value)
    print(f"== references and the default AdaMix from {_MAIN_WORKDIR.value}",
          flush=True)
  references = {k: v for k, v in reused.items() if k[0] != "adamix"}
  rows = []
  for index, name in enumerate(names):
    overrides, meaning = VARIANTS[name]
    if reused and not overrides:  # the main run's AdaMix is this variant
      means = reused
    else:
      config = variant_config(base, overrides,
                              with_references=index == 0 and not reused)
      workdir = os.path.join(_WORKDIR.value,
                             f"variant_{list(VARIANTS).index(name)}")
      print(f"== {name}: {meaning}", flush=True)
      means = report.mean_errors(stages.run(config, workdir, command=command,
                                            plot=False))
      if index == 0 and not reused:
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
          f"({report.error_increase(references[(key, float(e))][0], paragon):+.0f}%)"
          for e in base.epsilons) + " |")
  for row in rows:
    lines.append(f"| {row['variant']} | " + " | ".join(
        f"{100 * row['adamix_error'][str(e)]:.2f} "
        f"({report.error_increase(row['adamix_error'][str(e)], paragon):+.0f}%)"
        for e in base.epsilons) + " |")
  if ("public_only", None) in references:
    lines.append("")
    lines.append(f"Paragon {100 * paragon:.2f}%, public-only "
                 f"{100 * references[('public_only', None)][0]:.2f}%.")
  text = "\n".join(lines) + "\n"
  print(text)
  io.save_text(os.path.join(_WORKDIR.value, "ablation.md"), text)
  io.save_json(os.path.join(_WORKDIR.value, "ablation.json"), rows)


def run() -> None:
  cli.configure_xla()
  sys.argv = cli.report_errors(PROG, cli.resolve_config_names, sys.argv)
  cli.report_errors(PROG, cli.define_config_flag, sys.argv,
                    "Dataset config: a packaged name or a config file.")
  flags.declare_key_flag("config")  # listed by --help
  app.run(lambda argv: cli.report_errors(PROG, main, argv),
          flags_parser=cli.flags_parser(PROG))


if __name__ == "__main__":
  run()
