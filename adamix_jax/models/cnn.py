"""A small CNN for 8x8x1 digits: the full-model DP fine-tuning test case.

No batch norm (batch statistics would mix examples, so per-example
gradients would not be per-example); group norm would be fine but is not
needed at this size. About 14k parameters at the defaults.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax


class SmallCNN(nn.Module):
  """conv3x3-relu-avgpool2 (x2: 16, 32 channels) -> dense(64) -> logits.

  Input: (B, H, W, C) images (digits: (B, 8, 8, 1) in [0, 1]).
  """

  num_classes: int = 10
  channels: Sequence[int] = (16, 32)
  hidden: int = 64

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for channels in self.channels:
      x = nn.Conv(channels, (3, 3))(x)
      x = nn.relu(x)
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(self.num_classes)(x)
