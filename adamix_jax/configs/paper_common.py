"""What the six paper dataset configs share: backbone choice, data_dir fields.

Each paper config (``oxford_pets.py``, ``cub200.py``, ``flowers102.py``,
``stanford_dogs.py``, ``mit67.py``, ``caltech256.py``) is
``paper_config(<dataset>, arg)``, where ``arg`` is the optional config string
after the file name, choosing the backbone:

  --config oxford_pets                  # efficientnet_lite0
  --config oxford_pets:clip_vit_b32     # CLIP ViT-B/32
  --config oxford_pets:resnet50         # ResNet-50

The Hugging Face backbones get a ``backbone_kwargs.name_or_path`` field (the
hub name by default), so an offline machine can point it at a local copy:
``--config.backbone_kwargs.name_or_path=/models/clip-vit-base-patch32``. A
command line can only override fields a config declares, which is why the
backbone is picked by the config string rather than by ``--config.backbone``
alone (that also works, but then ``name_or_path`` cannot be set).

Tuple fields are comma separated on the command line:
``--config.seeds=0,1``, ``--config.epsilons=1,8``,
``--config.methods=public_only,adamix,dp_sgd`` (the launcher splits strings
at the commas; a quoted Python literal such as
``--config.methods="('public_only','adamix')"`` works too).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from adamix_jax.configs import base

DEFAULT_BACKBONE = "efficientnet_lite0"

# The fields each backbone's constructor takes from backbone_kwargs. The
# EfficientNet keeps the ImageNet eval crop (crop_padding 32) for these
# natural, full-size images.
BACKBONE_KWARGS = {
    "efficientnet_lite0": {},
    "clip_vit_b32": {"name_or_path": "openai/clip-vit-base-patch32"},
    "resnet50": {"name_or_path": "microsoft/resnet-50"},
}

# Datasets read from an image folder (registry: _image_folder_loader); the
# others are TFDS datasets (data_dir None = $TFDS_DATA_DIR or
# ~/tensorflow_datasets).
IMAGE_FOLDER_DATASETS = ("mit67", "caltech256", "image_folder")


def paper_config(dataset: str, arg: str | None = None
                 ) -> ml_collections.ConfigDict:
  """The base config for one paper dataset, with the backbone ``arg`` names.

  Args:
    dataset: a name in ``adamix_jax.data.registry.KNOWN_SOURCES``.
    arg: the config string after ``file.py:``; None or "" is
      ``efficientnet_lite0``.

  Returns:
    The config (public k-shot, private set, grid and training rule all from
    ``base.py``).

  Raises:
    ValueError: ``arg`` names no known backbone.
  """
  backbone = arg or DEFAULT_BACKBONE
  if backbone not in BACKBONE_KWARGS:
    raise ValueError(f"Unknown backbone {backbone!r} after ':' in --config; "
                     f"choose one of {sorted(BACKBONE_KWARGS)}.")
  config = base.get_config()
  config.dataset = dataset
  # Declared (None) so that the command line can set it. For the image-folder
  # datasets it is required: left unset, the features stage stops with a
  # message saying how the folder must be laid out.
  config.dataset_kwargs.data_dir = config_dict.placeholder(str)
  if dataset in IMAGE_FOLDER_DATASETS:
    # Only used when the folder has no train/ and test/ sub-folders.
    config.dataset_kwargs.test_fraction = 0.2
    config.dataset_kwargs.split_seed = 0
  config.backbone = backbone
  for key, value in BACKBONE_KWARGS[backbone].items():
    config.backbone_kwargs[key] = value
  return config
