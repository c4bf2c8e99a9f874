"""Sweeps resume, and aggregation makes the table, the CSV and the plot.

The end-to-end test runs ``python -m adamix_jax.launch.sweep`` (data parallel over the
8 simulated devices) on 2 datasets x 2 epsilons x 2 seeds with tiny
settings: digits, and an npz of random projections of the digits features
made here (a second "dataset" with no extraction cost). It kills the first
run after its first point finished, re-runs to completion (finished points'
files untouched), then deletes one point's results and re-runs with 2
processes: only that point runs again, with the same numbers.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from sklearn import datasets
from sklearn import model_selection

from adamix_jax import io
from adamix_jax.experiment import aggregate
from adamix_jax.launch import sweep_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["train.epochs=2", "train.sampling_rate=1.0", "private_per_class=20",
        "delta=1e-3", "cv_folds=2", "rules.min_steps=4", "rules.max_steps=12"]


def _npz_dataset(tmp_path) -> str:
  """Digits features through a fixed random projection, as an npz config."""
  digits = datasets.load_digits()
  rng = np.random.default_rng(0)
  x = ((digits.data / 16.0) @ rng.normal(size=(64, 32)) / 8.0).astype(
      np.float32)
  x_tr, x_te, y_tr, y_te = model_selection.train_test_split(
      x, digits.target, test_size=0.3, random_state=1, stratify=digits.target)
  npz = tmp_path / "digits_rp.npz"
  np.savez(npz, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
  config = tmp_path / "digits_rp.py"
  config.write_text(
      "from adamix_jax.configs import base\n\n\n"
      "def get_config():\n"
      "  config = base.get_config()\n"
      "  config.dataset = 'npz'\n"
      f"  config.dataset_kwargs.path = {str(npz)!r}\n"
      "  config.dataset_label = 'digits_rp'\n"
      "  return config\n")
  return str(config)


def _sweep_command(root, npz_config, processes=1):
  command = [sys.executable, "-m", "adamix_jax.launch.sweep", f"--root={root}",
             "--configs=" + ",".join([
                 os.path.join(REPO, "adamix_jax", "configs", "digits.py"),
                 npz_config]),
             "--methods=paragon,public_only,dp_sgd,adamix",
             "--epsilons=1,3", "--seeds=0,1", f"--processes={processes}",
             "--data_parallel"]
  return command + [f"--set={s}" for s in TINY]


def _env():
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  return env


def _snapshot(root) -> dict[str, tuple[int, bytes]]:
  """Every results.json and params.npz under root: (mtime_ns, bytes)."""
  snap = {}
  for directory, _, files in os.walk(os.path.join(root, "points")):
    for name in files:
      if name in ("results.json", "params.npz"):
        path = os.path.join(directory, name)
        with open(path, "rb") as f:
          snap[path] = (os.stat(path).st_mtime_ns, f.read())
  return snap


def _results(root) -> list[str]:
  return [p for p in aggregate.find_results(root)
          if os.sep + "points" + os.sep in p]


def test_multidevice_sweep_writes_table_csv_png_and_resumes(tmp_path):
  root = str(tmp_path / "sweep")
  npz_config = _npz_dataset(tmp_path)
  command = _sweep_command(root, npz_config)
  # 1. Interrupted: killed once the first point has finished.
  first = subprocess.Popen(command, cwd=REPO, env=_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  while not _results(root) and first.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  first.send_signal(signal.SIGKILL)
  first.wait()
  finished_before = _snapshot(root)
  assert 1 <= len(_results(root)) < 12  # interrupted mid-sweep
  # 2. Re-run: resumes; what had finished is not touched.
  second = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=300)
  assert second.returncode == 0, second.stderr[-3000:]
  done = _snapshot(root)
  for path, value in finished_before.items():
    assert done[path] == value, path
  assert len(_results(root)) == 12  # 2 datasets x 2 seeds x (refs + 2 eps)
  assert "gcloud compute tpus tpu-vm ssh" in second.stdout
  summary = os.path.join(root, "summary")
  with open(os.path.join(summary, "results.md")) as f:
    table = f.read()
  assert "average over datasets" in table
  assert "## digits" in table and "## digits_rp" in table
  with open(os.path.join(summary, "results.csv")) as f:
    rows = list(csv.DictReader(f))
  # per dataset and seed: paragon, public-only, 2 methods x 2 epsilons
  assert len(rows) == 2 * 2 * (2 + 4)
  assert {r["dataset"] for r in rows} == {"digits", "digits_rp"}
  assert {r["epsilon"] for r in rows if r["method"] == "adamix"} == {"1.0",
                                                                     "3.0"}
  for r in rows:
    if r["epsilon"]:
      assert float(r["epsilon_spent"]) <= float(r["epsilon"])
  with open(os.path.join(summary, "privacy_utility.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # 3. One point's results lost: only that point runs again (2 processes).
  lost = os.path.join(root, "points", "digits_rp", "k5", "seed_1", "eps_3",
                      "results.json")
  old_records = io.load_json(lost)
  os.remove(lost)
  before = _snapshot(root)
  third = subprocess.run(_sweep_command(root, npz_config, processes=2),
                         cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=300)
  assert third.returncode == 0, third.stderr[-3000:]
  assert "12 points: 11 finished (skipped), 1 to run" in third.stdout
  after = _snapshot(root)
  assert set(after) == set(before) | {lost}
  for path, value in before.items():
    assert after[path] == value, path
  new_records = io.load_json(lost)
  assert [(r["method"], r["test_error"]) for r in new_records] == [
      (r["method"], r["test_error"]) for r in old_records]


def _record(dataset, method, epsilon, seed, error, k=5):
  return {"dataset": dataset, "method": method, "epsilon": epsilon,
          "delta": 1e-5 if epsilon else None, "seed": seed,
          "public_per_class": k, "test_error": error, "epsilon_spent": None,
          "epsilon_spent_rdp": None, "noise_multiplier": None, "steps": None,
          "sampling_rate": None}


def test_aggregate_average_over_datasets(tmp_path, capsys):
  # a: paragon 0.10, adamix(1) 0.20 -> +100%; b: paragon 0.20, adamix 0.30
  # -> +50%. Average +75%. Records split over two results.json files.
  a = [_record("a", "paragon", None, 0, 0.10),
       _record("a", "adamix", 1.0, 0, 0.18), _record("a", "adamix", 1.0, 1,
                                                     0.22)]
  b = [_record("b", "paragon", None, 0, 0.20),
       _record("b", "adamix", 1.0, 0, 0.30),
       _record("b", "public_only", None, 0, 0.40)]
  io.save_json(str(tmp_path / "runs" / "a" / "results.json"), a)
  io.save_json(str(tmp_path / "runs" / "b" / "deeper" / "results.json"), b)
  out = tmp_path / "out"
  aggregate.main(["--root", str(tmp_path / "runs"), "--out", str(out)])
  summary = aggregate.summary_table(aggregate.collect(str(tmp_path / "runs")))
  lines = {line.split("|")[1].strip(): line for line in summary.splitlines()
           if line.startswith("| ")}
  assert "+100%" in lines["a"] and "+50%" in lines["b"]
  average = lines["**average over datasets**"]
  assert "+75%" in average
  assert "+100% (1 of 2)" in average  # public-only exists for b only
  with open(out / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 6
  assert {r["source"] for r in rows} == {"a/results.json",
                                         "b/deeper/results.json"}
  assert (out / "privacy_utility.png").stat().st_size > 10_000
  assert "wrote plot" in capsys.readouterr().out


def test_sweep_points_grid_and_overrides(tmp_path):
  digits = os.path.join(REPO, "adamix_jax", "configs", "digits.py")
  points = sweep_lib.build_points(
      str(tmp_path), [digits], ["paragon", "adamix"], epsilons=[1, 8],
      seeds=[0, 1, 2], public_per_class=[5, 10],
      overrides=[sweep_lib.parse_override("train.epochs=3")])
  # k x seeds x (references + epsilons)
  assert len(points) == 2 * 3 * 3
  refs = [p for p in points if p.epsilon is None]
  assert {p.methods for p in refs} == {("paragon",)}
  assert {p.methods for p in points if p.epsilon} == {("adamix",)}
  assert len(sweep_lib.groups_of(points)) == 6
  point = [p for p in points if p.epsilon == 8 and p.public_per_class == 10
           and p.seed == 2][0]
  assert point.workdir == os.path.join(str(tmp_path), "points", "digits",
                                       "k10", "seed_2", "eps_8")
  config = sweep_lib.point_config(point)
  assert config.train.epochs == 3 and config.public_per_class == 10
  assert config.seeds == (2,) and config.epsilons == (8.0,)
  assert config.methods == ("adamix",) and config.dataset_label == "digits"
  with pytest.raises(KeyError):
    sweep_lib.apply_overrides(config, [("train.nope", "1")])
  shards = [sweep_lib.shard(sweep_lib.groups_of(points), 4, i)
            for i in range(4)]
  assert sum(len(s) for s in shards) == 6


def test_one_point_sweep_prints_few_lines_and_a_correct_pod_command(tmp_path):
  # Space-separated flag values, as a user types them: the pod command is
  # built from the parsed values (it once became "--seeds 0 1").
  root = str(tmp_path / "sweep")
  command = [sys.executable, "-m", "adamix_jax.launch.sweep", "--root", root,
             "--methods", "adamix", "--epsilons", "1", "--seeds", "0",
             "--processes", "1"] + [a for s in TINY for a in ("--set", s)]
  result = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = (result.stdout + result.stderr).splitlines()
  # It used to print 754 lines, 735 of them orbax INFO logs.
  assert len(lines) < 50, "\n".join(lines)
  assert not any(" INFO " in line or line.startswith("I1") for line in lines)
  assert "1 points: 0 finished (skipped), 1 to run" in result.stdout
  pod = [line for line in lines if "gcloud compute tpus" in line]
  assert len(pod) == 1
  inner = pod[0].split("--command=", 1)[1]
  assert f"--root={root}" in inner
  assert "--methods=adamix --epsilons=1 --seeds=0 " in inner
  assert "--set=train.epochs=2" in inner and "--shard_by_jax_process" in inner
  assert "--processes" not in inner
  with open(os.path.join(root, "summary", "privacy_utility.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
