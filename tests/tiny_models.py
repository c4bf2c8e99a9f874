"""Tiny randomly initialised Hugging Face models that need no download.

Shared by the real-data tests: saved with ``save_pretrained`` to a local
directory and loaded back exactly as a downloaded checkpoint would be.
"""

from __future__ import annotations

import json
import os


def write_byte_level_clip_tokenizer(directory: str) -> int:
  """Writes a CLIP tokenizer that needs no download; returns its vocab size."""
  import transformers  # pylint: disable=g-import-not-at-top
  from transformers.models.clip import tokenization_clip  # pylint: disable=g-import-not-at-top
  byte_symbols = list(tokenization_clip.bytes_to_unicode().values())
  # The end-of-text token gets the highest id: CLIP pools the text tower at
  # the argmax of the token ids.
  tokens = (byte_symbols + [s + "</w>" for s in byte_symbols] +
            ["<|startoftext|>", "<|endoftext|>"])
  vocab_path = os.path.join(directory, "vocab.json")
  merges_path = os.path.join(directory, "merges.txt")
  with open(vocab_path, "w", encoding="utf-8") as f:
    json.dump({token: i for i, token in enumerate(tokens)}, f)
  with open(merges_path, "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n")
  transformers.CLIPTokenizer(vocab_path, merges_path).save_pretrained(directory)
  return len(tokens)


def save_tiny_clip(directory: str, *, image_size: int = 32, patch_size: int = 4,
                   projection_dim: int = 16, max_text_length: int = 24) -> str:
  """A 2-layer, 32-wide random FlaxCLIPModel plus tokenizer in ``directory``."""
  import transformers  # pylint: disable=g-import-not-at-top
  vocab_size = write_byte_level_clip_tokenizer(directory)
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=vocab_size, hidden_size=32,
                       intermediate_size=37, num_hidden_layers=2,
                       num_attention_heads=2,
                       max_position_embeddings=max_text_length,
                       bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                       pad_token_id=vocab_size - 1),
      vision_config=dict(hidden_size=32, intermediate_size=37,
                         num_hidden_layers=2, num_attention_heads=2,
                         image_size=image_size, patch_size=patch_size),
      projection_dim=projection_dim)
  transformers.FlaxCLIPModel(config, seed=0).save_pretrained(directory)
  return directory
