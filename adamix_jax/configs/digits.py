"""scikit-learn digits (embedded, no download): the default experiment.

Run (all four methods x epsilon {1, 3, 8} x 3 seeds, ~2 minutes on 2 cores):

  adamix-train --config digits --workdir /tmp/adamix_digits

The 1797 8x8 images are split 70/30 into train/test (stratified, fixed
split_seed); 5 training images per class are public, the other ~1200 private.
"""

from adamix_jax.configs import base


def get_config():
  config = base.get_config()
  config.dataset = "digits"
  config.dataset_kwargs.test_fraction = 0.3
  config.dataset_kwargs.split_seed = 0
  return config
