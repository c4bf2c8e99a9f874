"""The interface every feature backbone implements, and the identity backbone.

A backbone turns raw items (``HxWxC`` uint8 images, or feature vectors) into
fixed-size float32 embeddings in two steps with different homes:

* ``preprocess`` runs on the host (PIL resizing, colour conversion,
  normalisation) and returns one dense float32 ``NHWC`` batch;
* ``embed`` runs the network on the accelerator (jitted) and returns a
  ``(N, embed_dim)`` float32 numpy array.

Keeping the two apart lets the feature extractor pad every batch to one shape
so that ``embed`` compiles once.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np
from PIL import Image

# Channel statistics the pretrained networks were trained with, on [0, 1] pixels.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@runtime_checkable
class Backbone(Protocol):
  """A frozen feature extractor.

  Attributes:
    name: Identifies the backbone and its weights; it is part of the feature
      cache key, so two backbones with different weights need different names.
    image_size: Side of the square input images are resized to, or None for no
      resizing.
    embed_dim: Length of one embedding.
  """

  name: str
  image_size: int | None
  embed_dim: int

  def preprocess(self, images: Sequence[np.ndarray]) -> np.ndarray:
    """Host side: resizes, converts to RGB, normalises; returns float32 NHWC."""
    ...

  def embed(self, batch: np.ndarray) -> np.ndarray:
    """Device side: returns the (N, embed_dim) float32 embeddings of a batch."""
    ...


def to_rgb(image: np.ndarray) -> np.ndarray:
  """Returns an ``HxWx3`` view of a grayscale, RGB or RGBA image."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3:
    raise ValueError(f"Expected an HxW or HxWxC image, got shape {image.shape}.")
  channels = image.shape[-1]
  if channels == 1:
    return np.repeat(image, 3, axis=-1)
  if channels == 3:
    return image
  if channels == 4:
    # Alpha carries no class information; the pretrained nets never saw it.
    return image[:, :, :3]
  raise ValueError(f"Expected 1, 3 or 4 channels, got {channels} "
                   f"(image shape {image.shape}).")


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes an ``HxW`` or ``HxWxC`` uint8 image to ``size x size`` (bicubic).

  The aspect ratio is not kept: the datasets here are square or nearly so, and
  a crop would throw away parts of small images.
  """
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"Expected a uint8 image, got dtype {image.dtype}. Images "
                     "must hold 0..255 pixel values.")
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[:, :, 0]  # PIL has no HxWx1 mode.
  if image.shape[:2] == (size, size):
    return image
  return np.asarray(Image.fromarray(image).resize((size, size),
                                                  Image.Resampling.BICUBIC))


def normalized_rgb_batch(images: Sequence[np.ndarray], image_size: int,
                         mean: Sequence[float],
                         std: Sequence[float]) -> np.ndarray:
  """The usual pretrained-net preprocessing: resize, RGB, [0, 1], standardise.

  Args:
    images: uint8 images, ``HxW`` or ``HxWxC`` with 1, 3 or 4 channels.
    image_size: Output side length.
    mean: Per-channel mean on the [0, 1] scale.
    std: Per-channel standard deviation on the [0, 1] scale.

  Returns:
    A float32 ``(N, image_size, image_size, 3)`` array.
  """
  if len(images) == 0:
    return np.zeros((0, image_size, image_size, 3), np.float32)
  batch = np.stack([to_rgb(resize_image(image, image_size)) for image in images])
  batch = batch.astype(np.float32) / 255.0
  return (batch - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


class IdentityBackbone:
  """Uses the items themselves as features.

  Feature vectors pass through as float32; uint8 images are optionally resized
  to ``image_size`` and flattened, with pixels scaled to [0, 1]. Channels are
  kept as they are (a grayscale dataset stays one channel, so its feature
  dimension stays ``H * W``).

  ``embed_dim`` depends on the data: it is None until the first ``embed`` call
  unless given.
  """

  def __init__(self, image_size: int | None = None,
               embed_dim: int | None = None):
    self.name = "identity"
    self.image_size = image_size
    self.embed_dim = embed_dim

  def preprocess(self, images: Sequence[np.ndarray]) -> np.ndarray:
    """Stacks the items as float32, resizing images when ``image_size`` is set."""
    items = [np.asarray(item) for item in images]
    if not items:
      return np.zeros((0, 0), np.float32)
    if items[0].dtype == np.uint8:
      if self.image_size is not None:
        items = [resize_image(item, self.image_size) for item in items]
      shapes = {item.shape for item in items}
      if len(shapes) > 1:
        raise ValueError(
            f"Images of different shapes {sorted(shapes)[:3]} cannot be used "
            "as raw features; pass an image_size (or a resolution) so they "
            "are resized to one shape.")
      return np.stack(items).astype(np.float32) / 255.0
    return np.stack(items).astype(np.float32)

  def embed(self, batch: np.ndarray) -> np.ndarray:
    """Flattens each item; no device work is worth doing for a reshape."""
    batch = np.asarray(batch, np.float32)
    features = batch.reshape(len(batch), -1)
    if self.embed_dim is None:
      self.embed_dim = features.shape[1]
    elif features.shape[1] != self.embed_dim:
      raise ValueError(f"Identity backbone expected {self.embed_dim}-d items, "
                       f"got {features.shape[1]}-d.")
    return features
