"""Defaults shared by every dataset config.

Every hyperparameter of the private runs is a fixed default written here (or
in a dataset config), or is chosen from public data by a rule named here.
None was tuned on private or test data. Override any field from the command
line: ``--config.train.epochs=30``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # --- data ----------------------------------------------------------------
  config.dataset = "digits"
  config.dataset_kwargs = ml_collections.ConfigDict()  # e.g. data_dir, path
  config.backbone = "identity"
  config.backbone_kwargs = ml_collections.ConfigDict()
  config.feature_cache_dir = ""  # "" -> $XDG_CACHE_HOME/adamix_jax/features
  config.feature_batch_size = 64
  config.public_per_class = 5  # k-shot public examples per class
  config.private_per_class = -1  # -1: every remaining training example
  config.max_test_examples = -1  # -1: the whole test split
  # Fitted on the public examples only (see features/preprocess.py).
  config.preprocess = "center"

  # --- experiment grid -----------------------------------------------------
  config.methods = ("paragon", "public_only", "dp_sgd", "adamix")
  config.epsilons = (1.0, 3.0, 8.0)
  config.delta = 1e-5
  # delta >= 1/n_private allows releasing an example outright: refused
  # unless explicitly allowed.
  config.allow_large_delta = False
  config.seeds = (0, 1, 2)

  # --- what is trained: a linear head on the features ("linear"), or every
  # parameter of a Flax model ("cnn", see digits_cnn.py) --------------------
  config.model = ml_collections.ConfigDict()
  config.model.kind = "linear"

  # --- non-private heads (public init, paragon): CV'd weight decay --------
  config.cv_folds = 5

  # --- private training: ONE rule for dp_sgd and adamix --------------------
  config.train = ml_collections.ConfigDict()
  config.train.epochs = 50  # T = epochs / q steps
  config.train.sampling_rate = 0.1  # Poisson rate q
  config.train.learning_rate = 2.0  # in units of the clipping threshold
  config.train.lr_schedule = "cosine"
  config.train.average_tail = 0.5  # average the iterates of the last half
  config.train.clip_norm = 1.0  # dp_sgd's fixed threshold (||grad|| <= 2)
  config.train.path = "closed_form"  # or "vmap" (same update, slower)
  # Checkpoint the state and the ledger every this many private steps (and
  # at the end of each run); a rerun resumes from the latest one.
  config.train.checkpoint_every = 100

  # --- AdaMix components (each can be switched off for the ablation) ------
  config.adamix = ml_collections.ConfigDict()
  config.adamix.public_init = True  # start from (and pull to) the public model
  config.adamix.adaptive_threshold = True  # C_t from public gradient norms
  config.adamix.threshold_quantile = 0.5
  config.adamix.normalize_by_threshold = True
  config.adamix.subspace = "none"  # "none" | "features" | "gradients"
  config.adamix.subspace_rank = 0
  config.adamix.refresh_every = 10
  # How a "gradients" subspace is refreshed: "iterative" (warm-started block
  # subspace iteration + Rayleigh-Ritz, cheap) or "eigh" (exact top-k).
  config.adamix.subspace_method = "iterative"
  config.adamix.public_weight = 0.0  # alpha, the exact public gradient's weight
  # The paper mixes at set-size weight alpha = n_pub / (n_pub + n_priv).
  config.adamix.public_weight_by_set_size = True
  config.adamix.pull = 0.0  # lambda * (w - w_0)

  # --- individual privacy (issue #13; linear heads) -------------------------
  # Each private run records every private example's clipping ratio at every
  # step, inside its jitted step (a pass over the whole private set per step,
  # (N, L + 1) int32 counts in the state: measured +0.2 ms CPU per step and
  # 51.0 s vs 46.8 s CPU for the default digits run), next to its ledger as
  # individual_counts.npz; the 'analysis' stage (--stages analysis) turns
  # them into individual epsilons. Those depend on the private data: an
  # analysis for the data owner, never a figure to publish.
  config.analysis = ml_collections.ConfigDict()
  config.analysis.individual_privacy = True
  config.analysis.individual_levels = 100  # ratios rounded up to a 1/L grid

  # --- zero-shot (no public images) ----------------------------------------
  # With public_per_class = 0, adamix starts from a CLIP text head (needs a
  # CLIP backbone); C_t falls back to train.clip_norm and a "features"
  # subspace to the span of the head's class embeddings.
  config.zero_shot_templates = ()  # () -> models.zero_shot.CLIP_TEMPLATES

  # --- the mechanism's coins (docs/design.md, invariant 6) -----------------
  # False (always, for real use): each private run draws its noise and its
  # batches from fresh OS entropy, kept only in its checkpoint. True derives
  # them from the public seed, as wave 1 did: reproducible, for debugging and
  # comparisons only, and the results then say "no privacy guarantee".
  config.insecure_reproducible_noise = False

  config.progress = True
  return config
