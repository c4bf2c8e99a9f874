"""Backbones by name, as configs and command lines spell them.

Each backbone's module is imported only when that backbone is asked for, so a
run with the identity backbone needs neither ``transformers`` nor the
EfficientNet weights package.
"""

from __future__ import annotations

from typing import Any

from adamix_jax.models import base

KNOWN_BACKBONES = ("identity", "efficientnet_lite0", "resnet50", "clip_vit_b32")


def get_backbone(name: str, **kwargs: Any) -> base.Backbone:
  """Builds the backbone called ``name``.

  Args:
    name: One of ``KNOWN_BACKBONES``.
    **kwargs: Passed to the backbone's constructor (e.g. ``name_or_path`` for
      the Hugging Face ones, ``checkpoint_path`` for EfficientNet-Lite0,
      ``image_size`` for identity).

  Returns:
    The backbone.

  Raises:
    ValueError: For an unknown name.
  """
  if name == "identity":
    return base.IdentityBackbone(**kwargs)
  if name == "efficientnet_lite0":
    from adamix_jax.models import efficientnet_lite  # pylint: disable=g-import-not-at-top
    return efficientnet_lite.EfficientNetLite0Backbone(**kwargs)
  if name == "resnet50":
    from adamix_jax.models import hf  # pylint: disable=g-import-not-at-top
    return hf.HFResNetBackbone(**kwargs)
  if name == "clip_vit_b32":
    from adamix_jax.models import hf  # pylint: disable=g-import-not-at-top
    return hf.CLIPBackbone(**kwargs)
  raise ValueError(f"Unknown backbone {name!r}; known backbones: "
                   f"{', '.join(KNOWN_BACKBONES)}.")
