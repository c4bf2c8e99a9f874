"""What the console scripts say when the input is wrong: one line on stderr,
``PROG: error: ...``, exit code 2, no traceback, nothing in the workdir
touched; what is a bug keeps its traceback. Also the config reference
(``--config_help``), comma lists, and the XLA setting for simulated CPU
devices.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from adamix_jax import configs
from adamix_jax.configs import digits
from adamix_jax.experiment import workdir as workdir_lib
from adamix_jax.launch import cli
from adamix_jax.launch import sweep_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def _env(**extra):
  env = dict(os.environ)
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  env.pop(cli.TRACEBACK_ENV, None)
  env.update(extra)
  return env


def _run(module, *args, timeout=300):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO,
                        env=_env(), capture_output=True, text=True,
                        timeout=timeout, check=False)


def _assert_one_line_error(result, prog, *fragments):
  assert result.returncode == cli.EXIT_USER_ERROR, (result.returncode,
                                                    result.stderr[-3000:])
  assert "Traceback" not in result.stderr, result.stderr
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith(f"{prog}: error: "), lines[0]
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])
  return lines[0]


def _snapshot(root) -> dict[str, tuple[int, bytes]]:
  """Every output file's mtime and bytes (not the lock, which only names
  the process holding the workdir)."""
  out = {}
  for directory, _, files in os.walk(root):
    for name in files:
      if name == ".lock":
        continue
      path = os.path.join(directory, name)
      with open(path, "rb") as f:
        out[path] = (os.stat(path).st_mtime_ns, f.read())
  return out


def test_cli_messages_bad_config_key(tmp_path):
  workdir = tmp_path / "run"
  result = _run("adamix_jax.launch.main", "--workdir", str(workdir),
                "--config.trian.epochs=3")
  line = _assert_one_line_error(result, "adamix-train", "trian",
                                "train.epochs", "--config_help")
  assert "has no field" in line
  assert not workdir.exists()  # refused before any work
  # A field of a dataset the config does not use: the hint names the
  # generic configs that declare it.
  result = _run("adamix_jax.launch.main", "--workdir", str(workdir),
                "--config", "digits", "--config.dataset_kwargs.data_dir=/x")
  _assert_one_line_error(result, "adamix-train", "dataset_kwargs.data_dir")


def test_cli_messages_mismatched_workdir(tmp_path):
  workdir = tmp_path / "run"
  other = digits.get_config()
  other.cv_folds = 3
  workdir.mkdir()
  workdir_lib.check_or_save_config(other, workdir_lib.Workdir(str(workdir)))
  (workdir / "features").mkdir()
  (workdir / "features" / "features.npz").write_bytes(b"earlier work")
  before = _snapshot(workdir)
  result = _run("adamix_jax.launch.main", "--workdir", str(workdir),
                "--config", "digits")
  _assert_one_line_error(result, "adamix-train", str(workdir),
                         "cv_folds: 3 -> 5", "new --workdir")
  assert _snapshot(workdir) == before  # nothing lost, nothing changed


def test_cli_messages_bad_values_and_stray_arguments(tmp_path):
  workdir = str(tmp_path / "run")
  _assert_one_line_error(
      _run("adamix_jax.launch.main", "--workdir", workdir,
           "--config.train.epochs=abc"), "adamix-train", "train.epochs")
  _assert_one_line_error(
      _run("adamix_jax.launch.main", "--workdir", workdir, "stray"),
      "adamix-train", "'stray'", "comma separated")
  _assert_one_line_error(
      _run("adamix_jax.launch.main", "--workdir", workdir, "--config",
           "no_such_config"), "adamix-train", "no_such_config", "digits")
  _assert_one_line_error(
      _run("adamix_jax.launch.main", "--workdir", workdir,
           "--config.methods=dp_sgd,adamx"), "adamix-train", "adamx",
      "dp_sgd")
  _assert_one_line_error(
      _run("adamix_jax.launch.main", "--workdir", workdir,
           "--config.epsilons=1,x"), "adamix-train", "config.epsilons",
      "--config.epsilons=1,8")
  # Where the data should be but is not: still one line, naming the fix.
  _assert_one_line_error(
      _run("adamix_jax.launch.main", "--workdir", workdir,
           "--config.dataset=image_folder",
           f"--config.dataset_kwargs.data_dir={tmp_path / 'missing'}"),
      "adamix-train", "missing", "<class>")
  assert not os.path.exists(os.path.join(workdir, "features", "features.npz"))


def test_cli_messages_sweep_refuses_space_separated_lists(tmp_path):
  # absl lists take ONE comma-separated value: "--seeds 0 1" used to run
  # seed 0 only, silently.
  result = _run("adamix_jax.launch.sweep", "--root", str(tmp_path),
                "--seeds", "0", "1", "--dry_run")
  _assert_one_line_error(result, "adamix-sweep", "'1'", "--seeds=0,1")
  result = _run("adamix_jax.launch.sweep", "--root", str(tmp_path),
                "--set", "train.epoch=3", "--dry_run")
  _assert_one_line_error(result, "adamix-sweep", "train.epoch")


def test_cli_messages_aggregate_without_results(tmp_path):
  result = _run("adamix_jax.experiment.aggregate", "--root", str(tmp_path))
  _assert_one_line_error(result, "adamix-aggregate", str(tmp_path))


def _raise_in_numpy():
  np.zeros(3).reshape(2, 2)


def test_cli_messages_bugs_keep_their_traceback():
  # A ValueError raised inside a library is a bug, not bad input.
  with pytest.raises(ValueError) as info:
    _raise_in_numpy()
  assert not cli.is_user_error(info.value)
  # The same type raised by adamix_jax's own validation is a user error.
  with pytest.raises(ValueError) as info:
    configs.check_overrides(digits.get_config(), ["--config.nope=1"],
                            "digits")
  assert cli.is_user_error(info.value)
  assert cli.is_user_error(workdir_lib.ConfigMismatchError("x"))
  assert not cli.is_user_error(RuntimeError("x"))
  # report_errors: a user error exits 2, a bug propagates.
  with pytest.raises(SystemExit) as exit_info:
    cli.report_errors("prog", configs.check_overrides, digits.get_config(),
                      ["--config.nope=1"], "digits")
  assert exit_info.value.code == cli.EXIT_USER_ERROR
  with pytest.raises(ValueError):
    cli.report_errors("prog", _raise_in_numpy)


def test_config_help_lists_fields_and_comma_lists_split():
  result = _run("adamix_jax.launch.main", "--config", "digits",
                "--config_help", "--config.methods=dp_sgd,adamix",
                "--config.seeds=0,1")
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  # every field, with its value and the comment of base.py
  assert "--config.train.epochs=50" in out and "T = epochs / q" in out
  assert "--config.adamix.threshold_quantile=0.5" in out
  assert "--config.dataset_kwargs.test_fraction=0.3" in out
  # comma-separated strings are split into a tuple of names
  assert "--config.methods=('dp_sgd', 'adamix')" in out
  assert "--config.seeds=(0, 1)" in out


def test_comma_lists_in_configs_and_sweep_overrides():
  config = digits.get_config()
  config.methods = ("dp_sgd,adamix",)
  configs.split_comma_lists(config)
  assert config.methods == ("dp_sgd", "adamix")
  config = digits.get_config()
  sweep_lib.apply_overrides(config, [("methods", "dp_sgd,adamix"),
                                     ("seeds", "4"), ("epsilons", "1,8")])
  assert config.methods == ("dp_sgd", "adamix")
  assert config.seeds == (4,) and config.epsilons == (1, 8)


def test_pod_command_is_built_from_parsed_flags():
  command = sweep_lib.pod_command([
      ("root", "/r"), ("seeds", ["0"]), ("processes", 1),
      ("epsilons", ["1", "8"]), ("set", "train.epochs=2"),
      ("set", "cv_folds=2"), ("data_parallel", True)])
  inner = command.split("--command=", 1)[1]
  assert "--seeds=0 " in inner and "--epsilons=1,8" in inner
  assert "--set=train.epochs=2 --set=cv_folds=2" in inner
  assert "--data_parallel" in inner and "--shard_by_jax_process" in inner
  assert "--processes" not in inner


_RENDEZVOUS = """
import sys, time
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, PartitionSpec as P
mesh = Mesh(np.array(jax.devices()[:2]), ("d",))
def late(i):  # device 0 reaches the all-reduce DELAY seconds late
  if int(i) == 0:
    time.sleep(float(sys.argv[1]))
  return np.int32(0)
def f(x):
  z = jax.pure_callback(late, jax.ShapeDtypeStruct((), jnp.int32),
                        jax.lax.axis_index("d"))
  return jax.lax.psum(x + z, "d")
g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("d"), out_specs=P(),
                          check_vma=False))
print("sum", float(g(jnp.arange(2.0))[0]))
"""


def test_simulated_devices_collective_timeout_is_raised(tmp_path):
  script = tmp_path / "rendezvous.py"
  script.write_text(_RENDEZVOUS)
  simulated = "--xla_force_host_platform_device_count=2"
  # What the launchers set (when devices are simulated, keeping the user's).
  configured = cli.xla_flags_with_cpu_collective_timeouts(simulated)
  for name, value in cli.CPU_COLLECTIVE_FLAGS.items():
    assert f"--{name}={value}" in configured
  assert cli.xla_flags_with_cpu_collective_timeouts(
      simulated + " --xla_cpu_collective_call_terminate_timeout_seconds=7"
  ).count("terminate_timeout") == 1
  assert cli.simulated_cpu_devices(configured) == 2
  # These flags are the ones that govern XLA's abort: with them at 1 + 2 s
  # a device 6 s late kills the process (SIGABRT), as the 20 + 40 s default
  # did on a loaded machine; with the launchers' values it waits.
  tight = (simulated + " --xla_cpu_collective_call_warn_stuck_timeout_seconds=1"
           " --xla_cpu_collective_call_terminate_timeout_seconds=2")
  for flags_value, expect_abort in ((tight, True), (configured, False)):
    result = subprocess.run([sys.executable, str(script), "6"], cwd=REPO,
                            env=_env(XLA_FLAGS=flags_value),
                            capture_output=True, text=True, timeout=300,
                            check=False)
    if expect_abort:
      assert result.returncode != 0 and "Termination timeout" in (
          result.stderr), result.stderr[-2000:]
    else:
      assert result.returncode == 0, result.stderr[-2000:]
      assert "sum 1.0" in result.stdout
