"""Zero-shot prompts say the class, not the dataset's bookkeeping.

A WordNet id or an index prefix in a prompt ("a photo of a n02085620-
Chihuahua.") is text CLIP never saw with such images; the head must be built
from the readable name. No model needed: a recording text encoder.
"""

import numpy as np
import pytest

from adamix_jax.models import zero_shot


@pytest.mark.parametrize("raw, readable", [
    ("n02085782-Japanese_spaniel", "Japanese spaniel"),  # Stanford Dogs
    ("n02090622-borzoi", "borzoi"),
    ("001.ak47", "ak47"),  # Caltech-256
    ("145.motorbikes-101", "motorbikes"),
    ("200.Common_Yellowthroat", "Common Yellowthroat"),  # CUB-200
    ("aquarium_fish", "aquarium fish"),  # CIFAR-100
    ("black-and-tan_coonhound", "black-and-tan coonhound"),
    ("livingroom", "livingroom"),  # MIT-67: already words
    ("n01234567_", "n01234567_"),  # nothing left after stripping: kept
])
def test_zero_shot_prompt_name_strips_dataset_ids(raw, readable):
  assert zero_shot.prompt_name(raw) == readable


class _RecordingEncoder:
  logit_scale = 100.0

  def __init__(self):
    self.texts = []

  def text_embeddings(self, texts):
    self.texts += list(texts)
    rng = np.random.default_rng(len(self.texts))
    return rng.normal(size=(len(texts), 8))


def test_zero_shot_head_prompts_use_readable_names():
  encoder = _RecordingEncoder()
  head = zero_shot.zero_shot_head(encoder, ["n02085620-Chihuahua", "001.ak47"],
                                  templates=("a photo of a {}.",))
  assert encoder.texts == ["a photo of a Chihuahua.", "a photo of a ak47."]
  assert head["kernel"].shape == (8, 2)
