"""The mechanism's coins: secret randomness for noise and sampling.

Invariant 6 (docs/design.md): the noise and the Poisson sampling of a private
run come from the operating system's entropy, live only inside that run (and
its checkpoint, so that a resume replays exactly), and can never be rebuilt
from anything the run writes out. A seed in results.json is public: if the
noise key were ``jax.random.key(seed)``, anyone holding the code and the seed
could regenerate every noise vector, subtract it from a released update, and
read the private gradient sum off it (the wave-1 review did exactly that:
membership decided with certainty).

``MechanismCoins.fresh()`` draws 128 bits from ``secrets`` (the OS CSPRNG).
The noise key and the sampler's stream are derived from those bits through
numpy's ``SeedSequence`` with distinct spawn keys, so the two streams are
independent. ``repr`` never shows the bits.

``MechanismCoins.insecure_from_seed(seed)`` is the debugging mode: it derives
both streams from a public seed exactly as wave 1 did (noise key
``jax.random.key(seed)``, batches ``default_rng((seed, t))``), so runs are
reproducible and comparable with old results. A run made that way has NO
privacy guarantee and says so wherever its results are written.
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import Optional

import jax
import numpy as np

ENTROPY_BITS = 128
_WORDS = ENTROPY_BITS // 32
# SeedSequence spawn keys: the noise key, the sampler and the private
# selection (its validation split and its Gumbel noise) never share a stream.
_NOISE_STREAM = 0
_SAMPLER_STREAM = 1
_SELECTION_STREAM = 2
INSECURE_NOTICE = "no privacy guarantee: noise derived from the seed"


@dataclasses.dataclass(frozen=True)
class MechanismCoins:
  """The secret randomness of one private run.

  Example::

    coins = MechanismCoins.fresh()                 # OS entropy: secret
    key = coins.noise_key()                        # jax PRNG key for noise
    sampler = PoissonSampler(n, q, seed=coins.sampler_seed)

  Attributes:
    entropy: the secret bits (a non-negative int below 2**128). Never write
      it anywhere but a checkpoint of the same run.
    insecure_seed: set only by ``insecure_from_seed``: the public seed both
      streams are derived from (no privacy guarantee).
  """

  entropy: int = dataclasses.field(repr=False)
  insecure_seed: Optional[int] = None

  def __post_init__(self):
    if isinstance(self.entropy, bool) or not isinstance(
        self.entropy, (int, np.integer)):
      raise TypeError(f"entropy must be an int, got {type(self.entropy)}.")
    if not 0 <= int(self.entropy) < 2**ENTROPY_BITS:
      raise ValueError(f"entropy must be in [0, 2**{ENTROPY_BITS}).")

  @classmethod
  def fresh(cls) -> "MechanismCoins":
    """128 fresh bits from the operating system (``secrets``)."""
    return cls(entropy=secrets.randbits(ENTROPY_BITS))

  @classmethod
  def insecure_from_seed(cls, seed: int) -> "MechanismCoins":
    """Coins derived from a PUBLIC seed, as wave 1 did: debugging only."""
    seed = int(seed)
    if seed < 0:
      raise ValueError(f"seed must be >= 0, got {seed}.")
    return cls(entropy=seed % 2**ENTROPY_BITS, insecure_seed=seed)

  @property
  def insecure(self) -> bool:
    """True when the coins come from a public seed (no privacy guarantee)."""
    return self.insecure_seed is not None

  @property
  def sampler_seed(self) -> int:
    """The Poisson sampler's seed (``PoissonSampler(seed=...)``); secret."""
    if self.insecure:
      return self.insecure_seed
    return self._stream_seed(_SAMPLER_STREAM)

  @property
  def selection_seed(self) -> int:
    """The seed of the private selection's coins (``privacy.selection``:
    the per-record validation split, then its Gumbel noise); secret
    (derived from the public seed in the insecure mode, like the rest)."""
    return self._stream_seed(_SELECTION_STREAM)

  def _stream_seed(self, stream: int) -> int:
    """ENTROPY_BITS of the child stream ``stream`` of the entropy: streams
    never overlap, so no two uses share a coin."""
    words = np.random.SeedSequence(
        int(self.entropy), spawn_key=(stream,)).generate_state(_WORDS)
    return int.from_bytes(words.astype("<u4").tobytes(), "little")

  def noise_key(self) -> jax.Array:
    """The PRNG key of the run's Gaussian noise (default JAX key impl)."""
    if self.insecure:
      return jax.random.key(self.insecure_seed)
    template = jax.random.key_data(jax.random.key(0))
    words = np.random.SeedSequence(
        int(self.entropy), spawn_key=(_NOISE_STREAM,)).generate_state(
            int(np.prod(template.shape)), dtype=np.uint32)
    return jax.random.wrap_key_data(words.reshape(template.shape).astype(
        template.dtype))

  def to_array(self) -> np.ndarray:
    """The coins as uint32 words (for a checkpoint of the same run only)."""
    words = [(int(self.entropy) >> (32 * i)) & 0xFFFFFFFF
             for i in range(_WORDS)]
    flag = [0, 0, 0]
    if self.insecure:
      seed = self.insecure_seed
      flag = [1, seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF]
    return np.asarray(words + flag, np.uint32)

  @classmethod
  def from_array(cls, array: np.ndarray) -> "MechanismCoins":
    """Inverse of ``to_array``."""
    array = np.asarray(array, np.uint64)
    if array.shape != (_WORDS + 3,):
      raise ValueError(f"coins array must have shape ({_WORDS + 3},), got "
                       f"{array.shape}.")
    entropy = sum(int(w) << (32 * i) for i, w in enumerate(array[:_WORDS]))
    if int(array[_WORDS]):
      seed = int(array[_WORDS + 1]) | (int(array[_WORDS + 2]) << 32)
      return cls(entropy=entropy, insecure_seed=seed)
    return cls(entropy=entropy)


def run_coins(insecure_reproducible_noise: bool, seed: int) -> MechanismCoins:
  """The coins of a new private run: fresh OS entropy, or (debugging only,
  ``insecure_reproducible_noise``) derived from the public ``seed``."""
  if insecure_reproducible_noise:
    return MechanismCoins.insecure_from_seed(seed)
  return MechanismCoins.fresh()
