"""Hugging Face Flax backbones: ResNet-50 and CLIP (image and text towers).

``transformers`` is an optional dependency (``pip install -e '.[hf]'``), so it
is imported only when one of these backbones is built. Both load by hub name
(needs network, or a warm Hugging Face cache) or from a local directory made
with ``save_pretrained`` / ``huggingface-cli download``.

The Flax models take NCHW pixels and transpose them to NHWC internally; the
backbones here take NHWC (like every other backbone) and transpose inside the
jitted function, where XLA cancels the two transposes.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from adamix_jax.models import base

_INSTALL_HINT = "pip install -e '.[hf]'"


def _transformers():
  """Imports transformers, or says how to install it."""
  try:
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ImportError(
        "The Hugging Face backbones (resnet50, clip_vit_b32) need the "
        f"`transformers` package. Install it with: {_INSTALL_HINT}") from error
  return transformers


def _from_pretrained(model_class: Any, name_or_path: str, what: str,
                     **kwargs: Any) -> Any:
  """Calls ``model_class.from_pretrained``, turning load failures into advice."""
  try:
    return model_class.from_pretrained(name_or_path, **kwargs)
  except (OSError, ValueError) as error:
    if os.path.isdir(name_or_path):
      advice = (f"{name_or_path!r} is a directory but does not hold a "
                f"loadable {what} (config.json plus flax_model.msgpack, or "
                "PyTorch weights with from_pt=True, which needs torch).")
    else:
      advice = (
          f"{name_or_path!r} is not a local directory, so it was looked up "
          "on the Hugging Face hub / in the local HF cache. Without network "
          "access, download it on a connected machine (`huggingface-cli "
          f"download {name_or_path} --local-dir DIR`) and pass DIR instead, "
          "or point HF_HOME at a cache that holds it (with HF_HUB_OFFLINE=1 "
          "the hub is not retried).")
    raise OSError(f"Could not load the {what} {name_or_path!r}. {advice} "
                  f"Original error: {error}") from error


def _l2_normalize(x: jax.Array) -> jax.Array:
  # The epsilon only guards an all-zero row, which a real embedding never is.
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class HFResNetBackbone:
  """A ResNet from ``transformers.FlaxResNetModel``; embeddings = pooled output.

  With the default ``microsoft/resnet-50`` these are the 2048-d global average
  pooled features of an ImageNet-1k ResNet-50, on 224x224 ImageNet-normalised
  inputs.
  """

  def __init__(self, name_or_path: str = "microsoft/resnet-50",
               image_size: int = 224, **from_pretrained_kwargs: Any):
    """Loads the model.

    Args:
      name_or_path: Hub name or local directory.
      image_size: Input side length (ResNets accept any size; 224 matches the
        ImageNet training resolution).
      **from_pretrained_kwargs: Passed to ``from_pretrained`` (e.g.
        ``from_pt=True`` for a PyTorch-only checkpoint).
    """
    transformers = _transformers()
    self.model = _from_pretrained(transformers.FlaxResNetModel, name_or_path,
                                  "ResNet model", **from_pretrained_kwargs)
    self.name_or_path = name_or_path
    self.name = f"hf_resnet:{name_or_path}"
    self.image_size = int(image_size)
    self.embed_dim = int(self.model.config.hidden_sizes[-1])
    # Params stay on the device across batches instead of being re-sent.
    self._params = jax.device_put(self.model.params)
    model = self.model

    def embed_fn(params, batch_nhwc):
      outputs = model(jnp.transpose(batch_nhwc, (0, 3, 1, 2)), params=params,
                      train=False)
      pooled = outputs.pooler_output  # (N, C, 1, 1)
      return pooled.reshape(pooled.shape[0], -1)

    self._embed_fn = jax.jit(embed_fn)

  def preprocess(self, images: Sequence[np.ndarray]) -> np.ndarray:
    return base.normalized_rgb_batch(images, self.image_size,
                                     base.IMAGENET_MEAN, base.IMAGENET_STD)

  def embed(self, batch: np.ndarray) -> np.ndarray:
    return np.asarray(self._embed_fn(self._params, jnp.asarray(batch)),
                      np.float32)


class CLIPBackbone:
  """CLIP image features (L2-normalised) from ``transformers.FlaxCLIPModel``.

  The image embeddings live on the unit sphere, as do the text embeddings
  from ``text_embeddings``, so a linear head whose columns are scaled text
  embeddings (see ``zero_shot.zero_shot_head``) computes CLIP's zero-shot
  logits.
  """

  def __init__(self, name_or_path: str = "openai/clip-vit-base-patch32",
               **from_pretrained_kwargs: Any):
    """Loads the model (the tokenizer is loaded on first use of the text tower).

    Args:
      name_or_path: Hub name or local directory.
      **from_pretrained_kwargs: Passed to ``from_pretrained``.
    """
    transformers = _transformers()
    self.model = _from_pretrained(transformers.FlaxCLIPModel, name_or_path,
                                  "CLIP model", **from_pretrained_kwargs)
    self.name_or_path = name_or_path
    self.name = f"clip:{name_or_path}"
    config = self.model.config
    self.image_size = int(config.vision_config.image_size)
    self.embed_dim = int(config.projection_dim)
    self.max_text_length = int(config.text_config.max_position_embeddings)
    self._params = jax.device_put(self.model.params)
    self._tokenizer = None
    model = self.model

    def image_fn(params, batch_nhwc):
      features = model.get_image_features(
          jnp.transpose(batch_nhwc, (0, 3, 1, 2)), params=params)
      return _l2_normalize(features)

    def text_fn(params, input_ids, attention_mask):
      features = model.get_text_features(input_ids, attention_mask=attention_mask,
                                         params=params)
      return _l2_normalize(features)

    self._image_fn = jax.jit(image_fn)
    self._text_fn = jax.jit(text_fn)

  @property
  def logit_scale(self) -> float:
    """CLIP's learned softmax temperature, exp(logit_scale) (100 for OpenAI's)."""
    return float(np.exp(np.asarray(self.model.params["logit_scale"])))

  @property
  def tokenizer(self) -> Any:
    if self._tokenizer is None:
      transformers = _transformers()
      self._tokenizer = _from_pretrained(transformers.AutoTokenizer,
                                         self.name_or_path, "CLIP tokenizer")
    return self._tokenizer

  def preprocess(self, images: Sequence[np.ndarray]) -> np.ndarray:
    return base.normalized_rgb_batch(images, self.image_size, base.CLIP_MEAN,
                                     base.CLIP_STD)

  def embed(self, batch: np.ndarray) -> np.ndarray:
    return np.asarray(self._image_fn(self._params, jnp.asarray(batch)),
                      np.float32)

  def text_embeddings(self, texts: Sequence[str],
                      batch_size: int = 256) -> np.ndarray:
    """Returns the L2-normalised ``(len(texts), embed_dim)`` text embeddings.

    Every batch is padded to ``max_text_length`` tokens and ``batch_size``
    rows, so the text tower compiles once.
    """
    texts = [str(text) for text in texts]
    if not texts:
      return np.zeros((0, self.embed_dim), np.float32)
    tokens = self.tokenizer(texts, padding="max_length", truncation=True,
                            max_length=self.max_text_length, return_tensors="np")
    input_ids = np.asarray(tokens["input_ids"], np.int32)
    attention_mask = np.asarray(tokens["attention_mask"], np.int32)
    rows = min(batch_size, len(texts))
    outputs = []
    for start in range(0, len(texts), rows):
      ids = input_ids[start:start + rows]
      mask = attention_mask[start:start + rows]
      count = len(ids)
      if count < rows:
        # Pad with copies of the first row; those outputs are dropped below.
        ids = np.concatenate([ids, np.repeat(ids[:1], rows - count, axis=0)])
        mask = np.concatenate([mask, np.repeat(mask[:1], rows - count, axis=0)])
      embedded = self._text_fn(self._params, jnp.asarray(ids), jnp.asarray(mask))
      outputs.append(np.asarray(embedded, np.float32)[:count])
    return np.concatenate(outputs)
