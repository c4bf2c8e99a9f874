"""The 'analysis' stage of issue #13 and its pieces.

Isolation is measured from features only: the nearest public example of the
same class (inf when the class has none) and the mean distance to the k
nearest other private examples (never the example itself). The stage, run
with ``--stages analysis`` on a finished workdir, turns the counts each
private run recorded into individual epsilons (never above the run's
epsilon) and writes the per-example table, the two figures and a summary
whose test errors are the report's.
"""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from adamix_jax import io
from adamix_jax.analysis import isolation
from adamix_jax.analysis import report
from adamix_jax.analysis import stage as analysis_stage
from adamix_jax.configs import digits
from adamix_jax.experiment import stages

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def test_individual_privacy_isolation_nearest_public_of_same_class_only():
  x = np.array([[0.0, 0.0], [10.0, 0.0], [5.0, 5.0]])
  y = np.array([0, 1, 2])
  public_x = np.array([[1.0, 0.0], [9.0, 0.0], [0.0, 3.0]])
  public_y = np.array([1, 0, 0])  # the closest public point is of class 1
  got = isolation.nearest_public_distance(x, y, public_x, public_y)
  assert got[0] == pytest.approx(3.0)  # class-0 publics at (9,0) and (0,3)
  assert got[1] == pytest.approx(9.0)  # the class-1 public at (1,0)
  assert math.isinf(got[2])  # class 2 has no public example


def test_individual_privacy_isolation_knn_excludes_self_not_duplicates():
  x = np.array([[0.0], [0.0], [1.0], [3.0]])
  got = isolation.knn_distance(x, x, k=2, exclude_self=True)
  # Row 0: its duplicate (0) and 1.0 -> mean 0.5; row 3: 2 and 3 -> 2.5.
  np.testing.assert_allclose(got, [0.5, 0.5, 1.0, 2.5])
  # k larger than the candidates: the mean over those there are.
  np.testing.assert_allclose(
      isolation.knn_distance(x[:2], x[:2], k=5, exclude_self=True), [0, 0])
  assert np.all(np.isinf(isolation.knn_distance(x[:1], x[:1], 3, True)))
  # Without exclusion (test examples against the private set).
  np.testing.assert_allclose(isolation.knn_distance(np.array([[2.0]]), x, 1),
                             [1.0])


def test_individual_privacy_isolation_chunks_agree_with_direct(monkeypatch):
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(50, 4)), rng.integers(0, 3, 50)
  public_x, public_y = rng.normal(size=(9, 4)), np.arange(9) % 3
  full = isolation.private_isolation(x, y, public_x, public_y, k=3)
  monkeypatch.setattr(isolation, "_CHUNK", 7)
  chunked = isolation.private_isolation(x, y, public_x, public_y, k=3)
  np.testing.assert_allclose(chunked.nearest_public, full.nearest_public)
  np.testing.assert_allclose(chunked.knn_private, full.knn_private)
  distances = np.linalg.norm(x[:, None] - x[None], axis=2)
  np.fill_diagonal(distances, np.inf)
  np.testing.assert_allclose(full.knn_private,
                             np.sort(distances, axis=1)[:, :3].mean(axis=1))


def test_individual_privacy_quantile_bins_equal_counts_inf_last():
  values = np.array([5.0, np.inf, 1.0, 3.0, 2.0, 4.0, np.nan, 0.0, 6.0, 7.0])
  bins = isolation.quantile_bins(values, 5)
  assert np.bincount(bins).tolist() == [2, 2, 2, 2, 2]
  assert bins[1] == 4 and bins[6] == 4  # inf and NaN: most isolated
  assert bins[7] == 0 and bins[2] == 0
  correct = np.array([1, 0, 1, 1, 1, 1, 0, 1, 0, 1], bool)
  result = isolation.error_by_isolation_quantile(values, correct, 5)
  np.testing.assert_allclose(result.error, [0, 0, 0, 0.5, 1.0])
  assert result.count.tolist() == [2] * 5


def _run(method, eps, n=30, seed=0):
  rng = np.random.default_rng(seed)
  iso = isolation.IsolationMeasures(rng.uniform(0, 2, n), rng.uniform(0, 1, n))
  individual = np.minimum(eps, eps * iso.knn_private + rng.uniform(0, .1, n))
  return report.RunAnalysis(
      method=method, epsilon=eps, seed=seed, index=np.arange(n),
      label=rng.integers(0, 3, n), isolation=iso,
      individual_epsilon=individual, individual_epsilon_rdp=individual * 1.1,
      worst_case_epsilon=eps, correct=rng.uniform(size=n) < 0.8)


def test_individual_privacy_table_has_one_row_per_example(tmp_path):
  runs = [_run("dp_sgd", 1.0), _run("adamix", 1.0, seed=1)]
  path = tmp_path / "table.csv"
  assert report.write_per_example_table(str(path), runs) == 60
  with open(path) as f:
    rows = list(csv.DictReader(f))
  assert tuple(rows[0]) == report.TABLE_COLUMNS
  assert len(rows) == 60
  first = rows[0]
  assert first["method"] == "dp_sgd" and first["index"] == "0"
  assert float(first["individual_epsilon"]) == runs[0].individual_epsilon[0]
  assert first["correct_under_final_model"] in ("0", "1")
  with pytest.raises(ValueError, match="individual_epsilon"):
    report.RunAnalysis(**{**runs[0].__dict__,
                          "individual_epsilon": np.zeros(3)})


def test_individual_privacy_error_curves_average_the_seeds_own_quintiles():
  values = np.arange(10.0)
  wrong_on_top = np.arange(10) < 8  # the two most isolated are wrong
  tests = [report.TestSet(seed=s, isolation=isolation.IsolationMeasures(
      values[::sign], values), correct={("paragon", None): wrong_on_top})
           for s, sign in ((0, 1), (1, -1))]
  curves = report.error_by_isolation(tests, num_bins=5)
  nearest = curves["nearest_public"][("paragon", None)]
  # Seed 0: both errors in the top quintile; seed 1 (reversed isolation):
  # in the bottom one. The mean is taken per quintile, after binning.
  np.testing.assert_allclose(nearest.error, [[0, 0, 0, 0, 1], [1, 0, 0, 0, 0]])
  np.testing.assert_allclose(nearest.mean, [0.5, 0, 0, 0, 0.5])
  assert nearest.seeds == (0, 1) and nearest.count.tolist() == [[2] * 5] * 2
  np.testing.assert_allclose(curves["knn_private"][("paragon", None)].mean,
                             [0, 0, 0, 0, 1])


def test_individual_privacy_figures_and_summary(tmp_path):
  runs = [_run(m, e, seed=s) for s, (m, e) in enumerate(
      [("dp_sgd", 1.0), ("adamix", 1.0), ("dp_sgd", 3.0), ("adamix", 3.0)])]
  runs[1].isolation.nearest_public[0] = np.inf  # a class without publics
  report.plot_epsilon_vs_isolation(runs, str(tmp_path / "eps.png"))
  rng = np.random.default_rng(9)
  tests = [report.TestSet(
      seed=s, isolation=isolation.IsolationMeasures(rng.uniform(size=40),
                                                    rng.uniform(size=40)),
      correct={(m, e): rng.uniform(size=40) < 0.7 for m, e in
               [("paragon", None), ("public_only", None), ("dp_sgd", 1.0),
                ("adamix", 1.0), ("dp_sgd", 3.0), ("adamix", 3.0)]})
           for s in (0, 1)]
  curves = report.error_by_isolation(tests)
  report.plot_error_by_isolation(curves, str(tmp_path / "err.png"))
  for name in ("eps.png", "err.png"):
    assert (tmp_path / name).read_bytes()[:8] == PNG
  assert curves["knn_private"][("paragon", None)].count.sum() == 80
  summary = report.summarize(runs, curves)
  first = summary["runs"][0]
  assert first["individual_epsilon_median"] == pytest.approx(
      np.median(runs[0].individual_epsilon))
  # The synthetic epsilons grow with knn isolation by construction.
  assert first["spearman_with_isolation"]["knn_private"] > 0.8
  assert len(summary["test_error_by_isolation_quantile"]["knn_private"]) == 6
  json.dumps(summary)  # JSON-ready


# --- the stage, end to end on a small digits run -----------------------------

_OVERRIDES = ("--config.seeds=0", "--config.epsilons=1,8",
              "--config.train.epochs=3", "--config.train.sampling_rate=1.0",
              "--config.cv_folds=2", "--config.progress=False",
              "--config.methods=paragon,public_only,dp_sgd,adamix",
              "--config.rules.min_steps=3", "--config.rules.max_steps=3",
              "--config.analysis.individual_levels=20")


def _small_config():
  config = digits.get_config()
  config.seeds, config.epsilons = (0,), (1.0, 8.0)
  # Full batch (noisy GD, T = 3 by the rules' bounds): one padded shape to
  # compile per run and a cheap calibration, as in test_launcher; the
  # library tests take q < 1. The two methods the analysis compares.
  config.methods = ("paragon", "public_only", "dp_sgd", "adamix")
  config.train.epochs, config.train.sampling_rate = 3, 1.0
  config.rules.min_steps = config.rules.max_steps = 3
  config.cv_folds, config.progress = 2, False
  config.analysis.individual_levels = 20  # a cheap RDP table
  return config


@pytest.fixture(scope="module")
def digits_workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("individual") / "run")
  records = stages.run(_small_config(), workdir)  # the default stages
  return workdir, records


def test_individual_privacy_private_stage_saves_counts_not_analysis(
    digits_workdir):
  workdir, _ = digits_workdir
  assert not os.path.exists(os.path.join(workdir, "analysis"))  # not default
  for method in ("dp_sgd", "adamix"):
    for eps in (1.0, 8.0):
      out = stages.Workdir(workdir).run_dir(method, 0, eps)
      counts = io.load_npz(os.path.join(out, stages.INDIVIDUAL_COUNTS))
      assert counts["counts"].shape[1] == 21
      assert np.all(counts["counts"].sum(axis=1) == 3)  # every step
      assert int(counts["measured_steps"]) == 3
      assert not os.path.exists(os.path.join(out, "checkpoints"))


def test_individual_privacy_analysis_stage_from_the_command_line(
    digits_workdir):
  """``adamix-train --workdir W --stages analysis`` on the finished run:
  the table, both figures and the summary; every individual epsilon is at
  most its run's epsilon (the accounting stage's), some are below, and the
  test errors behind the error figure are the report's."""
  workdir, records = digits_workdir
  command = [sys.executable, "-m", "adamix_jax.launch.main", "--workdir",
             workdir, "--config", "digits", *_OVERRIDES,
             "--stages", "analysis"]
  result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  out = pathlib.Path(workdir) / "analysis"
  for name in (analysis_stage.EPSILON_FIGURE, analysis_stage.ERROR_FIGURE):
    assert (out / name).read_bytes()[:8] == PNG
  with open(out / analysis_stage.TABLE) as f:
    rows = list(csv.DictReader(f))
  spent = {(e["method"], e["epsilon"]): e["epsilon_spent"]
           for e in io.load_json(os.path.join(workdir, "accounting.json"))}
  num_private = len(stages.load_seed(_small_config(), stages.Workdir(workdir),
                                     0).private_y)
  assert len(rows) == 4 * num_private  # 2 methods x 2 epsilons x N
  below = 0
  for row in rows:
    worst = float(row["worst_case_epsilon"])
    assert worst == spent[(row["method"], float(row["epsilon"]))]
    assert 0 <= float(row["individual_epsilon"]) <= worst
    below += float(row["individual_epsilon"]) < worst
    assert not math.isnan(float(row["isolation_knn_private"]))
  assert below > 0
  summary = json.loads((out / analysis_stage.SUMMARY).read_text())
  assert len(summary["runs"]) == 4 and not summary["runs_without_counts"]
  assert all(run["steps"] == 3 for run in summary["runs"])
  errors = {(r["method"], r["epsilon"]): r["test_error"] for r in records}
  for curve in summary["test_error_by_isolation_quantile"]["nearest_public"]:
    error = np.asarray(curve["error_per_seed"][0])
    count = np.asarray(curve["count_per_seed"][0])
    assert (error * count).sum() / count.sum() == pytest.approx(
        errors[(curve["method"], curve["epsilon"])], abs=1e-9)


def test_individual_privacy_analysis_leaves_out_runs_without_counts(
    digits_workdir, tmp_path):
  workdir, _ = digits_workdir
  copy = str(tmp_path / "copy")
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(workdir, copy)
  missing = stages.Workdir(copy).run_dir("adamix", 0, 8.0)
  os.remove(os.path.join(missing, stages.INDIVIDUAL_COUNTS))
  summary = analysis_stage.run_analysis(_small_config(), stages.Workdir(copy))
  assert summary["runs_without_counts"] == [missing]
  assert {(r["method"], r["epsilon"]) for r in summary["runs"]} == {
      ("dp_sgd", 1.0), ("dp_sgd", 8.0), ("adamix", 1.0)}
  # The error figure still covers every method.
  assert len(summary["test_error_by_isolation_quantile"]["knn_private"]) == 6


def test_analysis_figures_give_every_default_method_its_own_colour():
  """Every method the default config runs has a label and a colour of its
  own in the figures and tables (PILLAR once fell to matplotlib's cycle and
  drew in DP-SGD's blue, and the tables script refused its name)."""
  methods = set(digits.get_config().methods)
  assert methods <= set(report.METHOD_LABELS)
  assert methods <= set(report.METHOD_COLORS)
  colours = [report.METHOD_COLORS[m] for m in methods]
  assert len(set(colours)) == len(colours)
