"""The ablation reuses a finished main run of the same config (its
references, whose paragon cross-validation takes minutes on real data, and
its default AdaMix) instead of recomputing them, and refuses one of another
config in one line.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from adamix_jax.configs import digits
from adamix_jax.experiment import report
from adamix_jax.experiment import stages

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = {"seeds": (0,), "epsilons": (8,), "cv_folds": 2}
TINY_RULES = {"min_steps": 4, "max_steps": 12}
TINY_FLAGS = ["--config.seeds=0", "--config.epsilons=8", "--config.cv_folds=2",
              "--config.rules.min_steps=4", "--config.rules.max_steps=12",
              "--config.progress=False"]


def _ablation(*args):
  env = dict(os.environ)
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  return subprocess.run([sys.executable, "-m", "experiments.ablation", *args],
                        cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600, check=False)


def test_ablation_reuses_a_finished_main_run(tmp_path):
  config = digits.get_config()
  for key, value in TINY.items():
    config[key] = value
  for key, value in TINY_RULES.items():
    config.rules[key] = value
  config.progress = False
  main = tmp_path / "main"
  records = stages.run(config, str(main), plot=False)
  main_means = report.mean_errors(records)
  out = tmp_path / "ablation"
  result = _ablation("--workdir", str(out), "--main_workdir", str(main),
                     "--variants=adamix (defaults),no whitened geometry",
                     *TINY_FLAGS)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = {r["variant"]: r for r in json.loads(
      (out / "ablation.json").read_text())}
  assert rows["adamix (defaults)"]["adamix_error"]["8"] == (
      main_means[("adamix", 8.0)][0])
  # Only the changed variant ran, and only AdaMix: no paragon, no baselines;
  # and the zero-noise diagnostic (the main run did not have it).
  assert sorted(os.listdir(out)) == ["ablation.json", "ablation.md",
                                     "variant_2", "zero_noise"]
  assert rows["zero noise"]["adamix_error"]["8"] < main_means[
      ("public_only", None)][0]  # the optimiser learns from the private data
  ran = json.loads((out / "variant_2" / "results.json").read_text())
  assert {r["method"] for r in ran} == {"adamix"}
  table = (out / "ablation.md").read_text()
  paragon = 100 * main_means[("paragon", None)][0]
  assert f"Paragon {paragon:.2f}%" in table
  # Another config's run cannot stand in: one line, exit 2.
  result = _ablation("--workdir", str(tmp_path / "other"), "--main_workdir",
                     str(main), *TINY_FLAGS[:-1], "--config.cv_folds=3")
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  assert "cv_folds: 2 -> 3" in result.stderr
  assert not (tmp_path / "other").exists()
