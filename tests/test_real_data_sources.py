"""Tests of the real-data sources: TFDS, image folders, IDX, npz, registry.

Every test name contains ``real_data`` so that ``pytest -k real_data`` runs
them. Nothing here needs network or TensorFlow: TFDS datasets are either
mocked with ``tfds.testing.mock_data`` or built offline from a tiny builder.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from adamix_jax import data
from adamix_jax.data import idx
from adamix_jax.data import tfds_source

tfds = pytest.importorskip("tensorflow_datasets")
Image = pytest.importorskip("PIL.Image")

# ----------------------------------------------------------------------------
# TFDS sources under tfds.testing.mock_data.

EXPECTED_NUM_CLASSES = {
    "oxford_pets": 37,
    "cub200": 200,
    "flowers102": 102,
    "stanford_dogs": 120,
    "caltech101": 102,
}


def test_real_data_every_tfds_dataset_has_a_test():
  assert set(EXPECTED_NUM_CLASSES) == set(tfds_source.TFDS_DATASETS)


@pytest.mark.parametrize("name", sorted(EXPECTED_NUM_CLASSES))
def test_real_data_tfds_source_under_mock(name):
  num_examples = 7
  # USE_CODE: the builder's features come from its code (no metadata files
  # are shipped with the package); data_dir is ignored by the mock.
  with tfds.testing.mock_data(num_examples=num_examples,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    source = data.get_source(name, data_dir="/nonexistent/tfds")
    assert isinstance(source, data.Source)
    assert source.kind == "image"
    assert len(source.class_names) == EXPECTED_NUM_CLASSES[name]
    for split_name in ("train", "test"):
      split = source.split(split_name)
      assert split is source.split(split_name)  # Opened once.
      assert len(split) == num_examples
      assert split.as_array() is None
      labels = split.labels
      assert labels.dtype == np.int64 and labels.shape == (num_examples,)
      assert labels.min() >= 0 and labels.max() < len(source.class_names)
      for index in (0, num_examples - 1, -1):
        image, label = split[index]
        assert image.dtype == np.uint8
        assert image.ndim == 3 and image.shape[-1] == 3
        assert label == labels[index]
      with pytest.raises(IndexError):
        split[num_examples]
    with pytest.raises(KeyError, match="no split"):
      source.split("unlabeled")


def test_real_data_tfds_unknown_name():
  with pytest.raises(ValueError, match="flowers102"):
    data.TfdsSource("flowers103")


# ----------------------------------------------------------------------------
# A tiny TFDS dataset prepared offline: the real (unmocked) read path.


class AdamixTinyGrayImages(tfds.core.GeneratorBasedBuilder):
  """Grayscale images of varying size plus a mask, like Pets and CUB.

  Like CUB, the ClassLabel has no names; a text feature carries them.
  """

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 1)),
            "mask": tfds.features.Image(shape=(None, None, 1)),
            "label": tfds.features.ClassLabel(num_classes=3),
            "label_name": tfds.features.Text(),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(10, seed=0),
            "test": self._generate_examples(4, seed=1)}

  def _generate_examples(self, num_examples, seed):
    rng = np.random.default_rng(seed)
    for i in range(num_examples):
      pixels = rng.integers(0, 256, size=(5 + i, 6, 1), dtype=np.uint8)
      # Encoded with PIL: TFDS would need TensorFlow to encode arrays.
      yield i, {"image": _png_bytes(pixels[..., 0]),
                "mask": _png_bytes(pixels[..., 0] // 2),
                "label": i % 3,
                "label_name": ("cat", "dog", "fox")[i % 3]}


def _png_bytes(pixels: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  return buffer.getvalue()


TINY_SPEC = tfds_source.TfdsSpec("adamix_tiny_gray_images",
                                 {"train": "train", "test": "test",
                                  "train_head": "train[:4]"},
                                 label_name_key="label_name")


@pytest.fixture(scope="module")
def tiny_tfds_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  AdamixTinyGrayImages(data_dir=os.fspath(data_dir),
                       file_format="array_record").download_and_prepare()
  return data_dir


def test_real_data_tfds_prepared_dataset(tiny_tfds_dir):
  source = data.TfdsSource("tiny", data_dir=tiny_tfds_dir, spec=TINY_SPEC)
  assert source.class_names == ("cat", "dog", "fox")
  without_names = dataclasses.replace(TINY_SPEC, label_name_key=None)
  assert data.TfdsSource("tiny", data_dir=tiny_tfds_dir,
                         spec=without_names).class_names == ("0", "1", "2")
  train = source.split("train")
  assert len(train) == 10 and len(source.split("test")) == 4
  assert len(source.split("train_head")) == 4
  # Images reach us undecoded (so masks are never decoded) ...
  raw_example = train._data_source[0]  # pylint: disable=protected-access
  assert isinstance(raw_example["image"], bytes)
  # ... and gray images come out as 3 equal channels.
  heights = set()
  for index in range(len(train)):
    image, label = train[index]
    assert image.dtype == np.uint8 and image.shape[2] == 3
    assert np.array_equal(image[..., 0], image[..., 2])
    assert label == train.labels[index]
    heights.add(image.shape[0])
  assert heights == set(range(5, 15))  # Every example, in some order.
  assert sorted(np.bincount(train.labels).tolist()) == [3, 3, 4]


def test_real_data_tfds_not_prepared_error(tmp_path):
  source = data.TfdsSource("tiny", data_dir=tmp_path / "empty", spec=TINY_SPEC)
  with pytest.raises(FileNotFoundError, match="tfds build adamix_tiny"):
    source.split("train")


def test_real_data_tfds_prepared_as_tfrecord_error(tiny_tfds_dir, tmp_path):
  # Without TensorFlow nothing can write TFRecords, so relabel our copy.
  data_dir = tmp_path / "tfrecord"
  shutil.copytree(tiny_tfds_dir, data_dir)
  (info_path,) = data_dir.glob("adamix_tiny_gray_images/*/dataset_info.json")
  info_path.write_text(info_path.read_text().replace(
      '"fileFormat": "array_record"', '"fileFormat": "tfrecord"'))
  source = data.TfdsSource("tiny", data_dir=data_dir, spec=TINY_SPEC)
  with pytest.raises(RuntimeError, match="--file_format=array_record"):
    source.split("train")


def test_real_data_tfds_missing_package_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(ImportError, match=r"pip install -e '\.\[tfds\]'"):
    data.TfdsSource("flowers102")


# ----------------------------------------------------------------------------
# Image folders.


def _write_image(path: pathlib.Path, seed: int, gray: bool = False) -> None:
  rng = np.random.default_rng(seed)
  shape = (8 + seed % 5, 9) if gray else (8 + seed % 5, 9, 3)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)).save(path)


def _write_class_folders(root: pathlib.Path, counts: dict[str, int]) -> None:
  seed = 0
  for class_name, count in counts.items():
    for i in range(count):
      extension = ".png" if i % 2 else ".JPG"
      _write_image(root / class_name / f"img{i}{extension}", seed,
                   gray=(i == 0))
      seed += 1


def test_real_data_image_folder_train_test_layout(tmp_path):
  _write_class_folders(tmp_path / "train", {"b_kitchen": 3, "a_bar": 2,
                                            "c_cave": 2})
  _write_class_folders(tmp_path / "test", {"b_kitchen": 1, "a_bar": 2})
  (tmp_path / "train" / "a_bar" / "notes.txt").write_text("not an image")
  source = data.get_source("mit67", data_dir=tmp_path)
  assert isinstance(source, data.Source)
  assert source.name == "mit67" and source.kind == "image"
  assert source.class_names == ("a_bar", "b_kitchen", "c_cave")
  train, test = source.split("train"), source.split("test")
  assert train.labels.tolist() == [0, 0, 1, 1, 1, 2, 2]
  assert test.labels.tolist() == [0, 0, 1]
  assert train.as_array() is None
  for split in (train, test):
    for index in range(len(split)):
      image, label = split[index]
      assert image.dtype == np.uint8 and image.ndim == 3
      assert image.shape[2] == 3 and label == split.labels[index]


def test_real_data_image_folder_single_layout_seeded_stratified(tmp_path):
  _write_class_folders(tmp_path, {"dog": 5, "cat": 6, "ant": 1})

  def split_paths(seed):
    source = data.ImageFolderSource(tmp_path, "caltech256", test_fraction=0.4,
                                    split_seed=seed)
    return {s: source.split(s).paths for s in ("train", "test")}, source

  paths, source = split_paths(seed=3)
  assert source.class_names == ("ant", "cat", "dog")
  assert paths == split_paths(seed=3)[0]
  assert not set(paths["train"]) & set(paths["test"])
  assert len(paths["train"]) + len(paths["test"]) == 12
  # round(0.4 * n) per class; the single ant stays in train.
  test_counts = np.bincount(source.split("test").labels, minlength=3)
  assert test_counts.tolist() == [0, 2, 2]
  assert np.bincount(source.split("train").labels).tolist() == [1, 4, 3]
  seeds_differ = any(split_paths(seed)[0] != paths for seed in range(4, 10))
  assert seeds_differ
  image, _ = source.split("test")[0]
  assert image.dtype == np.uint8 and image.shape[2] == 3


def test_real_data_image_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="not found"):
    data.ImageFolderSource(tmp_path / "missing", "mit67")
  (tmp_path / "no_classes").mkdir()
  with pytest.raises(ValueError, match="No class folders"):
    data.ImageFolderSource(tmp_path / "no_classes", "mit67")
  _write_class_folders(tmp_path / "empty_class", {"full": 2})
  (tmp_path / "empty_class" / "hollow").mkdir()
  with pytest.raises(ValueError, match="hollow holds no images"):
    data.ImageFolderSource(tmp_path / "empty_class", "mit67")
  _write_class_folders(tmp_path / "extra/train", {"a": 2})
  _write_class_folders(tmp_path / "extra/test", {"a": 1, "z": 1})
  with pytest.raises(ValueError, match=r"\['z'\]"):
    data.ImageFolderSource(tmp_path / "extra", "mit67")
  _write_class_folders(tmp_path / "only_train/train", {"a": 2})
  with pytest.raises(ValueError, match="test does not"):
    data.ImageFolderSource(tmp_path / "only_train", "mit67")
  with pytest.raises(ValueError, match="data_dir"):
    data.get_source("caltech256")


def test_real_data_to_rgb_uint8():
  gray = np.arange(6, dtype=np.uint8).reshape(2, 3)
  for image in (gray, gray[..., None], np.stack([gray] * 4, axis=-1),
                _png_bytes(gray)):
    rgb = data.to_rgb_uint8(image)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb[..., 1], gray)
  with pytest.raises(ValueError, match="uint8"):
    data.to_rgb_uint8(gray.astype(np.float32))


# ----------------------------------------------------------------------------
# IDX files and Fashion-MNIST.


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32,
                                   np.float32, np.float64])
def test_real_data_idx_round_trip(dtype):
  # Negative values (where the dtype allows) check the sign survives.
  offset = 0 if dtype == np.uint8 else 5
  array = (np.arange(24) - offset).reshape(2, 3, 4).astype(dtype)
  parsed = data.parse_idx(data.encode_idx(array))
  assert parsed.dtype == array.dtype and parsed.dtype.isnative
  assert np.array_equal(parsed, array)


@pytest.mark.parametrize("compress", [False, True])
def test_real_data_idx_file_plain_and_gzip(tmp_path, compress):
  array = np.random.default_rng(0).integers(0, 256, (3, 4, 5), dtype=np.uint8)
  encoded = data.encode_idx(array)
  path = tmp_path / "images-idx3-ubyte"
  path.write_bytes(gzip.compress(encoded) if compress else encoded)
  assert np.array_equal(data.read_idx(path), array)


def test_real_data_idx_errors(tmp_path):
  encoded = data.encode_idx(np.zeros((4, 3), dtype=np.int32))
  with pytest.raises(ValueError, match="truncated"):
    data.parse_idx(encoded[:-1])
  with pytest.raises(ValueError, match="truncated"):
    data.parse_idx(encoded[:6])  # Inside the dimensions.
  with pytest.raises(ValueError, match="too short"):
    data.parse_idx(encoded[:2])
  with pytest.raises(ValueError, match="trailing"):
    data.parse_idx(encoded + b"\x00")
  with pytest.raises(ValueError, match="bad IDX magic"):
    data.parse_idx(b"\x01\x00" + encoded[2:])
  with pytest.raises(ValueError, match="bad IDX magic"):
    data.parse_idx(b"\x00\x00\x07" + encoded[3:])  # Unknown dtype code.
  path = tmp_path / "cut.gz"
  path.write_bytes(gzip.compress(encoded)[:-10])
  with pytest.raises(ValueError, match="gzip"):
    data.read_idx(path)


def _write_fake_fashion_mnist(root: pathlib.Path, num_train=6, num_test=4):
  rng = np.random.default_rng(0)
  for prefix, count in (("train", num_train), ("t10k", num_test)):
    images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
    labels = (np.arange(count) % 10).astype(np.uint8)
    (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(data.encode_idx(images)))
    # Plain (not gzipped) on purpose: both spellings are found.
    (root / f"{prefix}-labels-idx1-ubyte").write_bytes(data.encode_idx(labels))


def test_real_data_fashion_mnist_from_idx_files(tmp_path):
  _write_fake_fashion_mnist(tmp_path)
  source = data.get_source("fashion_mnist", root=tmp_path)
  assert source.kind == "image" and len(source.class_names) == 10
  train = source.split("train")
  image, label = train[5]
  assert image.shape == (28, 28, 3) and image.dtype == np.uint8
  assert label == 5 and len(source.split("test")) == 4
  assert np.array_equal(image[..., 0], image[..., 2])
  gray = data.load_fashion_mnist(tmp_path, channels=1).split("train")
  assert gray.as_array().shape == (6, 28, 28, 1)
  assert np.array_equal(gray[5][0][..., 0], image[..., 0])
  # data_dir, as every other folder dataset takes it, is the same folder.
  same = data.get_source("fashion_mnist", data_dir=tmp_path).split("train")
  assert np.array_equal(same[5][0], image)
  with pytest.raises(ValueError, match="pass one of them"):
    data.get_source("fashion_mnist", root=tmp_path, data_dir=tmp_path / "x")


def test_real_data_fashion_mnist_errors(tmp_path):
  apt_hint = "apt-get install -y dataset-fashion-mnist"
  with pytest.raises(FileNotFoundError, match=apt_hint):
    data.load_fashion_mnist(tmp_path / "absent")
  _write_fake_fashion_mnist(tmp_path)
  (tmp_path / "t10k-labels-idx1-ubyte").unlink()
  with pytest.raises(FileNotFoundError, match=apt_hint):
    data.load_fashion_mnist(tmp_path)
  (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(
      data.encode_idx(np.zeros(5, dtype=np.uint8)))  # 5 labels, 4 images.
  with pytest.raises(ValueError, match="4 images but"):
    data.load_fashion_mnist(tmp_path)


@pytest.mark.skipif(
    not os.path.isdir(idx.FASHION_MNIST_ROOT),
    reason="needs apt-get install -y dataset-fashion-mnist")
def test_real_data_fashion_mnist_installed():
  source = data.load_fashion_mnist()
  train, test = source.split("train"), source.split("test")
  assert train.as_array().shape == (60000, 28, 28, 3)
  assert len(test) == 10000
  assert np.bincount(train.labels).tolist() == [6000] * 10
  assert np.bincount(test.labels).tolist() == [1000] * 10


# ----------------------------------------------------------------------------
# npz features.


def _features(num_train=6, num_test=3, dim=4, num_classes=3):
  rng = np.random.default_rng(0)
  return {
      "x_train": rng.normal(size=(num_train, dim)),
      "y_train": np.arange(num_train) % num_classes,
      "x_test": rng.normal(size=(num_test, dim)),
      "y_test": np.arange(num_test) % num_classes,
  }


def test_real_data_npz_loads(tmp_path):
  path = tmp_path / "clip_feats.npz"
  np.savez(path, **_features(), class_names=np.array(["a", "b", "c", "d"]))
  source = data.get_source("npz", path=path)
  assert source.name == "clip_feats" and source.kind == "feature"
  assert source.class_names == ("a", "b", "c", "d")
  train = source.split("train")
  assert train.as_array().dtype == np.float32
  assert train.as_array().shape == (6, 4)
  assert train.labels.dtype == np.int64
  np.savez(path, **_features())
  named = data.get_source("npz", path=path, name="mine")
  assert named.name == "mine" and named.class_names == ("0", "1", "2")


@pytest.mark.parametrize("change, message", [
    (lambda f: f.pop("y_test"), r"missing key\(s\) \['y_test'\]"),
    (lambda f: f["x_train"].__setitem__((1, 2), np.nan), "NaN or inf"),
    (lambda f: f["x_test"].__setitem__((0, 0), np.inf), "NaN or inf"),
    (lambda f: f.__setitem__("y_train", f["y_train"][:-1]), "count mismatch"),
    (lambda f: f.__setitem__("y_test", np.array([0, -1, 2])), "negative label"),
    (lambda f: f.__setitem__("y_test", np.array([0.0, 1.5, 2.0])), "integers"),
    (lambda f: f.__setitem__("x_test", np.zeros((3, 5))), "dimensions differ"),
    (lambda f: f.__setitem__("x_train", np.zeros((6, 2, 2))), "must be 2-D"),
    (lambda f: f.__setitem__("class_names", np.array(["a", "b"])), "outside"),
])
def test_real_data_npz_validation_errors(tmp_path, change, message):
  features = _features()
  change(features)
  path = tmp_path / "bad.npz"
  np.savez(path, **features)
  with pytest.raises(ValueError, match=message):
    data.load_npz_features(path)


def test_real_data_npz_object_array_and_missing_file(tmp_path):
  path = tmp_path / "pickled.npz"
  np.savez(path, **_features(),
           class_names=np.array(["a", 1, None], dtype=object))
  with pytest.raises(ValueError, match="dtype=str"):
    data.load_npz_features(path)
  with pytest.raises(FileNotFoundError):
    data.load_npz_features(tmp_path / "absent.npz")


# ----------------------------------------------------------------------------
# Registry and package.


def test_real_data_registry():
  assert set(data.KNOWN_SOURCES) == {
      "digits", "fashion_mnist", "npz", "oxford_pets", "cub200", "flowers102",
      "stanford_dogs", "caltech101", "mit67", "caltech256", "image_folder"}
  with pytest.raises(ValueError, match="Known sources: caltech101, caltech256"):
    data.get_source("imagenet")
  digits = data.get_source("digits")
  assert digits.kind == "feature" and len(digits.class_names) == 10


def test_real_data_package_import_is_lazy():
  code = ("import sys, adamix_jax.data; "
          "print('tensorflow_datasets' in sys.modules, 'PIL' in sys.modules)")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, check=True,
                          cwd=pathlib.Path(__file__).resolve().parents[1])
  assert result.stdout.split() == ["False", "False"]


# ----------------------------------------------------------------------------
# few_shot_split.


def _labels(counts):
  labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
  return np.random.default_rng(0).permutation(labels)


def test_real_data_few_shot_split_is_seeded_disjoint_and_exact():
  labels = _labels([10, 7, 12])
  split = data.few_shot_split(labels, 3, public_per_class=4, seed=1)
  again = data.few_shot_split(labels, 3, public_per_class=4, seed=1)
  other = data.few_shot_split(labels, 3, public_per_class=4, seed=2)
  assert np.array_equal(split.public, again.public)
  assert np.array_equal(split.private, again.private)
  assert not np.array_equal(split.public, other.public)
  assert not set(split.public) & set(split.private)
  assert len(split.public) + len(split.private) == len(labels)
  assert np.bincount(labels[split.public]).tolist() == [4, 4, 4]
  assert np.all(np.diff(split.public) > 0)


def test_real_data_few_shot_split_private_cap():
  labels = _labels([10, 7, 12])
  split = data.few_shot_split(labels, 3, public_per_class=2,
                              private_per_class=3, seed=0)
  assert np.bincount(labels[split.private]).tolist() == [3, 3, 3]
  assert not set(split.public) & set(split.private)


def test_real_data_few_shot_split_errors():
  labels = _labels([5, 2, 5])
  with pytest.raises(ValueError, match=r"class\(es\) \[1\]"):
    data.few_shot_split(labels, 3, public_per_class=3)
  with pytest.raises(ValueError, match="outside"):
    data.few_shot_split(labels, 2, public_per_class=1)
  for k in (0, -1):
    with pytest.raises(ValueError, match="positive"):
      data.few_shot_split(labels, 3, public_per_class=k)
  zero_shot = data.few_shot_split(labels, 3, public_per_class=0,
                                  allow_no_public=True)
  assert len(zero_shot.public) == 0 and len(zero_shot.private) == 12
