r"""AdaMix with each component switched off (or an optional one on), side by side.

  python -m experiments.ablation --workdir /tmp/adamix_ablation
  python -m experiments.ablation --workdir /tmp/abl --config fashion_mnist
  python -m experiments.ablation --workdir /tmp/abl \
      --main_workdir /tmp/adamix_digits      # reuse a finished main run

Every variant is the dataset config plus a few overrides, run through the
same stages as the main job in its own sub-workdir (so variants resume
independently); the baseline variant also runs the paragon, public-only,
DP-SGD, PILLAR and DP-prototype references. ``--main_workdir`` names a finished ``adamix-train`` run
of the SAME config (checked against its config.json): its references and
its AdaMix row are read from its results.json instead of being recomputed
(the paragon's cross-validation takes minutes on the larger datasets).
A last row runs AdaMix's optimiser with the noise switched off (method
``zero_noise``: same clipping, geometry and rules at sigma = 0; not
private): how close the optimiser itself gets to the paragon. Writes
WORKDIR/ablation.md and ablation.json.
"""

from __future__ import annotations

import copy
import os

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

# name -> (config overrides, what it tests). The default is AdaMix-W (the
# noise-aware rules, adamix/noise_aware.py); each row switches one of its
# components off, or swaps in the wave-1 (paper-style) choice.
VARIANTS = {
    "adamix (defaults)": ({}, "the configured AdaMix"),
    "no public init": ({"adamix.public_init": False},
                       "start from zero, not w_0"),
    "no whitened geometry": ({"adamix.geometry": "none"},
                             "train W~ in x~, not V in the public geometry"),
    "set-size public weight": ({"adamix.public_weight_rule": "set_size"},
                               "alpha = n / (n + N) (the paper's)"),
    "no public-gradient mixing": ({"adamix.public_weight_rule": "constant",
                                   "adamix.public_weight": 0.0},
                                  "private gradient only (alpha = 0)"),
    "last iterate": ({"train.average_tail": 0.0},
                     "release the last iterate, not the tail average"),
    "+ pull to w_0 (0.01)": ({"adamix.pull": 0.01},
                             "lambda (w - w_0) towards w_0"),
    "wave-1 AdaMix (fixed schedule)": (
        {"train.schedule": "fixed", "adamix.adaptive_threshold": True,
         "adamix.normalize_by_threshold": True,
         "adamix.public_weight_rule": "set_size"},
        "Poisson q = 0.1, 50 epochs, public-median C_t, lr / C_t"),
}
REFERENCES = (("DP-SGD (reference)", "dp_sgd"), ("PILLAR (reference)", "pillar"),
              ("DP prototypes (reference)", "dp_prototypes"))


def variant_config(base, overrides: dict, with_references: bool):
  config = copy.deepcopy(base)
  with config.unlocked():
    for key, value in overrides.items():
      *parents, leaf = key.split(".")
      target = config
      for parent in parents:
        target = target[parent]
      target[leaf] = value
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
  command = cli.typed_command("python -m " + PROG)
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
  if ("zero_noise", None) not in references:
    # The convergence diagnostic: AdaMix's optimiser, same rules, no noise.
    print("== zero noise: AdaMix's optimiser without noise (not private)",
          flush=True)
    config = variant_config(base, {}, with_references=False)
    with config.unlocked():
      config.methods = ("zero_noise",)
    references.update(report.mean_errors(stages.run(
        config, os.path.join(_WORKDIR.value, "zero_noise"), command=command,
        plot=False)))
  paragon = references.get(("paragon", None), (np.nan,))[0]
  lines = [f"# AdaMix ablation: {base.dataset}", "", f"- command: `{command}`",
           f"- seeds: {list(base.seeds)}; test error % (mean over seeds), "
           "increase vs paragon in brackets", "",
           "| variant | " + " | ".join(f"eps={e:g}" for e in base.epsilons) +
           " |", "|---|" + "---|" * len(base.epsilons)]
  for name, key in REFERENCES:
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
  zero = references[("zero_noise", None)][0]
  lines.append(f"| AdaMix, zero noise (diagnostic, not private) | " +
               " | ".join(f"{100 * zero:.2f} "
                          f"({report.error_increase(zero, paragon):+.0f}%)"
                          for _ in base.epsilons) + " |")
  if ("public_only", None) in references:
    lines.append("")
    lines.append(f"Paragon {100 * paragon:.2f}%, public-only "
                 f"{100 * references[('public_only', None)][0]:.2f}%.")
  text = "\n".join(lines) + "\n"
  print(text)
  io.save_text(os.path.join(_WORKDIR.value, "ablation.md"), text)
  io.save_json(os.path.join(_WORKDIR.value, "ablation.json"),
               rows + [{"variant": "zero noise", "meaning": "AdaMix's "
                        "optimiser without noise (not private)",
                        "overrides": {}, "adamix_error": {
                            str(e): zero for e in base.epsilons}}])


def run() -> None:
  cli.run_with_config(PROG, main, "Dataset config: a packaged name or a "
                      "config file.")


if __name__ == "__main__":
  run()
