"""Noise-aware rules for private training of a linear head, from public data.

Every quantity here is a function of the PUBLIC examples and of (sigma_1,
N, D, c) only (invariant 3): sigma_1 is the noise multiplier of ONE
full-batch Gaussian release at the whole budget, a function of (epsilon,
delta) alone; N, the private set size, is treated as public, as everywhere
in the project. The rules were chosen on development splits carved from the
TRAINING data (never the test data) and then frozen; the evidence is in
experiments/results/noise_aware/ and README "The method".

The private run they configure ("AdaMix-W") is noisy full-batch gradient
descent (q = 1) on a correction V of the public model in a public geometry:

  W~ = W~_0 + M V,  z = x~ M,  logits = x~ W~_0 + z V,

with V from 0, each example's gradient z_i e_i^T clipped to a fixed C,
N(0, (sigma_T C)^2) added once to the sum, mixed with the exact public
gradient, step eta, T steps, the average of the last half released.

1. Geometry (``public_geometry``, ``geometry_choice``). S = X~p^T X~p / n.
   Keep the released noise norm nu(k) = sigma_1 C sqrt(k c) / N (the
   per-coordinate noise of the run's averaged gradient times the root of
   the number of noisy coordinates) near ``theta``: if the full space fits,
   M = (S + rho I)^-1/2 (ridge whitening); else the top-k eigenvectors of S
   with k the largest that fits (at most n - 1), whitened
   (lam + rho)^-1/2, unless those n - 1 directions leave more of the
   budget unspent than the full space overspends it. Rescaled so that the
   median public ||z|| is sqrt(2), the scale C refers to. Why: the noise is isotropic in
   the space where the gradient is clipped; in the whitened public geometry
   it hits the directions that carry signal no harder than the others, and
   the dimension rule keeps its total norm a fixed fraction of a gradient.
2. Schedule (``schedule``). eta = 1 / (2 L), L = lambda_max(Zp^T Zp / n) / 2
   (the smoothness of the mean cross-entropy in z, softmax curvature <= 1/2,
   estimated on public data); the "time"

     tau = eta T = kappa N / (sigma_1 C sqrt(c D_ref) (D_z / D_ref)^p)

   (early stopping: noise accumulates in flat directions in proportion to
   tau, so tau shrinks with the noise); T clipped to [min_steps,
   max_steps]. kappa is the noise the run may accumulate before it stops,
   set at the reference dimension D_ref (``reference_dim``); where tau /
   eta passes ``max_steps`` (large N) the steps lengthen up to 1/L so the
   cap does not cut tau short. How it scales
   with D_z (``dim_power`` p): the parameter-noise NORM grows like
   sqrt(D_z) (p = 1/2, the first rule), but what the noise does to a
   prediction, x~ . xi, does not grow with D_z at all (its variance is the
   per-coordinate noise times ||x~||^2, fixed by the scaling): p = 0. The
   truth lies between (not every direction is flat); p = 1/4 is the
   midpoint, and it matched the development splits at both ends of the
   suite's dimensions (D = 65 and 1281; configs/base.py). kappa also
   scales with the size of the correction the geometry can learn: in a
   truncated top-k subspace (the high-noise case) only the part of the
   correction inside it is learnable and every kept direction is stiff
   (fitted in a few relaxation times), so it gets the smaller
   ``subspace_kappa``. Full batch: with q = 1 the privacy cost does not
   depend on T (T Gaussian releases compose to one), and it has the least
   noise per averaged gradient at a given epsilon under PLD.
3. Public gradient weight (``public_gradient_weight``): both mean gradients
   estimate the population gradient; their error variances are ~C^2/n
   (public) and C^2/N + 2 sigma_1^2 C^2 D_z c / N^2 (private: sampling plus
   the DP noise of the tail-averaged gradient); inverse-variance weighting,
   damped by ``public_trust`` (the public gradient is in-sample for w_0).
   At sigma = 0 and trust 1 it is the paper's set-size weight n / (n + N).

DP-SGD, the baseline, gets the same rules where they apply without public
examples in training: q = 1, C, eta (L from the public second moment: a
hyperparameter rule only; the data-free bound L <= 1 without public data),
the tau rule with D_z = D, tail averaging, zero start.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Optional

import numpy as np

from adamix_jax.privacy import accounting

GEOMETRIES = ("whitened", "none")
# Geometry.kind values that are a truncated public subspace (AdaMix's top-k
# whitened directions, PILLAR's top-k principal directions): their schedule
# takes rules.subspace_kappa.
TRUNCATED_KINDS = ("subspace", "pca")


@dataclasses.dataclass(frozen=True)
class Rules:
  """The constants of the rules (configs/base.py sets them, with reasons).

  Attributes:
    clip_norm: C, in units where public ||z||^2 ~ 2 (the largest per-example
      gradient norm is about 2).
    theta: the budget of the released noise norm nu(k).
    kappa: tau = kappa N / (sigma_1 C sqrt(c D_ref) (D_z / D_ref)^p) in a
      full geometry.
    subspace_kappa: kappa in a truncated public subspace (AdaMix's top-k
      whitened directions when the full space does not fit under theta;
      PILLAR's top-k principal directions).
    reference_dim: D_ref, the dimension at which kappa is set.
    dim_power: p, how tau falls with D_z (1/2: with the parameter-noise
      norm; 0: not at all).
    ridge: rho of the whitening, in units of tr(S) / D.
    public_trust: the fraction of the inverse-variance public weight used.
    min_steps, max_steps: T is clipped to this range (max_steps also when
      there is no noise).
  """

  clip_norm: float = 0.5
  theta: float = 0.05
  kappa: float = 30.0
  subspace_kappa: float = 15.0
  reference_dim: float = 64.0
  dim_power: float = 0.25
  ridge: float = 10.0
  public_trust: float = 0.5
  min_steps: int = 20
  max_steps: int = 20000

  def __post_init__(self):
    for name in ("clip_norm", "theta", "kappa", "subspace_kappa",
                 "reference_dim", "ridge"):
      if not getattr(self, name) > 0:
        raise ValueError(f"rules.{name} must be > 0, got "
                         f"{getattr(self, name)}.")
    if not 0.0 <= self.dim_power <= 0.5:
      raise ValueError(f"rules.dim_power must be in [0, 1/2] (between no "
                       f"growth and the noise norm's sqrt), got "
                       f"{self.dim_power}.")
    if not 0.0 <= self.public_trust <= 1.0:
      raise ValueError(f"rules.public_trust must be in [0, 1], got "
                       f"{self.public_trust}.")
    if not 1 <= self.min_steps <= self.max_steps:
      raise ValueError("need 1 <= rules.min_steps <= rules.max_steps, got "
                       f"{self.min_steps}, {self.max_steps}.")


def single_release_sigma(epsilon: float, delta: float) -> float:
  """sigma_1: the noise multiplier of one full-batch Gaussian release that
  spends the whole (epsilon, delta); a function of the budget alone."""
  return accounting.calibrate_noise_multiplier(float(epsilon), float(delta),
                                               1.0, 1)


def released_noise_norm(sigma_1: float, clip_norm: float, dim: int,
                        num_classes: int, num_private: int) -> float:
  """nu(k) = sigma_1 C sqrt(k c) / N."""
  return sigma_1 * clip_norm * math.sqrt(dim * num_classes) / num_private


def noisy_dim_budget(sigma_1: float, num_private: int, num_classes: int,
                     rules: Rules) -> int:
  """The largest k with nu(k) <= theta (the dimension rule of rule 1)."""
  return int((rules.theta * num_private / (sigma_1 * rules.clip_norm)) ** 2 /
             num_classes)


@dataclasses.dataclass(frozen=True)
class Geometry:
  """A public feature map M (D, D_z): z = x~ M, W~ = W~_0 + M V."""

  feature_map: np.ndarray
  kind: str  # "full" (whitening of every direction) or "subspace"

  @property
  def dim(self) -> int:
    return self.feature_map.shape[1]


def _second_moment(public_x_aug: np.ndarray) -> np.ndarray:
  x = np.asarray(public_x_aug, np.float64)
  return x.T @ x / len(x)


def geometry_choice(dim: int, num_public: int, sigma_1: float,
                    num_private: int, num_classes: int,
                    rules: Rules) -> tuple[str, int]:
  """("full", D) or ("subspace", k): which geometry rule 1 trains in.

  The candidates are the full whitened space (noise norm nu(D)) and the
  top-k public directions with k = min(k_theta, n - 1) (k_theta the
  largest k with nu(k) <= theta; the public examples span at most n - 1
  centred directions). The one whose noise norm is nearer theta, as a
  ratio, is kept: if the full space fits (nu(D) <= theta) it wins; if the
  public span can fill the budget (k_theta <= n - 1) the subspace spends
  it exactly and wins. Between the two, where N is large enough that
  k_theta passes n - 1 but not D, the span under-spends the budget by
  theta / nu(n - 1) and the full space over-spends it by nu(D) / theta:
  the full space is kept once k_theta >= sqrt(D (n - 1)). (The first rule,
  full only if nu(D) <= theta, kept 49 public directions for a Fashion-MNIST
  set of 4000 private examples at epsilon 1, where k_theta ~ 1150 of 1281:
  the full space was better on every development seed; dev_sweeps
  "Seventh round".)
  """
  nu_full = released_noise_norm(sigma_1, rules.clip_norm, dim, num_classes,
                                num_private)
  if nu_full <= rules.theta:
    return "full", dim
  k = max(1, min(num_public - 1,
                 noisy_dim_budget(sigma_1, num_private, num_classes, rules)))
  nu_span = released_noise_norm(sigma_1, rules.clip_norm, k, num_classes,
                                num_private)
  if nu_full / rules.theta <= rules.theta / nu_span:
    return "full", dim
  return "subspace", k


def public_geometry(public_x_aug: np.ndarray, sigma_1: float, num_private: int,
                    num_classes: int, rules: Rules) -> Geometry:
  """The whitened public geometry of rule 1 (public examples only)."""
  public_x_aug = np.asarray(public_x_aug, np.float64)
  n, dim = public_x_aug.shape
  if n < 2:
    raise ValueError("the public geometry needs at least 2 public examples; "
                     "use config.adamix.geometry='none'.")
  second = _second_moment(public_x_aug)
  eigvals, eigvecs = np.linalg.eigh(second)
  eigvals, eigvecs = np.maximum(eigvals[::-1], 0.0), eigvecs[:, ::-1]
  rho = rules.ridge * np.trace(second) / dim
  kind, k = geometry_choice(dim, n, sigma_1, num_private, num_classes, rules)
  feature_map = eigvecs[:, :k] * (eigvals[:k] + rho) ** -0.5
  scale = np.median(np.linalg.norm(public_x_aug @ feature_map, axis=1))
  feature_map = feature_map / (scale / math.sqrt(2.0))
  return Geometry(feature_map=feature_map.astype(np.float32), kind=kind)


def principal_components(public_x_aug: np.ndarray, sigma_1: float,
                         num_private: int, num_classes: int,
                         rules: Rules) -> Geometry:
  """PILLAR's map (Pinto et al. 2023): the top-k principal directions of the
  centred public features (k by the same noise-norm rule, at most n - 1)
  and the bias coordinate, unwhitened. PILLAR renormalises each projected
  row; a per-row scale is not linear, so instead the projection is scaled
  once so that the median public projected norm is 1 (the scale of the
  unit-norm features): the released head stays a linear head of the
  original features."""
  public_x_aug = np.asarray(public_x_aug, np.float64)
  n, dim = public_x_aug.shape
  features = public_x_aug[:, :-1]
  _, _, vt = np.linalg.svd(features - features.mean(axis=0),
                           full_matrices=False)
  k = dim
  if released_noise_norm(sigma_1, rules.clip_norm, dim, num_classes,
                         num_private) > rules.theta:
    k = noisy_dim_budget(sigma_1, num_private, num_classes, rules)
  k = max(1, min(n - 1, k, dim - 1, vt.shape[0]))
  projection = vt[:k].T
  scale = np.median(np.linalg.norm(features @ projection, axis=1))
  feature_map = np.zeros((dim, k + 1))
  feature_map[:-1, :k] = projection / max(scale, 1e-12)
  feature_map[-1, k] = 1.0
  return Geometry(feature_map=feature_map.astype(np.float32), kind="pca")


def smoothness(public_z: Optional[np.ndarray]) -> float:
  """L = lambda_max(Zp^T Zp / n) / 2, or the data-free bound 1 (||x~||^2
  <= 2) without public examples."""
  if public_z is None or len(public_z) == 0:
    return 1.0
  return 0.5 * float(np.linalg.eigvalsh(_second_moment(public_z)).max())


def step_budget(dim: int, sigma_1: float, num_private: int, num_classes: int,
                rules: Rules, geometry: str = "none") -> float:
  """tau = eta T of rule 2 (infinite without noise).

  ``geometry`` is the ``Geometry.kind`` the run trains in: a truncated
  public subspace (``TRUNCATED_KINDS``) takes ``rules.subspace_kappa``,
  anything else (the full whitened space; "none", x~ itself, DP-SGD's)
  ``rules.kappa``.
  """
  if sigma_1 == 0:
    return math.inf
  kappa = (rules.subspace_kappa if geometry in TRUNCATED_KINDS else
           rules.kappa)
  return kappa * num_private / (
      sigma_1 * rules.clip_norm *
      math.sqrt(num_classes * rules.reference_dim) *
      (dim / rules.reference_dim) ** rules.dim_power)


def schedule(public_z: Optional[np.ndarray], dim: int, sigma_1: float,
             num_private: int, num_classes: int, rules: Rules,
             geometry: str = "none") -> tuple[int, float]:
  """(T, eta) of rule 2: eta = 1/(2L), T = tau / eta clipped.

  Where tau / eta would pass ``rules.max_steps`` (a compute cap; large N,
  since tau grows with N), the steps lengthen up to eta = 1/L so that the
  capped run still reaches tau: gradient descent on an L-smooth loss is
  stable up to 2/L, and at a fixed tau the noise a run accumulates does not
  depend on how tau is cut into steps (T full-batch releases compose to
  one at sigma_1). Only where tau > max_steps / L does the cap shorten tau,
  and then it warns (T's own rounding, up to half a step, does not). Without
  noise T is max_steps at eta = 1/(2L). See ``step_budget`` for
  ``geometry``.
  """
  eta = 1.0 / (2.0 * smoothness(public_z))
  if sigma_1 == 0:
    return rules.max_steps, eta
  tau = step_budget(dim, sigma_1, num_private, num_classes, rules, geometry)
  if tau / eta > rules.max_steps:
    eta = min(2.0 * eta, tau / rules.max_steps)
    if eta * rules.max_steps < 0.99 * tau:  # even 1/L steps fall short
      warnings.warn(
          f"the step cap rules.max_steps={rules.max_steps} shortens the "
          f"planned step budget tau = eta T from {tau:.4g} to "
          f"{eta * rules.max_steps:.4g} (N = {num_private} private "
          f"examples, geometry {geometry!r}): the run is under-trained; "
          "raise --config.rules.max_steps to "
          f"{math.ceil(tau / eta)} if the compute allows.", stacklevel=2)
  steps = int(min(max(round(tau / eta), rules.min_steps), rules.max_steps))
  return steps, eta


def public_gradient_weight(sigma_1: float, num_public: int, num_private: int,
                           dim: int, num_classes: int, rules: Rules) -> float:
  """alpha of rule 3 (0 without public examples)."""
  if num_public == 0:
    return 0.0
  private_variance = (1.0 / num_private + 2.0 * sigma_1**2 * dim *
                      num_classes / num_private**2)
  return rules.public_trust * private_variance / (1.0 / num_public +
                                                  private_variance)
