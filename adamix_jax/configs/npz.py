"""Your own features: an ``.npz`` of precomputed embeddings (generic dataset).

Data: ``--config.dataset_kwargs.path=FILE.npz`` written with

  np.savez(FILE, x_train=(N, D) floats, y_train=(N,) ints,
           x_test=(M, D) floats, y_test=(M,) ints,
           class_names=np.array(names, dtype=str))   # class_names optional

Run (all four methods x epsilon {1, 3, 8} x 3 seeds, a linear head on the
features as given):

  adamix-train --config.dataset=npz --config.dataset_kwargs.path=FILE.npz \
      --workdir /tmp/my_features

(without ``--config``, ``--config.dataset=npz`` starts from this config;
``--config npz`` is the same). Results are labelled with the file's name
(or ``--config.dataset_kwargs.name=NAME``). The features are centred with
the public examples' mean and L2-normalised (``preprocess``), as every
other dataset's.
"""

import ml_collections
from ml_collections import config_dict

from adamix_jax.configs import base


def get_config() -> ml_collections.ConfigDict:
  config = base.get_config()
  config.dataset = "npz"
  config.dataset_kwargs.path = config_dict.placeholder(str)
  config.dataset_kwargs.name = config_dict.placeholder(str)
  config.backbone = "identity"
  return config
