"""Every entry point validates its inputs; a workdir notices changed data.

* ``entry_validation``: the library trainers (``train_private_head``,
  ``train_full_model``), the optax API (``dp_aggregate``, ``adamix()``,
  ``private_gradient``), the preprocessing and the accountant refuse what
  the launcher refuses, with an error naming the problem and the fix: a
  label/feature length mismatch (JAX would clamp the gather and let one row
  enter a batch several times), NaN rows, labels out of range or negative,
  public arrays of different lengths, a mask of the wrong length, features
  large enough to overflow a float32 normalisation (which used to turn every
  row into zeros), zero rows, epsilon 0.
* ``data_digest``: a workdir records a fingerprint of its source and refuses
  a rerun on changed data; the feature cache keys on the fingerprint.
* The low items: a checkpoint whose ledger does not match its step, a
  ledger shorter than its run, a second process in a busy workdir, and
  damaged files are refused with errors that name the file; nothing the
  user computed is deleted.
"""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adamix_jax import io
from adamix_jax import privacy
from adamix_jax.adamix import settings
from adamix_jax.adamix import transform
from adamix_jax.configs import digits
from adamix_jax.data import fingerprint
from adamix_jax.data import image_folder
from adamix_jax.experiment import stages
from adamix_jax.experiment import workdir as workdir_lib
from adamix_jax.features import cache
from adamix_jax.features import preprocess
from adamix_jax.privacy import accounting
from adamix_jax.privacy.randomness import MechanismCoins
from adamix_jax.train import checkpoint as checkpoint_lib
from adamix_jax.train import full_model
from adamix_jax.train import linear_head

D, C = 4, 3
CONFIG = settings.StepConfig(noise_multiplier=1.0, expected_batch_size=10.0)


def _linear_inputs(n=60, n_pub=9):
  rng = np.random.default_rng(0)
  return (rng.normal(size=(n, D)).astype(np.float32), np.arange(n) % C,
          rng.normal(size=(n_pub, D)).astype(np.float32), np.arange(n_pub) % C,
          {"kernel": np.zeros((D, C), np.float32),
           "bias": np.zeros(C, np.float32)})


def _train_head(x, y, xp, yp, w0, steps=2, **kwargs):
  return linear_head.train_private_head(
      x, y, xp, yp, w0, CONFIG, steps=steps, sampling_rate=0.2,
      ledger=accounting.PrivacyLedger(1e-5), **kwargs)


@pytest.mark.parametrize("case,message", [
    ("labels_longer", "lengths differ"),
    ("nan_private", "NaN or inf"),
    ("nan_public", "NaN or inf"),
    ("label_too_large", r"outside \[0, 3\)"),
    ("negative_label", "negative label"),
    ("public_lengths", "lengths differ"),
    ("anchor_shape", "bias has shape"),
])
def test_entry_validation_train_private_head(case, message):
  x, y, xp, yp, w0 = _linear_inputs()
  if case == "labels_longer":
    x = x[:-5]  # 60 labels, 55 feature rows
  elif case == "nan_private":
    x[7, 2] = np.nan
  elif case == "nan_public":
    xp[1] = np.inf
  elif case == "label_too_large":
    y = y.copy()
    y[3] = C
  elif case == "negative_label":
    yp = yp.copy()
    yp[0] = -1
  elif case == "public_lengths":
    yp = yp[:-2]
  elif case == "anchor_shape":
    w0 = {"kernel": w0["kernel"], "bias": np.zeros(C + 1, np.float32)}
  with pytest.raises(ValueError, match=message) as error:
    _train_head(x, y, xp, yp, w0)
  assert "9223372036854775807" not in str(error.value)


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(C)(nn.relu(nn.Dense(8)(x)))


@pytest.mark.parametrize("case,message", [
    ("lengths", "lengths differ"), ("nan", "NaN or inf"),
    ("label_too_large", r"outside \[0, 3\)"), ("nan_params", "NaN or inf"),
])
def test_entry_validation_train_full_model(case, message):
  x, y, xp, yp, _ = _linear_inputs()
  model = _MLP()
  params = model.init(jax.random.key(0), x[:1])["params"]
  if case == "lengths":
    y = y[:-1]
  elif case == "nan":
    x[0, 0] = np.nan
  elif case == "label_too_large":
    y = y.copy()
    y[0] = 7
  elif case == "nan_params":
    params = jax.tree_util.tree_map(lambda p: p.at[0].set(np.nan), params)
  with pytest.raises(ValueError, match=message):
    full_model.train_full_model(
        full_model.classification_loss(model), params, x, y, xp, yp, CONFIG,
        optax.sgd(0.1), steps=2, sampling_rate=0.2,
        ledger=accounting.PrivacyLedger(1e-5), model=model)


def test_entry_validation_optax_api_refuses_a_mask_of_the_wrong_length():
  grads = {"w": jnp.ones((6, 3))}
  tx = privacy.dp_aggregate(1.0, 1.0, 6.0, jax.random.key(0))
  with pytest.raises(ValueError, match="mask has shape"):
    tx.update(grads, tx.init(None), mask=jnp.ones(5))
  adamix = transform.adamix(CONFIG, key=jax.random.key(0))
  params = {"w": jnp.ones((3,))}
  with pytest.raises(ValueError, match="mask has shape"):
    adamix.update(grads, adamix.init(params), params, mask=jnp.ones(7))
  loss = lambda p, example: jnp.sum(p["w"] * example)
  with pytest.raises(ValueError, match="mask has shape"):
    privacy.private_gradient(loss, params, jnp.ones((6, 3)), jnp.ones(4),
                             jax.random.key(0), clip_norm=1.0,
                             noise_multiplier=1.0, normalizer=6.0)


def test_entry_validation_normalisation_cannot_overflow_and_refuses_zero_rows():
  rng = np.random.default_rng(1)
  public = rng.normal(size=(10, D))
  prep = preprocess.fit_preprocessor(public, "center", D)
  huge = np.float32(1e20) * rng.normal(size=(5, D)).astype(np.float32)
  out = prep(huge)  # float32 squares of 1e20 overflow; float64 does not
  np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
  assert np.all(np.isfinite(out))
  zero_row = np.concatenate([huge, prep.mean[None, :]])  # zero once centred
  with pytest.raises(ValueError, match=r"zero after centering \(rows \[5\]\)"):
    prep(zero_row)
  with pytest.raises(ValueError, match=r"NaN or inf \(rows \[2\]\)"):
    prep(np.where(np.arange(6)[:, None] == 2, np.nan, zero_row))


def test_entry_validation_calibration_and_config_refuse_bad_epsilons(tmp_path):
  with pytest.raises(ValueError, match="must be > 0"):
    accounting.calibrate_noise_multiplier(0.0, 1e-5, 0.1, 100)
  config = digits.get_config()
  config.epsilons = (1e6,)
  workdir = tmp_path / "huge_epsilon"
  with pytest.raises(ValueError, match="is above 100"):
    stages.run(config, str(workdir))
  assert not workdir.exists()  # refused before the features stage


# --- data digests ------------------------------------------------------------------


def _npz(path, seed):
  rng = np.random.default_rng(seed)
  np.savez(path, x_train=rng.normal(size=(40, 5)), y_train=np.arange(40) % 2,
           x_test=rng.normal(size=(10, 5)), y_test=np.arange(10) % 2)
  return str(path)


def _npz_config(path):
  config = digits.get_config()
  config.update(dataset="npz", seeds=(0,), methods=("public_only",),
                public_per_class=2, cv_folds=2, progress=False)
  config.dataset_kwargs = {"path": path}
  return config


def test_data_digest_workdir_refuses_changed_data(tmp_path, file_hashes):
  path = _npz(tmp_path / "data.npz", seed=0)
  workdir = str(tmp_path / "run")
  stages.run(_npz_config(path), workdir)
  recorded = io.load_json(os.path.join(workdir, "features", "source.json"))
  assert recorded["fingerprint"]
  stages.run(_npz_config(path), workdir)  # unchanged data: resumes fine
  before = file_hashes(workdir)
  _npz(tmp_path / "data.npz", seed=1)  # same name, shapes, labels; new data
  with pytest.raises(stages.DataChangedError, match="changed since"):
    stages.run(_npz_config(path), workdir)
  assert file_hashes(workdir) == before


def _folder(root, seed):
  pil = pytest.importorskip("PIL.Image")
  rng = np.random.default_rng(seed)
  for split in ("train", "test"):
    for name in ("cat", "dog"):
      os.makedirs(root / split / name, exist_ok=True)
      for i in range(3):
        pixels = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        pil.fromarray(pixels).save(root / split / name / f"{i}.png")
  return image_folder.ImageFolderSource(root, name="pets")


def test_data_digest_feature_cache_keys_on_the_content(tmp_path):
  a = _folder(tmp_path / "a", seed=0)
  b = _folder(tmp_path / "b", seed=1)  # same name, sizes and label order
  again = _folder(tmp_path / "a", seed=0)
  assert fingerprint.source_fingerprint(a) == fingerprint.source_fingerprint(
      again)
  assert fingerprint.source_fingerprint(a) != fingerprint.source_fingerprint(b)
  labels = a.split("train").labels
  keys = [cache.cache_key("pets", "train", "effnet", 224, None, labels,
                          fingerprint.source_fingerprint(s)) for s in (a, b)]
  assert keys[0] != keys[1]
  paths = [cache.entry_paths(str(tmp_path / "cache"), k) for k in keys]
  assert paths[0] != paths[1]


def test_data_digest_corrupt_image_names_the_file(tmp_path):
  source = _folder(tmp_path / "a", seed=0)
  broken = source.split("train").paths[1]
  with open(broken, "r+b") as f:
    f.truncate(20)
  with pytest.raises(ValueError, match=str(broken)):
    source.split("train")[1]


# --- ledgers, locks, damaged files ---------------------------------------------------


class _Crash(Exception):
  pass


def _crash_at(step):
  def on_step(t, _):
    if t == step:
      raise _Crash()
  return on_step


def test_entry_validation_checkpoint_ledger_must_match_its_step(tmp_path):
  x, y, xp, yp, w0 = _linear_inputs()
  directory = str(tmp_path / "ckpt")
  coins = MechanismCoins.insecure_from_seed(0)
  with checkpoint_lib.RunCheckpointer(directory, every_steps=3) as ckpt:
    with pytest.raises(_Crash):
      _train_head(x, y, xp, yp, w0, steps=8, checkpointer=ckpt, coins=coins,
                  on_step=_crash_at(4))
  meta_path = os.path.join(directory, "3", "meta", "metadata")
  with open(meta_path) as f:
    meta = json.load(f)
  meta["ledger"]["entries"][0]["steps"] = 1  # an edited checkpoint
  with open(meta_path, "w") as f:
    json.dump(meta, f)
  with checkpoint_lib.RunCheckpointer(directory, every_steps=3) as ckpt:
    with pytest.raises(checkpoint_lib.CheckpointError,
                       match="ledger of 1 steps"):
      _train_head(x, y, xp, yp, w0, steps=8, checkpointer=ckpt)
  assert os.path.exists(meta_path)  # left in place


def _small_digits(tmp_path):
  config = digits.get_config()
  config.update(seeds=(0,), methods=("dp_sgd",), epsilons=(1.0,),
                cv_folds=2, progress=False)
  config.train.epochs = 1
  return config, str(tmp_path / "run")


def test_entry_validation_accounting_refuses_a_ledger_shorter_than_its_run(
    tmp_path):
  config, workdir = _small_digits(tmp_path)
  stages.run(config, workdir, stages=("features", "public_init", "private"))
  path = os.path.join(stages.Workdir(workdir).run_dir("dp_sgd", 0, 1.0),
                      "ledger.json")
  ledger = accounting.PrivacyLedger.load(path)
  ledger.replace_entries([accounting.LedgerEntry(
      ledger.entries[0].noise_multiplier, ledger.entries[0].sampling_rate, 3)])
  ledger.save(path)
  with pytest.raises(accounting.BudgetExceededError,
                     match="does not cover the released model"):
    stages.run(config, workdir, stages=("accounting",))


def test_entry_validation_busy_workdir_is_refused(tmp_path, file_hashes):
  config, workdir = _small_digits(tmp_path)
  stages.run(config, workdir, stages=("features",))
  before = file_hashes(workdir)
  with workdir_lib.exclusive(workdir):  # another run holds the workdir
    with pytest.raises(workdir_lib.WorkdirBusyError,
                       match="Another process is running"):
      stages.run(config, workdir)
  assert file_hashes(workdir) == before
  stages.run(config, workdir, stages=("public_init",))  # free again


@pytest.mark.parametrize("name,damage", [
    ("meta.json", "truncate"), ("params.npz", "truncate"),
    ("params.npz", "empty"), ("config.json", "truncate")])
def test_entry_validation_damaged_files_are_named_and_kept(
    tmp_path, name, damage, file_hashes):
  config, workdir = _small_digits(tmp_path)
  stages.run(config, workdir, stages=("features", "public_init", "private",
                                      "accounting"))
  run_dir = stages.Workdir(workdir).run_dir("dp_sgd", 0, 1.0)
  path = (os.path.join(workdir, name) if name == "config.json"
          else os.path.join(run_dir, name))
  with open(path, "r+b") as f:
    f.truncate(0 if damage == "empty" else 9)
  before = file_hashes(workdir)
  with pytest.raises(ValueError, match=os.path.basename(path)) as error:
    stages.run(config, workdir, stages=("report",))
  assert "unreadable" in str(error.value)
  assert file_hashes(workdir) == before
