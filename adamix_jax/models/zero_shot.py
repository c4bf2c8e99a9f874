"""CLIP zero-shot linear head: the public initialisation that needs no images.

``zero_shot_head`` builds the linear classifier CLIP uses for zero-shot
prediction: each class's weight vector is the (normalised) average text
embedding of the class name written into a few prompt templates. Applied to
L2-normalised CLIP image features it gives ``logit_scale * cos(image, class)``.

Privacy: the head is computed from the class names and the templates only. It
touches no image at all, public or private, so using it as the initial model
(in place of, or before, a few-shot public initialisation) costs no privacy
budget. The class names themselves are treated as public, like the label
space of any classifier.
"""

from __future__ import annotations

import re
from typing import Protocol, Sequence

import numpy as np

# A short ensemble from CLIP's ImageNet prompts (Radford et al., 2021): a few
# templates already recover most of the gain of the full 80.
CLIP_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a low resolution photo of a {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a cropped photo of a {}.",
)


class TextEncoder(Protocol):
  """What the head needs from a CLIP backbone (``hf.CLIPBackbone`` has it)."""

  logit_scale: float

  def text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
    ...


# Dataset bookkeeping in class names that CLIP would read as words: WordNet
# ids (Stanford Dogs: "n02085620-Chihuahua"), index prefixes (Caltech-256,
# CUB: "001.ak47") and Caltech-256's "-101" suffix ("145.motorbikes-101").
_WORDNET_ID = re.compile(r"^n\d{8}[-_]")
_INDEX_PREFIX = re.compile(r"^\d+\.")
_CALTECH_101_SUFFIX = re.compile(r"-101$")


def prompt_name(class_name: str) -> str:
  """The words of a class name as a prompt should say them.

  ``"n02085782-Japanese_spaniel"`` -> ``"Japanese spaniel"``,
  ``"001.ak47"`` -> ``"ak47"``, ``"aquarium_fish"`` -> ``"aquarium fish"``.
  A name that would become empty is kept as it was.
  """
  name = str(class_name).strip()
  for pattern in (_WORDNET_ID, _INDEX_PREFIX, _CALTECH_101_SUFFIX):
    name = pattern.sub("", name)
  name = " ".join(name.replace("_", " ").split())
  return name or str(class_name)


def _normalize_rows(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def zero_shot_head(clip_backbone: TextEncoder, class_names: Sequence[str],
                   templates: Sequence[str] = CLIP_TEMPLATES,
                   logit_scale: float | None = None) -> dict[str, np.ndarray]:
  """Builds CLIP's zero-shot classifier as linear-head parameters.

  For each class the templates are filled with the class name as
  ``prompt_name`` reads it (underscores as spaces, dataset ids and index
  prefixes dropped: ``n02085620-Chihuahua`` is prompted as "Chihuahua"),
  embedded and L2-normalised by the
  text tower, averaged, and re-normalised; the unit vectors become the columns
  of the kernel, scaled by ``logit_scale``.

  Uses no images, public or private: it costs no privacy.

  Args:
    clip_backbone: A CLIP backbone with ``text_embeddings`` and
      ``logit_scale`` (e.g. ``hf.CLIPBackbone``).
    class_names: One name per class, in label order.
    templates: Prompt templates, each with one ``{}`` for the class name.
    logit_scale: Multiplier of the unit columns; None uses the model's learned
      ``clip_backbone.logit_scale`` (100 for OpenAI's CLIP).

  Returns:
    ``{"kernel": (D, C) float32, "bias": (C,) float32 zeros}``, for a head
    ``logits = features @ kernel + bias`` on L2-normalised CLIP image features.
  """
  class_names = list(class_names)
  templates = list(templates)
  if not class_names:
    raise ValueError("zero_shot_head needs at least one class name.")
  if not templates:
    raise ValueError("zero_shot_head needs at least one template.")
  for template in templates:
    if template.count("{}") != 1:
      raise ValueError(f"Each template needs exactly one '{{}}' placeholder, "
                       f"got {template!r}.")
  readable = [prompt_name(name) for name in class_names]
  prompts = [template.format(name) for name in readable for template in templates]
  embeddings = np.asarray(clip_backbone.text_embeddings(prompts), np.float64)
  embeddings = _normalize_rows(embeddings)  # In case an encoder does not.
  embeddings = embeddings.reshape(len(class_names), len(templates), -1)
  class_vectors = _normalize_rows(embeddings.mean(axis=1))  # (C, D)
  scale = clip_backbone.logit_scale if logit_scale is None else logit_scale
  kernel = (float(scale) * class_vectors.T).astype(np.float32)
  return {"kernel": kernel, "bias": np.zeros(len(class_names), np.float32)}
