"""A user's own data, end to end through ``adamix-train``: an image folder
(``--config.dataset=image_folder --config.dataset_kwargs.data_dir=DIR``) and
an npz of features (``--config.dataset=npz --config.dataset_kwargs.path=F``),
each on tiny data made here. The runs write results.md (named after the
data, with the epsilon spent by each run) and the privacy-utility plot.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from adamix_jax import configs
from adamix_jax import data as data_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
CLASSES = ("cat", "dog", "owl")
# Tiny and fast: full batch, 2 epochs, 1 seed, 1 epsilon, 2-fold CV.
TINY = ["--config.seeds=0", "--config.epsilons=8", "--config.train.epochs=2",
        "--config.train.sampling_rate=1.0", "--config.cv_folds=2",
        "--config.delta=1e-3", "--config.public_per_class=2",
        "--config.methods=paragon,public_only,adamix"]


def _image_folder(root: pathlib.Path) -> pathlib.Path:
  """root/<class>/NN.png: 8x8 RGB, the class's channel bright, 20 per class."""
  rng = np.random.default_rng(0)
  for label, name in enumerate(CLASSES):
    (root / name).mkdir(parents=True)
    for i in range(20):
      image = rng.integers(0, 100, (8, 8, 3)).astype(np.uint8)
      image[:, :, label] += 120
      Image.fromarray(image).save(root / name / f"{i:02d}.png")
  return root


def _run(workdir, *args):
  env = dict(os.environ)
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  return subprocess.run(
      [sys.executable, "-m", "adamix_jax.launch.main", "--workdir",
       str(workdir), *args, *TINY, "--config.progress=False"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
      check=False)


def _check_outputs(workdir: pathlib.Path, label: str, num_private: int):
  records = json.loads((workdir / "results.json").read_text())
  assert {r["method"] for r in records} == {"paragon", "public_only",
                                            "adamix"}
  assert {r["dataset"] for r in records} == {label}
  adamix = [r for r in records if r["method"] == "adamix"][0]
  assert 0 < adamix["epsilon_spent"] <= 8.0
  assert adamix["private_examples"] == num_private
  assert adamix["public_examples"] == 2 * len(CLASSES)
  markdown = (workdir / "results.md").read_text()
  assert markdown.startswith(f"# AdaMix results: {label}\n")
  assert "| epsilon spent |" in markdown
  assert f"| AdaMix | 8 | 0 | {adamix['epsilon_spent']:.3f} |" in markdown
  with open(workdir / "privacy_utility.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_image_folder_dataset_end_to_end(tmp_path):
  folder = _image_folder(tmp_path / "my_pets")
  workdir = tmp_path / "run"
  # With no --config, the generic dataset picks its packaged config; the
  # identity backbone (raw 8x8 pixels) keeps the test fast.
  result = _run(workdir, "--config.dataset=image_folder",
                f"--config.dataset_kwargs.data_dir={folder}",
                "--config.backbone=identity")
  assert result.returncode == 0, result.stderr[-4000:]
  assert "Wrote" in result.stdout and "| epsilon spent |" in result.stdout
  # 20 per class, test_fraction 0.2 -> 16 train per class, 2 public.
  _check_outputs(workdir, "my_pets", num_private=3 * (16 - 2))
  assert f"adamix-train --workdir {workdir} --config.dataset=image_folder" in (
      (workdir / "results.md").read_text())


def test_npz_dataset_end_to_end(tmp_path):
  rng = np.random.default_rng(1)
  y_train, y_test = np.arange(60) % 3, np.arange(30) % 3
  x_train = rng.normal(size=(60, 16)) + 3 * np.eye(16)[y_train]
  x_test = rng.normal(size=(30, 16)) + 3 * np.eye(16)[y_test]
  path = tmp_path / "my_features.npz"
  np.savez(path, x_train=x_train.astype(np.float32), y_train=y_train,
           x_test=x_test.astype(np.float32), y_test=y_test,
           class_names=np.array(CLASSES, dtype=str))
  workdir = tmp_path / "run"
  result = _run(workdir, "--config.dataset=npz",
                f"--config.dataset_kwargs.path={path}")
  assert result.returncode == 0, result.stderr[-4000:]
  _check_outputs(workdir, "my_features", num_private=60 - 6)


def test_generic_dataset_sources_and_labels(tmp_path):
  folder = _image_folder(tmp_path / "birds")
  source = data_lib.get_source("image_folder", data_dir=str(folder))
  assert source.name == "birds" and source.class_names == CLASSES
  named = data_lib.get_source("image_folder", data_dir=str(folder),
                              name="my birds", test_fraction=0.5)
  assert named.name == "my birds" and len(named.split("test")) == 30
  with pytest.raises(ValueError, match="dataset_kwargs.data_dir"):
    data_lib.get_source("image_folder")
  with pytest.raises(ValueError, match="dataset_kwargs.path"):
    data_lib.get_source("npz")
  config = configs.load("image_folder")
  assert config.dataset == "image_folder"
  assert config.backbone == "efficientnet_lite0"
  assert configs.load("image_folder:identity").backbone_kwargs.image_size == 32
  config.dataset_kwargs.data_dir = str(folder) + "/"
  assert configs.label(config) == "birds"
  config.dataset_kwargs.name = "mine"
  assert configs.label(config) == "mine"
  npz_config = configs.load("npz")
  npz_config.dataset_kwargs.path = "/data/embeddings.npz"
  assert configs.label(npz_config) == "embeddings"
  assert configs.label(configs.load("mit67")) == "mit67"
  # Without --config, a generic --config.dataset starts from its config.
  assert configs.default_for(["--config.dataset=npz"]).endswith("npz.py")
  assert configs.default_for(["--config.dataset=digits"]) == (
      configs.default_path())
