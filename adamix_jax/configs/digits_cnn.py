"""Full-model DP fine-tuning of a small CNN on the 8x8 digits images.

Run (paragon, public-only, DP-SGD and AdaMix x epsilon {1, 3, 8} x 3 seeds;
writes WORKDIR/results.{json,md}):

  adamix-train --config digits_cnn --workdir /tmp/adamix_digits_cnn
  adamix-train --config digits_cnn --workdir /tmp/cnn_quick \
      --config.train.epochs=5 --config.seeds=0, --config.epsilons=3,

Unlike the linear-head runs, every parameter of the CNN
(``adamix_jax/models/cnn.py``, ~14k) is trained privately
(``adamix_jax/train/full_model.py``, through the same stages as every run:
``config.model.kind = "cnn"`` picks ``experiment.recipe.FullModelRecipe``):

* public-only: the CNN trained (non-privately) on the 5 public images per
  class; it is AdaMix's starting point w_0;
* DP-SGD: random init, fixed clipping norm, no public data;
* AdaMix: from w_0, private per-example gradients projected onto the top-k
  right singular vectors of the public per-example gradients (recomputed
  every ``refresh_every`` steps), clipped to the median public gradient norm
  in that subspace, noised there, mapped back;
* paragon: non-private, all training images.

The fixed values below were not tuned on private or test data.
"""

import ml_collections

from adamix_jax.configs import base


def get_config():
  config = base.get_config()
  config.dataset = "digits"
  config.dataset_kwargs = ml_collections.ConfigDict(
      {"test_fraction": 0.3, "split_seed": 0})
  config.dataset_label = "digits_cnn"
  config.image_shape = (8, 8, 1)
  config.public_per_class = 5
  config.private_per_class = -1
  config.model.kind = "cnn"
  config.model.channels = (16, 32)
  config.model.hidden = 64

  # Non-private full-batch AdamW: the public model w_0 and the paragon. Each
  # step sees every example, so its length is non_private.steps, not
  # train.epochs (which sets the private runs' T = epochs / q).
  config.non_private = ml_collections.ConfigDict()
  config.non_private.steps = 300
  config.non_private.learning_rate = 1e-2
  config.non_private.weight_decay = 1e-4

  config.methods = ("paragon", "public_only", "dp_sgd", "adamix")
  # Private training: one rule for dp_sgd and adamix (the noise-aware rules
  # are for linear heads; a full model runs the fixed schedule).
  config.train.schedule = "fixed"
  config.train.epochs = 20  # T = epochs / q
  config.train.sampling_rate = 0.1
  config.train.learning_rate = 1.0  # SGD step, in units of the threshold
  config.train.momentum = 0.0  # plain SGD, as the linear-head runs
  config.train.clip_norm = 1.0  # dp_sgd's fixed threshold
  config.train.microbatch_size = 0  # 0: the whole (per-device) batch at once
  config.train.checkpoint_every = 100  # steps; a rerun resumes from the last

  config.adamix.projection_rank = 20  # top-k public gradient directions
  config.adamix.refresh_every = 10
  config.adamix.adaptive_threshold = True
  config.adamix.threshold_quantile = 0.5
  return config
