"""Bad inputs stop a run with a specific error that says what to fix.

Issue #6, item 3: every test name contains ``bad_input`` (``pytest -k
bad_input``). Each checks the exception type, that the message names the
problem, and, where files exist, that the error deleted none of them.
"""

from __future__ import annotations

import logging
import os
import pathlib

import numpy as np
import pytest

from adamix_jax import data
from adamix_jax.data import base as data_base
from adamix_jax.features import cache
from adamix_jax.features import extract
from adamix_jax.models import base as models_base
from adamix_jax.models import registry
from adamix_jax.experiment import recipe as recipe_lib
from adamix_jax.experiment import stages
from adamix_jax.configs import base as base_config
from adamix_jax.configs import digits


def _write_npz_features(path: pathlib.Path, **changes: np.ndarray) -> str:
  """A tiny valid npz feature file (3 classes), with ``changes`` applied."""
  rng = np.random.default_rng(0)
  arrays = {
      "x_train": rng.normal(size=(6, 4)),
      "y_train": np.arange(6) % 3,
      "x_test": rng.normal(size=(3, 4)),
      "y_test": np.arange(3),
      "class_names": np.array(["a", "b", "c"]),
  }
  arrays.update(changes)
  np.savez(path, **arrays)
  return str(path)


def _image_source(images: np.ndarray) -> data_base.ArraySource:
  labels = np.arange(len(images)) % 2
  return data_base.ArraySource(
      name="toy", class_names=("a", "b"), kind="image",
      splits={"train": data_base.ArraySplit(images, labels),
              "test": data_base.ArraySplit(images[:2], labels[:2])})


def _flatten_backbone() -> models_base.IdentityBackbone:
  """The identity backbone under another name, so that it is cached."""
  backbone = models_base.IdentityBackbone()
  backbone.name = "flatten"
  return backbone


# --- 1. NaN / inf -------------------------------------------------------------


def test_bad_input_nan_in_features(tmp_path):
  x_train = np.random.default_rng(1).normal(size=(6, 4))
  x_train[4, 1] = np.nan
  config = base_config.get_config()
  config.dataset = "npz"
  config.dataset_kwargs.path = _write_npz_features(tmp_path / "feats.npz",
                                                   x_train=x_train)
  config.public_per_class = 1
  config.progress = False
  workdir = stages.Workdir(str(tmp_path / "workdir"))
  with pytest.raises(ValueError,
                     match=r"x_train: 1 example\(s\) contain NaN or inf "
                     r"\(first rows: \[4\]\)\. Clean or drop them"):
    stages.run_features(config, workdir)
  assert not os.path.exists(workdir.features)


def test_bad_input_nan_in_images(tmp_path):
  images = np.random.default_rng(0).uniform(size=(8, 4, 4, 3))
  images = images.astype(np.float32)
  images[2, 0, 0, 0] = np.nan
  images[5, 1, 1, 1] = np.inf
  cache_dir = tmp_path / "cache"
  with pytest.raises(ValueError, match=r"toy/train.*item\(s\) \[2, 5\] hold "
                     r"NaN or inf values\. Clean or drop them"):
    extract.extract_features(_image_source(images), "train",
                             _flatten_backbone(), str(cache_dir),
                             batch_size=8, progress=False)
  assert not cache_dir.exists() or not os.listdir(cache_dir)  # Nothing cached.


# --- 2. labels ----------------------------------------------------------------


def test_bad_input_labels_out_of_range(tmp_path):
  path = _write_npz_features(tmp_path / "feats.npz",
                             y_train=np.array([0, 1, 2, 3, 1, 0]))
  with pytest.raises(ValueError, match=r"y_train: 1 label\(s\) outside "
                     r"\[0, 3\), e\.g\. \[3\]\. Check num_classes"):
    data.get_source("npz", path=path)


def test_bad_input_label_count_mismatch(tmp_path):
  rng = np.random.default_rng(0)
  for prefix, count in (("train", 4), ("t10k", 2)):
    images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
    (tmp_path / f"{prefix}-images-idx3-ubyte").write_bytes(
        data.encode_idx(images))
    labels = np.zeros(count - 1 if prefix == "train" else count, np.uint8)
    (tmp_path / f"{prefix}-labels-idx1-ubyte").write_bytes(
        data.encode_idx(labels))
  with pytest.raises(ValueError, match=r"Label count mismatch: .*train-images"
                     r".* has 4 images but .*train-labels.* has 3 labels.*"
                     r"same split"):
    data.get_source("fashion_mnist", root=tmp_path)


# --- 3, 4. public examples ----------------------------------------------------


def test_bad_input_class_absent_from_public_set():
  labels = np.array([0, 0, 0, 1, 1, 1, 3, 3, 3])  # class 2 has no examples
  with pytest.raises(ValueError, match=r"Class\(es\) \[2\] have no training "
                     r"examples, but public_per_class=1 needs public examples "
                     r"of every class\. Drop those classes"):
    data.few_shot_split(labels, 4, public_per_class=1)
  # Zero-shot needs no public examples, so an absent class is fine there.
  data.few_shot_split(labels, 4, public_per_class=0, allow_no_public=True)


def test_bad_input_public_per_class_exceeds_class_size():
  labels = np.array([0] * 5 + [1] * 2 + [2] * 5)
  with pytest.raises(ValueError, match=r"public_per_class=3 but class\(es\) "
                     r"\[1\] have only \[2\] training example\(s\)\. Lower "
                     r"public_per_class to at most 2"):
    data.few_shot_split(labels, 3, public_per_class=3)


# --- 5, 6. privacy parameters -------------------------------------------------


@pytest.mark.parametrize("field, value, message", [
    pytest.param("epsilons", (1.0, 0.0), r"epsilon must be > 0, got 0\.0 in "
                 r"config\.epsilons; remove it", id="bad_input_epsilon_zero"),
    pytest.param("epsilons", (-1.0,), r"epsilon must be > 0, got -1\.0",
                 id="bad_input_epsilon_negative"),
    pytest.param("delta", 0.0, r"config\.delta must be in \(0, 1\), got 0\.0; "
                 r"use a small value", id="bad_input_delta_zero"),
    pytest.param("delta", -1e-5,
                 r"config\.delta must be in \(0, 1\), got -1e-05",
                 id="bad_input_delta_negative"),
    pytest.param("delta", 1.0, r"config\.delta must be in \(0, 1\), got 1\.0",
                 id="bad_input_delta_one"),
    pytest.param("delta", 2.0, r"config\.delta must be in \(0, 1\), got 2\.0",
                 id="bad_input_delta_above_one"),
])
def test_bad_input_privacy_parameters(field, value, message):
  config = base_config.get_config()
  config[field] = value
  with pytest.raises(ValueError, match=message):
    recipe_lib.validate_config(config)


def test_bad_input_delta_at_least_one_over_n_private():
  config = base_config.get_config()
  config.delta = 0.01
  with pytest.raises(ValueError, match=r"delta=0\.01 >= 1/n_private = 1/100: "
                     r"a mechanism that publishes one random private example "
                     r".*allow_large_delta=True"):
    recipe_lib.check_delta(config, 100)
  recipe_lib.check_delta(config, 50)  # 0.01 < 1/50 is fine...
  config.allow_large_delta = True
  recipe_lib.check_delta(config, 100)  # ...and so is an explicit opt-in.


def test_bad_input_no_private_examples():
  config = base_config.get_config()
  with pytest.raises(ValueError, match=r"No private examples.*Lower "
                     r"config\.public_per_class"):
    recipe_lib.check_delta(config, 0)


# --- 7. unknown names ---------------------------------------------------------


def _assert_lists_all(message: str, names) -> None:
  for name in names:
    assert name in message, (name, message)


def test_bad_input_unknown_dataset():
  with pytest.raises(ValueError,
                     match="Unknown data source 'imagenet'") as info:
    data.get_source("imagenet")
  _assert_lists_all(str(info.value), data.KNOWN_SOURCES)
  config = base_config.get_config()
  config.dataset = "imagenet"
  with pytest.raises(ValueError, match=r"Unknown config\.dataset 'imagenet'; "
                     "known datasets: ") as info:
    recipe_lib.validate_config(config)
  _assert_lists_all(str(info.value), data.KNOWN_SOURCES)


def test_bad_input_unknown_backbone():
  with pytest.raises(ValueError, match="Unknown backbone 'vit_h14'") as info:
    registry.get_backbone("vit_h14")
  _assert_lists_all(str(info.value), registry.KNOWN_BACKBONES)
  config = base_config.get_config()
  config.backbone = "vit_h14"
  with pytest.raises(ValueError, match=r"Unknown config\.backbone 'vit_h14'; "
                     "known backbones: ") as info:
    recipe_lib.validate_config(config)
  _assert_lists_all(str(info.value), registry.KNOWN_BACKBONES)


def test_bad_input_unknown_method():
  config = base_config.get_config()
  config.methods = ("adamix", "dpsgd")
  with pytest.raises(ValueError, match=r"Unknown method\(s\) \['dpsgd'\]; "
                     "known methods: ") as info:
    recipe_lib.validate_config(config)
  _assert_lists_all(str(info.value), stages.METHODS)


# --- 8. damaged caches and outputs --------------------------------------------


def test_bad_input_truncated_feature_cache_entry(tmp_path, caplog, file_hashes):
  images = np.random.default_rng(0).integers(0, 256, (6, 4, 4, 3), np.uint8)
  source = _image_source(images)
  backbone = _flatten_backbone()
  cache_dir = str(tmp_path)
  train = extract.extract_features(source, "train", backbone, cache_dir,
                                   progress=False)
  extract.extract_features(source, "test", backbone, cache_dir, progress=False)
  key = cache.cache_key("toy", "train", "flatten", None, None,
                        source.split("train").labels)
  array_path, _ = cache.entry_paths(cache_dir, key)
  with open(array_path, "r+b") as f:
    f.truncate(os.path.getsize(array_path) // 2)
  others = {k: v for k, v in file_hashes(cache_dir).items()
            if k != os.path.basename(array_path)}

  with caplog.at_level(logging.WARNING):
    rebuilt = extract.extract_features(source, "train", backbone, cache_dir,
                                       progress=False)
  assert any("unusable" in r.getMessage() and "truncated" in r.getMessage()
             for r in caplog.records)
  np.testing.assert_array_equal(rebuilt, train)  # rebuilt, not misread
  assert cache.load(cache_dir, key) is not None
  after = file_hashes(cache_dir)
  assert set(after) == set(others) | {os.path.basename(array_path)}
  assert {k: after[k] for k in others} == others  # no other entry touched


def test_bad_input_truncated_workdir_features(tmp_path, file_hashes):
  workdir = stages.Workdir(str(tmp_path))
  os.makedirs(os.path.dirname(workdir.features))
  _write_npz_features(pathlib.Path(workdir.features))
  with open(workdir.features, "r+b") as f:
    f.truncate(os.path.getsize(workdir.features) - 20)
  before = file_hashes(tmp_path)
  config = base_config.get_config()
  config.seeds = (0,)
  with pytest.raises(ValueError, match=r"features\.npz is unreadable: "
                     r"truncated or corrupt .*It was left in place: delete it "
                     r"and rerun the 'features' stage"):
    stages.run_public_init(config, workdir)
  assert file_hashes(tmp_path) == before


def test_bad_input_error_keeps_workdir_outputs(tmp_path, file_hashes):
  # delta = 1e-3 >= 1/n_private (about 1200 private digits) is only refused
  # by the private stage, after the first two stages have written outputs.
  config = digits.get_config()
  config.update(seeds=(0,), methods=("dp_sgd",), epsilons=(1.0,), delta=1e-3,
                cv_folds=2, progress=False)
  workdir = str(tmp_path)
  stages.run(config, workdir, stages=("features", "public_init"))
  before = file_hashes(workdir)
  assert {"config.json", "features/features.npz", "features/splits.npz",
          "public_init/seed_0.npz"} <= set(before)

  with pytest.raises(ValueError, match="allow_large_delta"):
    stages.run(config, workdir, stages=("private",))  # fails mid-stage
  assert file_hashes(workdir) == before
  bad = digits.get_config()
  bad.update(seeds=(0,), methods=("dp_sgd",), epsilons=(0.0,), delta=1e-3,
             cv_folds=2, progress=False)
  with pytest.raises(ValueError, match="epsilon must be > 0"):
    stages.run(bad, workdir)  # fails validation
  assert file_hashes(workdir) == before
