"""The launcher: stages end to end on real data (digits), its output contract,
resuming, and the errors that stop a bad run before any work is done.

Output contract: WORKDIR/results.json is a list with one record per
(method, epsilon, seed), keys ``RESULT_KEYS``; epsilon (and what depends on
it) is None for the non-private methods; WORKDIR/results.md holds the table.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from adamix_jax.privacy import accounting
from adamix_jax.experiment import report
from adamix_jax.experiment import stages
from adamix_jax.experiment import workdir as workdir_lib
from adamix_jax.configs import digits

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULT_KEYS = {"dataset", "method", "epsilon", "delta", "seed",
               "public_per_class", "test_error", "epsilon_spent",
               "noise_multiplier", "steps", "sampling_rate"}
# Documented extras a record may carry besides the contract.
OPTIONAL_KEYS = {"epsilon_spent_rdp", "insecure_reproducible_noise",
                 "private_examples", "public_examples"}
EPSILONS = (1.0, 8.0)


def _small_config(**overrides):
  config = digits.get_config()
  config.seeds = (0,)
  config.epsilons = EPSILONS
  # The noise-aware rules (the default) with T capped at 12: full-batch
  # noisy GD, one shape to compile per run and a cheap calibration. The
  # fixed Poisson schedule runs end to end in test_launcher_cli_runs.
  config.rules.min_steps = 4
  config.rules.max_steps = 12
  config.cv_folds = 2
  config.progress = False
  for name, value in overrides.items():
    target = config
    *parents, leaf = name.split(".")
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


def _snapshot(root) -> dict[str, int]:
  """Relative path -> mtime_ns of every output file under ``root`` (the
  workdir's lock file only names its holder)."""
  out = {}
  for directory, _, files in os.walk(root):
    for name in files:
      if name == ".lock":
        continue
      path = os.path.join(directory, name)
      out[os.path.relpath(path, root)] = os.stat(path).st_mtime_ns
  return out


def _key(record):
  return record["method"], record["epsilon"], record["seed"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
  """One small digits run (all stages), shared by the tests of this file."""
  workdir = str(tmp_path_factory.mktemp("digits_run"))
  config = _small_config()
  records = stages.run(config, workdir)
  return config, workdir, records


def test_launcher_end_to_end_digits_small(digits_run):
  config, workdir, records = digits_run
  with open(os.path.join(workdir, "results.json")) as f:
    saved = json.load(f)
  assert isinstance(saved, list)
  assert saved == json.loads(json.dumps(records))  # returned == written
  expected = {("paragon", None, 0), ("public_only", None, 0)}
  expected |= {(m, eps, 0) for m in stages.DP_METHODS for eps in EPSILONS}
  assert sorted(map(_key, saved), key=str) == sorted(expected, key=str)
  steps = {}  # (method, epsilon) -> T, as the rules planned it
  for record in saved:
    keys = set(record)
    assert RESULT_KEYS <= keys, (record, RESULT_KEYS - keys)
    assert keys - RESULT_KEYS <= OPTIONAL_KEYS, keys - RESULT_KEYS
    assert record["dataset"] == "digits"
    assert record["public_per_class"] == config.public_per_class
    assert isinstance(record["test_error"], float)
    assert 0.0 <= record["test_error"] <= 1.0
    if record["method"] in stages.DP_METHODS:
      assert isinstance(record["epsilon"], float)
      assert record["delta"] == config.delta
      assert 0 < record["epsilon_spent"] <= record["epsilon"], record
      assert record["noise_multiplier"] > 0
      if record["method"] == "dp_prototypes":  # one release
        assert record["steps"] == 1
      else:
        assert (config.rules.min_steps <= record["steps"]
                <= config.rules.max_steps), record
      steps[record["method"], record["epsilon"]] = record["steps"]
      assert record["sampling_rate"] == 1.0  # full batch
    else:
      for key in ("epsilon", "delta", "epsilon_spent", "noise_multiplier",
                  "steps", "sampling_rate"):
        assert record[key] is None, (record["method"], key)
  errors = {_key(r): r["test_error"] for r in saved}
  # Real data, real signal: the non-private paragon (all training data)
  # beats the few-shot public model.
  assert errors["paragon", None, 0] < errors["public_only", None, 0]

  with open(os.path.join(workdir, "results.md")) as f:
    table = f.read()
  assert "| epsilon |" in table
  for eps in EPSILONS:
    rows = [line for line in table.splitlines()
            if line.startswith(f"| {eps:g} |")]
    assert len(rows) == 1, (eps, table)
  # The privacy of each run: epsilon spent, sigma, steps, q, set sizes.
  assert ("| method | epsilon | seed | epsilon spent | epsilon spent (RDP) "
          "| sigma | steps | q | private examples | public examples |") in table
  titles = dict(report.COLUMNS)
  for record in saved:
    if record["method"] in stages.DP_METHODS:
      assert record["private_examples"] > 1000
      assert record["public_examples"] == 10 * config.public_per_class
      row = (f"| {titles[record['method']]} | "
             f"{record['epsilon']:g} | 0 | {record['epsilon_spent']:.3f} | "
             f"{record['epsilon_spent_rdp']:.3f} | "
             f"{record['noise_multiplier']:.3f} | {record['steps']} | 1 | "
             f"{record['private_examples']} | {record['public_examples']} |")
      assert row in table, (row, table)
  # The header: the data and the fields that differ from base.py (short);
  # the whole config at the end.
  assert "rules.max_steps=12" in table and "cv_folds=2" in table
  assert "train.learning_rate" not in table.split("## Test error")[0]
  assert '"learning_rate": 2.0' in table
  # The main job draws the privacy-utility plot.
  with open(os.path.join(workdir, stages.PLOT_FILE), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"

  with open(os.path.join(workdir, "accounting.json")) as f:
    spent = json.load(f)
  assert len(spent) == len(stages.DP_METHODS) * len(EPSILONS)
  for entry in spent:
    assert entry["within_budget"]
    assert entry["steps"] == steps[entry["method"], entry["epsilon"]]
    ledger = accounting.PrivacyLedger.load(os.path.join(
        stages.Workdir(workdir).run_dir(entry["method"], entry["seed"],
                                        entry["epsilon"]), "ledger.json"))
    assert ledger.total_steps == entry["steps"]
    assert ledger.target_epsilon == entry["epsilon"]
  assert os.path.exists(os.path.join(workdir, "config.json"))


def test_launcher_resume_skips_finished_runs(digits_run, tmp_path):
  config, workdir, records = digits_run
  copy = str(tmp_path / "resumed")
  shutil.copytree(workdir, copy)  # copy2: mtimes preserved
  wd = stages.Workdir(copy)
  redo = os.path.relpath(
      os.path.join(wd.run_dir("adamix", 0, 1.0), "params.npz"), copy)
  os.remove(os.path.join(copy, redo))
  before = _snapshot(copy)
  # Only ``progress`` differs: it is not part of the saved config, so the
  # same workdir is accepted.
  rerun = stages.run(_small_config(progress=True), copy)
  after = _snapshot(copy)
  assert redo in after
  untouched = [p for p in before
               if p.startswith(("features", "public_init", "private"))
               and not p.startswith(os.path.dirname(redo))]
  assert any(p.endswith("params.npz") for p in untouched)
  for path in untouched:
    assert after[path] == before[path], f"{path} was recomputed"
  by_key = {_key(r): r for r in json.loads(json.dumps(records))}
  rerun = json.loads(json.dumps(rerun))
  assert len(rerun) == len(by_key)
  redone = ("adamix", 1.0, 0)
  for record in rerun:
    # Untouched runs are read back as they were; the recomputed one drew
    # fresh secret coins, so only its test error may differ.
    expected = dict(by_key[_key(record)])
    if _key(record) == redone:
      expected["test_error"] = record["test_error"]
    assert record == expected, _key(record)


def test_launcher_refuses_different_config_in_same_workdir(digits_run):
  _, workdir, _ = digits_run
  before = _snapshot(workdir)
  with pytest.raises(workdir_lib.ConfigMismatchError, match="cv_folds"):
    stages.run(_small_config(cv_folds=3), workdir)
  with pytest.raises(workdir_lib.ConfigMismatchError, match="train"):
    stages.run(_small_config(**{"train.epochs": 4}), workdir)
  with pytest.raises(workdir_lib.ConfigMismatchError, match="rules"):
    stages.run(_small_config(**{"rules.kappa": 10.0}), workdir)
  assert _snapshot(workdir) == before  # nothing in the workdir was changed


def test_launcher_unknown_method_lists_known_ones(tmp_path):
  workdir = tmp_path / "unknown_method"
  config = _small_config(methods=("adamix", "dp-sgd"))
  with pytest.raises(ValueError) as info:
    stages.run(config, str(workdir))
  message = str(info.value)
  assert "dp-sgd" in message
  for method in stages.METHODS:
    assert method in message
  assert not workdir.exists()


def test_launcher_rejects_large_delta(tmp_path):
  # digits: about 1200 private examples, so delta = 1e-3 >= 1 / n_private.
  workdir = tmp_path / "large_delta"
  config = _small_config(delta=1e-3, methods=("dp_sgd",), epsilons=(1.0,))
  with pytest.raises(ValueError, match="allow_large_delta"):
    stages.run(config, str(workdir))
  run_dir = stages.Workdir(str(workdir)).run_dir("dp_sgd", 0, 1.0)
  assert not os.path.exists(os.path.join(run_dir, "ledger.json"))
  assert not os.path.exists(os.path.join(run_dir, "params.npz"))


@pytest.mark.parametrize("epsilons", [(1.0, 0.0), (-1.0,)])
def test_launcher_rejects_bad_epsilon(tmp_path, epsilons):
  workdir = tmp_path / "bad_epsilon"
  with pytest.raises(ValueError, match="epsilon"):
    stages.run(_small_config(epsilons=epsilons), str(workdir))
  assert not workdir.exists()  # refused before any work


def test_launcher_cli_runs(tmp_path):
  workdir = tmp_path / "cli"
  # ml_collections parses a tuple override with ast.literal_eval and wraps a
  # scalar: --config.seeds=0 gives (0,), --config.epsilons=1 gives (1,).
  command = [sys.executable, "-m", "adamix_jax.launch.main", "--workdir",
             str(workdir), "--config", "digits", "--config.seeds=0",
             "--config.epsilons=1", "--config.train.schedule=fixed",
             "--config.methods=('paragon','public_only','dp_sgd','adamix')",
             "--config.train.epochs=2", "--config.cv_folds=2",
             "--config.progress=False"]
  result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  assert "| epsilon |" in result.stdout
  assert any(line.startswith("| 1 |") for line in result.stdout.splitlines())
  # The final summary: the epsilon spent by each private run.
  assert "| epsilon spent |" in result.stdout
  assert "Traceback" not in result.stderr
  with open(workdir / "results.json") as f:
    saved = json.load(f)
  assert sorted(map(_key, saved), key=str) == sorted(
      [("paragon", None, 0), ("public_only", None, 0), ("dp_sgd", 1.0, 0),
       ("adamix", 1.0, 0)], key=str)
  with open(workdir / "config.json") as f:
    saved_config = json.load(f)
  assert saved_config["seeds"] == [0] and saved_config["epsilons"] == [1]
  assert saved_config["train"]["epochs"] == 2
  default_rate = digits.get_config().train.sampling_rate  # Poisson, q < 1
  assert saved_config["train"]["sampling_rate"] == default_rate
  for record in saved:
    if record["method"] in stages.DP_METHODS:
      assert record["steps"] == max(1, round(2 / default_rate))
      assert 0 < record["epsilon_spent"] <= 1.0
  with open(workdir / "results.md") as f:
    text = f.read()
  # The command that made the numbers, as typed (the config's name, not the
  # path it resolved to).
  assert "adamix-train --workdir" in text and "--config digits " in text
