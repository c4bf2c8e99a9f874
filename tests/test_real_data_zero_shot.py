"""The zero-shot path end to end, offline: image folder -> CLIP -> text head.

A tiny randomly initialised CLIP (saved with ``save_pretrained`` and loaded
back by ``clip_vit_b32`` through ``backbone_kwargs.name_or_path``, as a
downloaded checkpoint would be) and a folder of generated PNGs read as
"mit67" go through every stage of ``train.stages.run`` with
``public_per_class=0``: no public image exists, so the public model is CLIP's
zero-shot text head and adamix starts from it.
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np
import pytest

from adamix_jax import io
from adamix_jax.experiment import stages
import tiny_models

from adamix_jax.configs import base

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

CLASS_NAMES = ("aquarium_fish", "cat", "dog")  # sorted: the folder's order
TEMPLATES = ("a photo of a {}.", "a drawing of a {}.")
TRAIN_PER_CLASS = 12
TEST_PER_CLASS = 4


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> str:
  return tiny_models.save_tiny_clip(str(tmp_path_factory.mktemp("tiny_clip")),
                                    image_size=32, patch_size=8)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> str:
  """root/{train,test}/<class>/*.png, each class a different mean colour."""
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  for split, count in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
    for c, name in enumerate(CLASS_NAMES):
      folder = root / split / name
      folder.mkdir(parents=True)
      for i in range(count):
        size = (24 + 4 * (i % 3), 20 + 4 * (i % 4))  # sizes differ, as on disk
        colour = np.zeros(3)
        colour[c] = 200.0
        pixels = np.clip(colour + rng.normal(0, 40, size + (3,)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:03d}.png")
  return str(root)


def _config(tiny_clip_dir: str, image_folder: str,
            cache_dir: str) -> ml_collections.ConfigDict:
  config = base.get_config()
  config.dataset = "mit67"  # an image-folder dataset
  config.dataset_kwargs.data_dir = image_folder
  config.backbone = "clip_vit_b32"
  config.backbone_kwargs.name_or_path = tiny_clip_dir
  config.feature_cache_dir = cache_dir
  config.feature_batch_size = 16
  config.public_per_class = 0  # zero-shot: no public images
  config.methods = ("public_only", "adamix", "dp_sgd")
  config.seeds = (0,)
  config.epsilons = (8.0,)
  config.train.epochs = 2
  config.train.sampling_rate = 0.5
  config.zero_shot_templates = TEMPLATES
  config.progress = False
  return config


def test_real_data_zero_shot_run_starts_adamix_from_clip_text_head(
    tiny_clip_dir, image_folder, tmp_path, monkeypatch):
  from adamix_jax.models import hf  # pylint: disable=g-import-not-at-top
  from adamix_jax.models import linear  # pylint: disable=g-import-not-at-top
  from adamix_jax.models import zero_shot  # pylint: disable=g-import-not-at-top

  # Record the head each private run starts from.
  starts = []
  from adamix_jax.train import linear_head  # pylint: disable=g-import-not-at-top
  original = linear_head.LinearHeadProgram

  def recording(private_x, private_y, public_x, public_y, anchor_params,
                *args, **kwargs):
    starts.append({"kernel": np.asarray(anchor_params["kernel"]),
                   "bias": np.asarray(anchor_params["bias"]),
                   "public_examples": len(public_y)})
    return original(private_x, private_y, public_x, public_y, anchor_params,
                    *args, **kwargs)

  monkeypatch.setattr(linear_head, "LinearHeadProgram", recording)

  config = _config(tiny_clip_dir, image_folder, str(tmp_path / "cache"))
  workdir = str(tmp_path / "run")
  records = stages.run(config, workdir)

  # The whole run happened: one record per method, within budget.
  methods = sorted(r["method"] for r in records)
  assert methods == ["adamix", "dp_sgd", "public_only"]
  for r in records:
    assert 0.0 <= r["test_error"] <= 1.0
    if r["method"] in stages.DP_METHODS:
      assert r["epsilon_spent"] <= 8.0
  assert os.path.exists(os.path.join(workdir, "results.md"))

  # No public image anywhere; the public model is the zero-shot head.
  features = io.load_npz(os.path.join(workdir, "features", "features.npz"))
  assert tuple(features["class_names"]) == CLASS_NAMES
  assert features["x_train"].shape == (TRAIN_PER_CLASS * len(CLASS_NAMES), 16)
  assert features["x_test"].shape == (TEST_PER_CLASS * len(CLASS_NAMES), 16)
  splits = io.load_npz(os.path.join(workdir, "features", "splits.npz"))
  assert len(splits["public_0"]) == 0
  assert len(splits["private_0"]) == TRAIN_PER_CLASS * len(CLASS_NAMES)
  info = io.load_json(os.path.join(workdir, "public_init", "seed_0.json"))
  assert info["init"] == "zero_shot"
  assert info["public_examples"] == 0

  expected = zero_shot.zero_shot_head(hf.CLIPBackbone(tiny_clip_dir),
                                      list(CLASS_NAMES), TEMPLATES)
  saved = io.load_npz(os.path.join(workdir, "public_init", "seed_0.npz"))
  np.testing.assert_allclose(saved["kernel"], expected["kernel"], rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_array_equal(saved["bias"], expected["bias"])

  # adamix starts from that head; dp_sgd from zeros (it uses no public data).
  assert len(starts) == 2  # _private_jobs order: dp_sgd, then adamix
  dp_sgd_start, adamix_start = starts
  np.testing.assert_allclose(adamix_start["kernel"], expected["kernel"],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(adamix_start["bias"], expected["bias"])
  assert adamix_start["public_examples"] == 0
  assert not np.any(dp_sgd_start["kernel"]) and not np.any(dp_sgd_start["bias"])

  # public_only reports the zero-shot head itself on the test features (no
  # public data, so preprocessing is the identity).
  public_only = next(r for r in records if r["method"] == "public_only")
  assert public_only["test_error"] == pytest.approx(
      linear.error_rate(expected, features["x_test"], features["y_test"]))


def test_real_data_zero_shot_needs_a_text_tower(image_folder, tmp_path):
  config = base.get_config()
  config.dataset = "mit67"
  config.dataset_kwargs.data_dir = image_folder
  config.backbone = "identity"
  config.backbone_kwargs.image_size = 8
  config.public_per_class = 0
  config.methods = ("adamix",)
  config.seeds = (0,)
  config.epsilons = (8.0,)
  config.progress = False
  with pytest.raises(ValueError, match="CLIP backbone"):
    stages.run(config, str(tmp_path / "run"))
