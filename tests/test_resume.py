"""Checkpoint/resume of the private stage, and the budget guard across it.

Guarantees checked (docs/design.md invariant 5: the ledger survives
checkpoints and resumes; a run refuses to start a step that would exceed the
target; invariant 6: the coins are secret and live in the checkpoint):

* a digits run killed by SIGKILL in the middle of its private stage resumes
  from its last checkpoint, with the secret coins stored there, and ends
  with the same parameters (1e-6) and the same epsilon_spent as a run that
  was never interrupted (given the same coins);
* a resumed run continues the checkpoint's ledger (never a fresh one), in
  the matrix and the dual form and on a mesh;
* a checkpoint is complete or ignored (an uncommitted orbax directory is
  not resumed from); an unreadable one stops the run with a clear error and
  is left in place; one from different inputs is refused (replaying the
  same noise on other data would leak their difference).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from adamix_jax.adamix import settings
from adamix_jax.privacy import accounting
from adamix_jax.privacy import randomness
from adamix_jax.train import checkpoint as checkpoint_lib
from adamix_jax import io
from adamix_jax.train import linear_head
from adamix_jax.experiment import stages
from adamix_jax.configs import digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ("private", "adamix", "eps_1", "seed_0")

# The killed run is slowed down (10 ms per sampled batch) so that the test
# can catch it between two checkpoints; the uninterrupted and the resumed run
# are not. Sleeping changes no value the run computes.
_DRIVER = """
import json, sys, time
from adamix_jax.privacy import sampler
from adamix_jax.experiment import recipe as recipe_lib
from adamix_jax.experiment import stages
from adamix_jax.configs import digits
batch = sampler.PoissonSampler.batch
def slow_batch(self, t):
  time.sleep(0.01)
  return batch(self, t)
sampler.PoissonSampler.batch = slow_batch
config = digits.get_config()
config.update_from_flattened_dict(json.loads(sys.argv[2]))
stages.run(config, sys.argv[1], stages=["private"])
"""

_OVERRIDES = {"methods": ("adamix",), "epsilons": (1.0,), "seeds": (0,),
              "progress": False, "train.checkpoint_every": 25}


def _config():
  config = digits.get_config()
  config.update_from_flattened_dict(dict(_OVERRIDES))
  return config


def _committed_steps(directory: str) -> list[int]:
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def test_secret_randomness_sigkill_resume_matches_uninterrupted_run(
    tmp_path, monkeypatch):
  """Killed mid-stage, the run resumes with the secret coins of its
  checkpoint: it ends where an uninterrupted run WITH THOSE COINS ends (a
  resume that drew fresh coins, or derived them from the seed, would not)."""
  config = _config()
  killed, clean = str(tmp_path / "killed"), str(tmp_path / "clean")
  stages.run(config, killed, stages=["features", "public_init"])
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one device, like the in-process runs below
  proc = subprocess.Popen(
      [sys.executable, "-c", _DRIVER, killed,
       json.dumps({k: list(v) if isinstance(v, tuple) else v
                   for k, v in _OVERRIDES.items()})],
      env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  run_dir = os.path.join(killed, *RUN)
  checkpoints = os.path.join(run_dir, "checkpoints")
  deadline = time.time() + 300
  try:
    while not any(s >= 100 for s in _committed_steps(checkpoints)):
      if proc.poll() is not None:
        pytest.fail("the run ended before it could be killed:\n" +
                    proc.stdout.read().decode()[-3000:])
      if time.time() > deadline:
        pytest.fail("no checkpoint at step >= 100 within 300 s")
      time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == -signal.SIGKILL
  # Killed in the middle of the private stage: no outputs, a checkpoint.
  assert not os.path.exists(os.path.join(run_dir, "params.npz"))
  assert not os.path.exists(os.path.join(run_dir, "ledger.json"))
  last = max(_committed_steps(checkpoints))
  assert last >= 100
  with checkpoint_lib.RunCheckpointer(checkpoints, every_steps=25) as ckpt:
    coins = ckpt.saved_coins()
  assert coins is not None and not coins.insecure  # OS entropy, not the seed

  stages.run(config, killed, stages=["private", "accounting"])
  # The uninterrupted reference run gets the same (secret) coins.
  monkeypatch.setattr(randomness.MechanismCoins, "fresh",
                      classmethod(lambda cls: coins))
  stages.run(config, clean, stages=["features", "public_init", "private",
                                    "accounting"])
  resumed_meta = io.load_json(os.path.join(run_dir, "meta.json"))
  assert resumed_meta["resumed_from_step"] >= last  # not restarted from 0
  assert io.load_json(os.path.join(clean, *RUN, "meta.json")
                      )["resumed_from_step"] is None
  for name in ("kernel", "bias"):
    np.testing.assert_allclose(
        io.load_npz(os.path.join(run_dir, "params.npz"))[name],
        io.load_npz(os.path.join(clean, *RUN, "params.npz"))[name],
        rtol=0, atol=1e-6)
  spent = [io.load_json(os.path.join(w, "accounting.json"))[0]
           for w in (killed, clean)]
  steps = resumed_meta["steps"]  # T planned by the rules (public data only)
  assert last < steps  # killed in the middle, not after the last step
  assert spent[0]["steps"] == spent[1]["steps"] == steps
  assert spent[0]["epsilon_spent"] == spent[1]["epsilon_spent"] <= 1.0
  # The finished run's checkpoints are removed; its outputs are the record.
  assert not os.path.exists(checkpoints)


# --- the library loop ----------------------------------------------------------


class _Crash(Exception):
  pass


def _problem(seed=0, n=240, n_pub=20, d=12, c=4):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  y = rng.integers(0, c, n)
  px = rng.normal(size=(n_pub, d)).astype(np.float32)
  py = np.arange(n_pub) % c
  anchor = {"kernel": rng.normal(size=(d, c)).astype(np.float32) * 0.1,
            "bias": np.zeros(c, np.float32)}
  return x, y, px, py, anchor


def _train(problem, directory, *, crash_at=None, representation="matrix",
           ledger=None, mesh=None, steps=40):
  x, y, px, py, anchor = problem
  config = settings.StepConfig(
      noise_multiplier=1.3, expected_batch_size=0.25 * len(y),
      learning_rate=0.5, adaptive_threshold=True, public_weight=0.1)
  ledger = ledger or accounting.PrivacyLedger(1e-5, target_epsilon=50.0)

  def on_step(t, _):
    if t == crash_at:
      raise _Crash()

  with checkpoint_lib.RunCheckpointer(directory, every_steps=7) as ckpt:
    params = linear_head.train_private_head(
        x, y, px, py, anchor, config, steps=steps, sampling_rate=0.25,
        coins=randomness.MechanismCoins.insecure_from_seed(3),
        ledger=ledger,
        subspace=settings.SubspaceSpec("gradients", 6, refresh_every=5,
                                       method="iterative"),
        lr_schedule="cosine", on_step=on_step,
        flags=settings.PerformanceFlags(representation=representation),
        mesh=mesh, checkpointer=ckpt)
  return params, ledger


@pytest.mark.parametrize("representation", ["matrix", "dual"])
def test_resume_continues_the_checkpoint_ledger_and_run(tmp_path,
                                                        representation):
  problem = _problem()
  reference, ref_ledger = _train(problem, str(tmp_path / "ref"),
                                 representation=representation)
  directory = str(tmp_path / "ckpt")
  with pytest.raises(_Crash):
    _train(problem, directory, crash_at=30, representation=representation)
  assert max(_committed_steps(directory)) == 28  # every 7 steps
  ledger = accounting.PrivacyLedger(1e-5, target_epsilon=50.0)  # a new process
  params, ledger = _train(problem, directory, representation=representation,
                          ledger=ledger)
  assert ledger.total_steps == ref_ledger.total_steps == 40  # 28 + 12, not 12
  assert ledger.epsilon() == ref_ledger.epsilon()
  for name in ("kernel", "bias"):
    np.testing.assert_allclose(params[name], reference[name], rtol=0,
                               atol=1e-6)
  # A crash after the last step, before the outputs were written: the rerun
  # restores the final checkpoint and takes no step.
  again, ledger = _train(problem, directory, representation=representation)
  assert ledger.total_steps == 40
  np.testing.assert_array_equal(again["kernel"], params["kernel"])


def test_resume_on_a_mesh_matches_one_device(tmp_path, meshes):
  problem = _problem()
  reference, _ = _train(problem, str(tmp_path / "ref"))
  directory = str(tmp_path / "ckpt")
  with pytest.raises(_Crash):
    _train(problem, directory, crash_at=20, mesh=meshes[1])
  params, ledger = _train(problem, directory, mesh=meshes[1])
  assert ledger.total_steps == 40
  for name in ("kernel", "bias"):
    np.testing.assert_allclose(params[name], reference[name], rtol=0,
                               atol=1e-5)


def test_resume_bad_input_partial_checkpoint_is_ignored(tmp_path):
  problem = _problem()
  directory = str(tmp_path / "ckpt")
  with pytest.raises(_Crash):
    _train(problem, directory, crash_at=16)
  # What a process killed while writing step 21 leaves behind: orbax's
  # temporary directory, never renamed to "21".
  shutil.copytree(os.path.join(directory, "14"),
                  os.path.join(directory, "21.orbax-checkpoint-tmp-1700000000"))
  with checkpoint_lib.RunCheckpointer(directory, every_steps=7) as ckpt:
    assert ckpt.latest_step() == 14
  reference, _ = _train(problem, str(tmp_path / "ref"))
  params, ledger = _train(problem, directory)
  assert ledger.total_steps == 40
  np.testing.assert_allclose(params["kernel"], reference["kernel"], atol=1e-6)


def test_resume_bad_input_unreadable_checkpoint_stops_and_keeps_files(tmp_path):
  problem = _problem()
  directory = str(tmp_path / "ckpt")
  with pytest.raises(_Crash):
    _train(problem, directory, crash_at=10)
  files = []
  for root, _, names in os.walk(os.path.join(directory, "7")):
    files += [os.path.join(root, n) for n in names]
  for path in files:  # truncate every file of the committed step
    if os.path.getsize(path) > 8:
      with open(path, "r+b") as f:
        f.truncate(4)
  before = sorted(files)
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match=r"cannot be read.*left in place"):
    _train(problem, directory)
  after = []
  for root, _, names in os.walk(os.path.join(directory, "7")):
    after += [os.path.join(root, n) for n in names]
  assert sorted(after) == before


def test_resume_refuses_a_checkpoint_from_different_private_data(tmp_path):
  problem = _problem()
  directory = str(tmp_path / "ckpt")
  with pytest.raises(_Crash):
    _train(problem, directory, crash_at=10)
  x, y, px, py, anchor = problem
  x = x.copy()
  x[0] += 1.0  # one private example changed
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match=r"different run.*private_data"):
    _train((x, y, px, py, anchor), directory)
  assert _committed_steps(directory) == [7]


def test_resume_never_resets_the_budget_guard(tmp_path):
  """The remaining steps are checked against the restored ledger: a target
  that the whole run fits passes, and one that only the remainder (counted
  from zero) would fit is refused."""
  problem = _problem()
  directory = str(tmp_path / "ckpt")
  with pytest.raises(_Crash):
    _train(problem, directory, crash_at=30)
  eps_full = accounting.compute_epsilon(1.3, 0.25, 40, 1e-5)
  eps_rest = accounting.compute_epsilon(1.3, 0.25, 40 - 28, 1e-5)
  between = (eps_full + eps_rest) / 2
  with pytest.raises(accounting.BudgetExceededError, match="over the target"):
    _train(problem, directory,
           ledger=accounting.PrivacyLedger(1e-5, target_epsilon=between))
  assert max(_committed_steps(directory)) == 28  # nothing lost


def test_resume_full_model_with_momentum_and_projection(tmp_path):
  """Any Flax model: params, optimiser state (momentum), key and the public
  basis come back; a crash-and-resume equals one uninterrupted run."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  from adamix_jax.models import cnn  # pylint: disable=g-import-not-at-top
  from adamix_jax.train import full_model  # pylint: disable=g-import-not-at-top
  digits_data = datasets.load_digits()
  x = (digits_data.images / 16.0).astype(np.float32)[..., None]
  y = digits_data.target.astype(np.int64)
  model = cnn.SmallCNN(channels=(4, 8), hidden=16)
  loss_fn = full_model.classification_loss(model)
  params = model.init(jax.random.key(1), x[:1])["params"]
  config = settings.StepConfig(
      noise_multiplier=1.1, expected_batch_size=0.1 * 300, clip_norm=1.0,
      adaptive_threshold=True)

  def train(directory, crash_at=None):
    ledger = accounting.PrivacyLedger(1e-5, target_epsilon=50.0)

    def on_step(t, _):
      if t == crash_at:
        raise _Crash()

    with checkpoint_lib.RunCheckpointer(directory, every_steps=4) as ckpt:
      out = full_model.train_full_model(
          loss_fn, params, x[100:400], y[100:400], x[:20], y[:20], config,
          optax.sgd(0.5, momentum=0.9), steps=10, sampling_rate=0.1,
          coins=randomness.MechanismCoins.insecure_from_seed(0),
          subspace=settings.SubspaceSpec("gradients", 4, refresh_every=3),
          ledger=ledger, on_step=on_step, checkpointer=ckpt)
    return out, ledger

  reference, _ = train(str(tmp_path / "ref"))
  directory = str(tmp_path / "ckpt")
  with pytest.raises(_Crash):
    train(directory, crash_at=6)
  assert max(_committed_steps(directory)) == 4  # resumes between refreshes
  resumed, ledger = train(directory)
  assert ledger.total_steps == 10
  for got, want in zip(jax.tree_util.tree_leaves(resumed),
                       jax.tree_util.tree_leaves(reference)):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
