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
  # The baselines get the same rules: DP-SGD (no public examples in
  # training), PILLAR (DP-SGD on the top public principal directions) and DP
  # class prototypes (one Gaussian release of the class sums).
  config.methods = ("paragon", "public_only", "dp_sgd", "pillar",
                    "dp_prototypes", "adamix")
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
  # Solver of those heads' weight-decay path and CV folds. "sklearn"
  # (default): scikit-learn's float64 L-BFGS, a per-fold Python loop on the
  # host; deterministic, and what every committed result used. "jax": optax
  # L-BFGS in float32, all folds of one decay vmapped in one jitted call;
  # meant for accelerators, where it frees the host (on a CPU it can win or
  # lose, see experiments/benchmarks/cv_solver_speed.py). Same objective;
  # the two agree closely but not bit for bit.
  config.cv_solver = "sklearn"
  # What w_0's CV folds score: "error" (held-out misclassifications; ties to
  # the larger decay) or "log_loss" (held-out cross-entropy). Development
  # splits (experiments/results/dev_sweeps/README.md, "Fifth round"):
  # log_loss picks smaller decays (digits 1e-4..1e-3 against 1e-2..1), a
  # better public-only model on digits (13.61 vs 15.88 %) but the same on
  # Fashion-MNIST, and a worse start for AdaMix (Fashion-MNIST 5 + 100/class
  # at eps 1: 24.42 vs 20.69 %; digits eps 3: 6.81 vs 6.26 %). The paragon
  # always scores errors.
  config.public_cv_scoring = "error"

  # --- private training of the linear head: ONE set of rules for every DP
  # method (dp_sgd, pillar, adamix; docs/design.md "Rules") -----------------
  config.train = ml_collections.ConfigDict()
  # "noise_aware" (default): noisy full-batch gradient descent whose steps,
  # step size and geometry follow from public data and (sigma_1, N, D, c)
  # by the rules below (adamix/noise_aware.py; measured in
  # experiments/results/noise_aware/). "fixed": the wave-1 schedule (Poisson
  # q = train.sampling_rate for train.epochs, lr in units of the threshold,
  # cosine), kept for the ablation and for full models.
  config.train.schedule = "noise_aware"
  config.train.epochs = 50  # fixed schedule: T = epochs / q steps
  config.train.sampling_rate = 0.1  # fixed schedule: Poisson rate q
  config.train.learning_rate = 2.0  # fixed: in units of the threshold
  config.train.lr_schedule = "cosine"  # fixed schedule only
  config.train.clip_norm = 1.0  # fixed schedule: dp_sgd's threshold
  # Average the iterates of the last half (post-processing): the noise of
  # the late, small steps averages out (ablation: last iterate is worse at
  # eps 3 and 8).
  config.train.average_tail = 0.5
  config.train.path = "closed_form"  # or "vmap" (same update, slower)
  # Checkpoint the state and the ledger every this many private steps (and
  # at the end of each run); a rerun resumes from the latest one. An orbax
  # save costs ~0.2 s of CPU against ~0.8 ms for a digits full-batch step
  # (a 4753-step run: 25.9 s user CPU at every 100, 15.4 s with no
  # intermediate save), so a linear head saves every 1000 steps (a few
  # seconds of work lost on a kill); full models set their own.
  config.train.checkpoint_every = 1000

  # The constants of the noise-aware rules, chosen on development splits of
  # the TRAINING data (digits and Fashion-MNIST 5 + 100 per class; never a
  # test set), then frozen (adamix/noise_aware.py says what each does).
  config.rules = ml_collections.ConfigDict()
  # C in units where public ||z||^2 ~ 2 (the largest per-example gradient
  # norm is ~2): fixed, so it cannot collapse as the public examples are
  # fitted (the wave-1 public-median threshold fell 0.21 -> 0.04 and froze
  # the run); C in {0.25, 0.5, 1} was flat on the development splits.
  config.rules.clip_norm = 0.5
  # The released noise norm nu(k) = sigma_1 C sqrt(k c) / N kept near this:
  # eps 1 on 1280-d features with 100 private per class keeps the n - 1 = 49
  # public directions, eps 8 the whole (whitened) space. Where the public
  # span cannot fill the budget (k_theta > n - 1), the full space is kept
  # once it overspends theta by less than the span underspends it
  # (noise_aware.geometry_choice; development splits of Fashion-MNIST with
  # 2000-4000 private examples at eps 1, dev_sweeps "Seventh round").
  config.rules.theta = 0.05
  # tau = eta T = kappa N / (sigma_1 C sqrt(c D_ref) (D_z / D_ref)^p):
  # kappa is set at D_ref = 64 (digits' 65-d geometry), where 15-30 were
  # equal on the development splits for AdaMix and DP-SGD and 60 worse for
  # AdaMix (uncapped, matched epsilons: 8.75 vs 10.24 % at eps 1).
  config.rules.kappa = 30.0
  config.rules.reference_dim = 64.0
  # p: how tau falls with the dimension. p = 1/2 (the parameter-noise
  # norm, the first rule) under-trained both methods on the 1281-d
  # Fashion-MNIST features: on development splits at matched epsilons
  # kappa 60 beat 30 there for DP-SGD by 0.7-4.3 points (25.63 vs 29.98 %
  # at eps 1 on 100/class) and for AdaMix's full geometry by 0.4-1.0,
  # while 30 was right at D = 65. The prediction noise of a flat direction
  # does not grow with D (p = 0); p = 1/4, the midpoint, gives kappa 63 at
  # D = 1281 and leaves D = 64 unchanged (adamix/noise_aware.py).
  config.rules.dim_power = 0.25
  # kappa is the parameter-noise norm a run may accumulate, so it scales
  # with the correction the geometry can learn: in a truncated top-k public
  # subspace (AdaMix when the full space does not fit under theta; PILLAR)
  # only the part inside it is learnable and every kept direction is fitted
  # fast. Development splits, subspace cells, kappa 15 vs 30 (error %):
  # Fashion-MNIST 100/class at the split's own epsilon 1: 21.5 vs 23.6 and
  # 21.5 vs 22.4, epsilon 3: 19.2 vs 20.0; at the full set's sigma_1 / N:
  # 21.6 vs 21.7 and 19.4 vs 19.7 (noise); PILLAR 25.2 vs 26.1. Better in
  # the noisier regimes, never worse. Full geometries keep 30 (digits eps 8:
  # 5.7 vs 6.1 at 15). experiments/results/dev_sweeps/README.md.
  config.rules.subspace_kappa = 15.0
  # Whitening ridge rho = ridge * tr(S) / D (a small ridge blew up the noise
  # in low-variance public directions: digits dev eps 1 16.3 % vs 10.9 %).
  config.rules.ridge = 10.0
  # Half the inverse-variance weight of the exact public gradient (the full
  # weight hurt Fashion-MNIST dev at eps 3 and 8: the public gradient is
  # in-sample for w_0).
  config.rules.public_trust = 0.5
  config.rules.min_steps = 20
  # A compute cap, not a regulariser: the tau rule decides T. At 1000 it
  # cut DP-SGD and PILLAR short in most cells (digits eps 3/8, Fashion-MNIST
  # 500/class eps 3/8) and so weakened the baselines; 20000 is above every
  # T the rules ask for on the visible suite. Where tau / eta would pass it
  # (N in the tens of thousands), eta grows up to 1/L so that the run still
  # reaches tau (noise_aware.schedule); a plan it still cuts short warns.
  # Also the zero-noise run's T.
  config.rules.max_steps = 20000

  # --- AdaMix components (each can be switched off for the ablation) ------
  config.adamix = ml_collections.ConfigDict()
  # Start from the public model w_0: W~ = W~_0 + M V with V from 0.
  config.adamix.public_init = True
  # "whitened": train in the whitened public geometry (the noise-norm rule
  # picks the full space or the top-k public directions); "none": in x~.
  config.adamix.geometry = "whitened"
  # The exact public gradient's weight: "noise_aware" (inverse-variance,
  # noise_aware.public_gradient_weight), "set_size" (the paper's
  # n_pub / (n_pub + n_priv)) or "constant" (adamix.public_weight).
  config.adamix.public_weight_rule = "noise_aware"
  config.adamix.public_weight = 0.0  # alpha when the rule is "constant"
  # The paper's adaptive threshold (a quantile of the public gradient norms)
  # and the lr / C_t step: used by the fixed schedule; off in the
  # noise-aware one (a fixed C; the step is not normalised).
  config.adamix.adaptive_threshold = False
  config.adamix.threshold_quantile = 0.5
  config.adamix.normalize_by_threshold = False
  config.adamix.subspace = "none"  # "none" | "features" | "gradients"
  config.adamix.subspace_rank = 0
  config.adamix.refresh_every = 10
  # How a "gradients" subspace is refreshed: "iterative" (warm-started block
  # subspace iteration + Rayleigh-Ritz, cheap) or "eigh" (exact top-k).
  config.adamix.subspace_method = "iterative"
  config.adamix.pull = 0.0  # lambda * (w - w_0) (hurt on every dev split)
  # Private model selection (privacy/selection.py, issue #15 item 4): a
  # per-record coin sends this fraction of the private set to a validation
  # part; AdaMix trains on the rest at the full epsilon, and report-noisy-max
  # at the full epsilon on the validation error counts picks one point of
  # w_0 + t (w - w_0), t in selection_path (disjoint parts: the same
  # (epsilon, delta) by parallel composition). 0 = off: see
  # experiments/results/private_selection/ for why it is off by default.
  config.adamix.selection_fraction = 0.0
  config.adamix.selection_path = (0.0, 0.25, 0.5, 0.75, 1.0)

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
