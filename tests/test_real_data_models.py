"""Backbones, the CLIP zero-shot head and the feature cache, all offline.

The Hugging Face models are tiny randomly initialised configs saved to a temp
dir and loaded back through the backbones' ``from_pretrained`` path, exactly
as a downloaded checkpoint directory would be. The CLIP tokenizer is built
from a byte-level vocabulary written to that dir (every byte, with and
without CLIP's end-of-word marker, then the two special tokens) and no BPE
merges, which tokenizes any text, character by character.
"""

from __future__ import annotations

import logging
import os
import sys

import numpy as np
import pytest

from adamix_jax.data import base as data_base
from adamix_jax.features import cache
from adamix_jax.features import extract
from adamix_jax.models import base as models_base
from adamix_jax.models import registry
import tiny_models

transformers = pytest.importorskip("transformers")

CLIP_IMAGE_SIZE = 32
CLIP_PROJECTION_DIM = 16
CLIP_MAX_TEXT_LENGTH = 24


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> str:
  return tiny_models.save_tiny_clip(
      str(tmp_path_factory.mktemp("tiny_clip")), image_size=CLIP_IMAGE_SIZE,
      patch_size=4, projection_dim=CLIP_PROJECTION_DIM,
      max_text_length=CLIP_MAX_TEXT_LENGTH)


@pytest.fixture(scope="module")
def tiny_clip(tiny_clip_dir):
  from adamix_jax.models import hf  # pylint: disable=g-import-not-at-top
  return hf.CLIPBackbone(tiny_clip_dir)


def _random_images(count: int, seed: int = 0) -> list[np.ndarray]:
  """Images of mixed sizes and channel counts, as real folders hold."""
  rng = np.random.default_rng(seed)
  shapes = [(20, 20, 3), (40, 36, 3), (28, 28), (32, 32, 1), (16, 24, 4)]
  return [rng.integers(0, 256, size=shapes[i % len(shapes)], dtype=np.uint8)
          for i in range(count)]


def test_real_data_clip_image_features_are_unit_norm(tiny_clip):
  assert tiny_clip.image_size == CLIP_IMAGE_SIZE
  assert tiny_clip.embed_dim == CLIP_PROJECTION_DIM
  batch = tiny_clip.preprocess(_random_images(5))
  assert batch.shape == (5, CLIP_IMAGE_SIZE, CLIP_IMAGE_SIZE, 3)
  assert batch.dtype == np.float32
  features = tiny_clip.embed(batch)
  assert features.shape == (5, CLIP_PROJECTION_DIM)
  assert features.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)
  # Different images give different embeddings (the weights are really used).
  assert np.abs(features[0] - features[1]).max() > 1e-4


def test_real_data_clip_text_embeddings_and_zero_shot_head(tiny_clip):
  from adamix_jax.models import zero_shot  # pylint: disable=g-import-not-at-top
  texts = ["a photo of a cat.", "a photo of a dog.", "x"]
  text_features = tiny_clip.text_embeddings(texts, batch_size=2)  # Pads a batch.
  assert text_features.shape == (3, CLIP_PROJECTION_DIM)
  np.testing.assert_allclose(np.linalg.norm(text_features, axis=1), 1.0,
                             atol=1e-5)
  np.testing.assert_allclose(tiny_clip.text_embeddings(texts[:1]),
                             text_features[:1], atol=1e-5)

  class_names = ["cat", "dog", "aquarium_fish"]
  templates = zero_shot.CLIP_TEMPLATES[:3]
  head = zero_shot.zero_shot_head(tiny_clip, class_names, templates,
                                  logit_scale=1.0)
  assert head["kernel"].shape == (CLIP_PROJECTION_DIM, len(class_names))
  assert head["kernel"].dtype == np.float32
  np.testing.assert_array_equal(head["bias"], np.zeros(3, np.float32))
  np.testing.assert_allclose(np.linalg.norm(head["kernel"], axis=0), 1.0,
                             atol=1e-5)
  # Column c is the normalised mean of class c's template embeddings.
  fish = tiny_clip.text_embeddings([t.format("aquarium fish") for t in templates])
  expected = fish.mean(axis=0) / np.linalg.norm(fish.mean(axis=0))
  np.testing.assert_allclose(head["kernel"][:, 2], expected, atol=1e-5)

  scaled = zero_shot.zero_shot_head(tiny_clip, class_names, templates)
  # Randomly initialised CLIP keeps logit_scale at its init, log(1 / 0.07).
  assert tiny_clip.logit_scale == pytest.approx(1 / 0.07, rel=1e-3)
  np.testing.assert_allclose(scaled["kernel"],
                             tiny_clip.logit_scale * head["kernel"], rtol=1e-5)


def test_real_data_hf_resnet_backbone(tmp_path):
  from adamix_jax.models import hf  # pylint: disable=g-import-not-at-top
  config = transformers.ResNetConfig(num_channels=3, embedding_size=8,
                                     hidden_sizes=[8, 12], depths=[1, 1],
                                     layer_type="basic")
  transformers.FlaxResNetModel(config, seed=0).save_pretrained(str(tmp_path))
  backbone = hf.HFResNetBackbone(str(tmp_path), image_size=32)
  assert backbone.embed_dim == 12
  assert "resnet" in backbone.name
  batch = backbone.preprocess(_random_images(3))
  assert batch.shape == (3, 32, 32, 3)
  # Standardised with ImageNet statistics: roughly zero-centred.
  assert abs(float(batch.mean())) < 0.5
  features = backbone.embed(batch)
  assert features.shape == (3, 12)
  assert features.dtype == np.float32
  assert np.all(np.isfinite(features))


def test_real_data_hf_load_errors_are_actionable(tmp_path, monkeypatch):
  from adamix_jax.models import hf  # pylint: disable=g-import-not-at-top
  with pytest.raises(OSError, match="does not hold a loadable CLIP model"):
    hf.CLIPBackbone(str(tmp_path))
  monkeypatch.setitem(sys.modules, "transformers", None)
  with pytest.raises(ImportError, match=r"pip install -e '\.\[hf\]'"):
    hf.HFResNetBackbone(str(tmp_path))


def test_real_data_get_backbone(tiny_clip_dir):
  with pytest.raises(ValueError, match="identity, efficientnet_lite0, resnet50, "
                     "clip_vit_b32"):
    registry.get_backbone("vgg16")
  assert isinstance(registry.get_backbone("identity"),
                    models_base.IdentityBackbone)
  clip = registry.get_backbone("clip_vit_b32", name_or_path=tiny_clip_dir)
  assert isinstance(clip, models_base.Backbone)
  assert clip.embed_dim == CLIP_PROJECTION_DIM


class CountingBackbone:
  """A cheap deterministic backbone that counts its device calls."""

  def __init__(self, name: str = "counting", image_size: int = 8):
    self.name = name
    self.image_size = image_size
    self.embed_dim = 6
    self.calls = 0

  def preprocess(self, images):
    return models_base.normalized_rgb_batch(images, self.image_size,
                                            (0.5,) * 3, (0.25,) * 3)

  def embed(self, batch):
    self.calls += 1
    channel_means = batch.mean(axis=(1, 2))
    channel_maxes = batch.max(axis=(1, 2))
    return np.concatenate([channel_means, channel_maxes], axis=1)


def _image_source(count: int = 10, name: str = "toy") -> data_base.ArraySource:
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, size=(count, 12, 12, 3), dtype=np.uint8)
  labels = rng.integers(0, 3, size=count)
  return data_base.ArraySource(
      name=name, class_names=("a", "b", "c"), kind="image",
      splits={"train": data_base.ArraySplit(images, labels),
              "test": data_base.ArraySplit(images[:4], labels[:4])})


def _entry_files(cache_dir: str) -> list[str]:
  return sorted(os.listdir(cache_dir))


def test_real_data_feature_cache_miss_then_hit(tmp_path):
  source = _image_source()
  backbone = CountingBackbone()
  cache_dir = str(tmp_path / "cache")
  first = extract.extract_features(source, "train", backbone, cache_dir,
                                   batch_size=4, progress=False)
  assert first.shape == (10, 6) and first.dtype == np.float32
  assert backbone.calls == 3  # 4 + 4 + 2 (padded to 4).
  files = _entry_files(cache_dir)
  assert len(files) == 2 and {f.rsplit(".", 1)[1] for f in files} == {"npy", "json"}
  # Padding the last batch did not change its rows.
  direct = backbone.embed(backbone.preprocess(list(source.split("train").items)))
  np.testing.assert_allclose(first, direct, rtol=1e-6)

  backbone.calls = 0
  second = extract.extract_features(source, "train", backbone, cache_dir,
                                    batch_size=4, progress=False)
  assert backbone.calls == 0
  np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("damage", ["flip_bytes", "truncate", "bad_manifest",
                                    "missing_manifest"])
def test_real_data_feature_cache_corruption_is_rebuilt(tmp_path, caplog, damage):
  source = _image_source()
  backbone = CountingBackbone()
  cache_dir = str(tmp_path)
  original = extract.extract_features(source, "train", backbone, cache_dir,
                                      batch_size=4, progress=False)
  key = cache.cache_key(source.name, "train", backbone.name,
                        backbone.image_size, None, source.split("train").labels)
  array_path, manifest_path = cache.entry_paths(cache_dir, key)
  with open(array_path, "rb") as f:
    raw = bytearray(f.read())
  if damage == "flip_bytes":
    raw[-9] ^= 0xFF  # In the data, past the header: the shape still parses.
    with open(array_path, "wb") as f:
      f.write(raw)
  elif damage == "truncate":
    with open(array_path, "wb") as f:
      f.write(raw[:len(raw) // 2])
  elif damage == "bad_manifest":
    with open(manifest_path, "w") as f:
      f.write('{"key": ')
  else:
    os.remove(manifest_path)

  backbone.calls = 0
  with caplog.at_level(logging.WARNING):
    rebuilt = extract.extract_features(source, "train", backbone, cache_dir,
                                       batch_size=4, progress=False)
  assert backbone.calls == 3
  assert any("recomputing" in r.getMessage() for r in caplog.records
             if r.levelno == logging.WARNING)
  np.testing.assert_array_equal(rebuilt, original)
  # The rebuilt entry verifies again and serves the next call.
  assert cache.load(cache_dir, key) is not None
  backbone.calls = 0
  extract.extract_features(source, "train", backbone, cache_dir, batch_size=4,
                           progress=False)
  assert backbone.calls == 0


def test_real_data_feature_cache_keys_separate_entries(tmp_path):
  source = _image_source()
  cache_dir = str(tmp_path)
  base_backbone = CountingBackbone("counting")
  extract.extract_features(source, "train", base_backbone, cache_dir,
                           progress=False)
  other_backbone = CountingBackbone("other")
  extract.extract_features(source, "train", other_backbone, cache_dir,
                           progress=False)
  assert other_backbone.calls == 1
  low_res = extract.extract_features(source, "train", base_backbone, cache_dir,
                                     resolution=4, progress=False)
  assert base_backbone.calls == 2
  assert len(_entry_files(cache_dir)) == 6
  # Same name but different labels (the dataset changed): another entry.
  relabelled = _image_source()
  relabelled.splits["train"] = data_base.ArraySplit(
      relabelled.split("train").items, (relabelled.split("train").labels + 1) % 3)
  extract.extract_features(relabelled, "train", base_backbone, cache_dir,
                           progress=False)
  assert base_backbone.calls == 3
  assert len(_entry_files(cache_dir)) == 8
  full_res = cache.load(cache_dir, cache.cache_key(
      "toy", "train", "counting", 8, None, source.split("train").labels))
  assert full_res is not None and not np.array_equal(full_res, low_res)


def test_real_data_identity_feature_source_skips_images_and_cache(tmp_path):
  features = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float64)
  source = data_base.ArraySource(
      name="vectors", class_names=("a", "b"), kind="feature",
      splits={"train": data_base.ArraySplit(features, np.arange(7) % 2),
              "test": data_base.ArraySplit(features[:2], np.arange(2))})
  x_train, y_train, x_test, y_test = extract.features_for_source(
      source, models_base.IdentityBackbone(), str(tmp_path), progress=False)
  np.testing.assert_allclose(x_train, features.astype(np.float32))
  assert x_train.dtype == np.float32 and x_test.shape == (2, 5)
  assert y_train.dtype == np.int64 and y_test.tolist() == [0, 1]
  assert os.listdir(tmp_path) == []
  with pytest.raises(ValueError, match="feature vectors"):
    extract.extract_features(source, "train", CountingBackbone(), str(tmp_path))


def test_real_data_identity_backbone_on_images():
  source = _image_source(count=5)
  features = extract.extract_features(source, "train",
                                      models_base.IdentityBackbone(), None,
                                      batch_size=2, resolution=6,
                                      progress=False)
  assert features.shape == (5, 6 * 6 * 3)
  assert 0.0 <= features.min() and features.max() <= 1.0


def test_real_data_clip_features_for_source_through_cache(tiny_clip, tmp_path):
  source = _image_source(count=6)
  x_train, y_train, x_test, _ = extract.features_for_source(
      source, tiny_clip, str(tmp_path), batch_size=4, progress=False)
  assert x_train.shape == (6, CLIP_PROJECTION_DIM)
  assert x_test.shape == (4, CLIP_PROJECTION_DIM)
  np.testing.assert_array_equal(y_train, source.split("train").labels)
  direct = tiny_clip.embed(tiny_clip.preprocess(list(source.split("train").items)))
  np.testing.assert_allclose(x_train, direct, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(x_train, axis=1), 1.0, atol=1e-5)
