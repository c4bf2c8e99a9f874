"""The mechanism's coins are secret (docs/design.md, invariant 6).

Guarantees checked:

* each private run draws its own coins from the OS: two runs of the same
  config release different DP parameters, while the non-private references
  (paragon, public-only), which use no coins, are identical;
* within one run, every DP (method, epsilon, seed) gets its own coins: no
  two released models share a noise draw or a batch (releasing two models
  that share noise lets their difference cancel it);
* no output file (results, meta, ledger, config, params) holds the coins or
  anything derived from them, and the checkpoints that held them are gone;
* the debugging mode derives the coins from the seed exactly as wave 1 did,
  and says "no privacy guarantee" in results.json and results.md.
The resume with secret coins is checked in test_resume.py.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from adamix_jax.privacy import randomness
from adamix_jax.privacy import sampler as sampler_lib
from adamix_jax import io
from adamix_jax.experiment import stages
from adamix_jax.configs import digits

DP_METHODS = ("dp_sgd", "pillar", "dp_prototypes", "adamix")


def _config(**overrides):
  config = digits.get_config()
  config.update_from_flattened_dict({
      "epsilons": (1.0, 8.0), "seeds": (0,), "progress": False,
      "rules.min_steps": 4, "rules.max_steps": 12,
      "train.checkpoint_every": 7, **overrides})
  return config


@pytest.fixture
def drawn_coins(monkeypatch):
  """Records every MechanismCoins.fresh() draw (behaviour unchanged)."""
  drawn = []
  fresh = randomness.MechanismCoins.fresh.__func__

  def recording(cls):
    coins = fresh(cls)
    drawn.append(coins)
    return coins

  monkeypatch.setattr(randomness.MechanismCoins, "fresh",
                      classmethod(recording))
  return drawn


def _params(workdir, method, epsilon=None):
  out = stages.Workdir(workdir).run_dir(method, 0, epsilon)
  return io.load_npz(os.path.join(out, "params.npz"))


def test_secret_randomness_coins_are_fresh_independent_and_hidden():
  a, b = randomness.MechanismCoins.fresh(), randomness.MechanismCoins.fresh()
  assert a.entropy != b.entropy and not a.insecure
  assert a.sampler_seed != b.sampler_seed
  key_a = np.asarray(jax.random.key_data(a.noise_key()))
  assert not np.array_equal(key_a, jax.random.key_data(b.noise_key()))
  # The noise and the sampler are different streams of the same bits.
  assert a.sampler_seed != a.entropy
  assert int.from_bytes(key_a.astype("<u4").tobytes(), "little") != (
      a.sampler_seed % 2**(32 * key_a.size))
  assert str(a.entropy) not in repr(a)
  sampler = sampler_lib.PoissonSampler(100, 0.1, a.sampler_seed)
  assert str(a.sampler_seed) not in repr(sampler)
  assert randomness.MechanismCoins.from_array(a.to_array()) == a


def test_secret_randomness_insecure_mode_reproduces_the_seeded_derivation():
  coins = randomness.MechanismCoins.insecure_from_seed(7)
  assert coins.insecure
  np.testing.assert_array_equal(jax.random.key_data(coins.noise_key()),
                                jax.random.key_data(jax.random.key(7)))
  assert coins.sampler_seed == 7
  assert randomness.MechanismCoins.from_array(coins.to_array()) == coins


def test_secret_randomness_two_runs_release_different_dp_models(tmp_path,
                                                               drawn_coins):
  config = _config()
  first, second = str(tmp_path / "a"), str(tmp_path / "b")
  records = [stages.run(config, w) for w in (first, second)]
  # Every DP run of each workdir drew its own coins: 2 workdirs x 4 methods
  # x 2 epsilons.
  assert set(DP_METHODS) == set(config.methods) & set(stages.DP_METHODS)
  assert len(drawn_coins) == 2 * 4 * 2
  assert len({c.entropy for c in drawn_coins}) == 16
  for method in DP_METHODS:
    for eps in config.epsilons:
      a, b = (_params(w, method, eps)["kernel"] for w in (first, second))
      assert np.max(np.abs(a - b)) > 1e-3, (method, eps)
  # Within one run no two DP models share noise: their heads all differ.
  heads = [_params(first, m, e)["kernel"] for m in DP_METHODS
           for e in config.epsilons]
  for i, head in enumerate(heads):
    for other in heads[i + 1:]:
      assert np.max(np.abs(head - other)) > 1e-3
  # The references use no coins: identical in both runs.
  np.testing.assert_array_equal(_params(first, "paragon")["kernel"],
                                _params(second, "paragon")["kernel"])
  errors = [{(r["method"], r["epsilon"]): r["test_error"] for r in rec}
            for rec in records]
  for key in (("paragon", None), ("public_only", None)):
    assert errors[0][key] == errors[1][key]
  assert all(r["insecure_reproducible_noise"] is False
             for r in records[0] if r["method"] in DP_METHODS)


def _key_material(coins: randomness.MechanismCoins) -> list[bytes]:
  """Every encoding of the coins (and of what is derived from them) that an
  output file could plausibly contain."""
  needles = []
  for value, nbytes in ((coins.entropy, 16), (coins.sampler_seed, 16)):
    needles.append(str(value).encode())
    needles.append(f"{value:x}".encode())
    needles.append(value.to_bytes(nbytes, "little"))
    needles.append(value.to_bytes(nbytes, "big"))
  needles.append(coins.to_array()[:4].tobytes())
  key_words = np.asarray(jax.random.key_data(coins.noise_key()))
  needles.append(key_words.tobytes())
  needles += [str(int(w)).encode() for w in key_words.ravel()
              if int(w) >= 10**8]  # short numbers occur by chance
  return needles


def test_secret_randomness_no_output_file_holds_key_material(tmp_path,
                                                             drawn_coins):
  workdir = str(tmp_path / "run")
  stages.run(_config(), workdir)
  assert drawn_coins
  files = []
  for root, _, names in os.walk(workdir):
    files += [os.path.join(root, n) for n in names]
  assert any(f.endswith("results.json") for f in files)
  assert any(f.endswith("ledger.json") for f in files)
  assert not any("checkpoints" in f for f in files)  # removed when done
  with open(os.path.join(workdir, "results.md")) as f:
    assert randomness.INSECURE_NOTICE not in f.read()
  for path in files:
    with open(path, "rb") as f:
      content = f.read()
    for coins in drawn_coins:
      for needle in _key_material(coins):
        assert needle not in content, (path, needle)


def test_secret_randomness_insecure_mode_is_reproducible_and_says_so(
    tmp_path, drawn_coins):
  config = _config(insecure_reproducible_noise=True, epsilons=(1.0,))
  first, second = str(tmp_path / "a"), str(tmp_path / "b")
  records = [stages.run(config, w) for w in (first, second)]
  assert not drawn_coins  # no OS entropy: the seed decides
  for method in DP_METHODS:
    np.testing.assert_array_equal(_params(first, method, 1.0)["kernel"],
                                  _params(second, method, 1.0)["kernel"])
  assert all(r["insecure_reproducible_noise"] is True
             for r in records[0] if r["method"] in DP_METHODS)
  with open(os.path.join(first, "results.md")) as f:
    assert randomness.INSECURE_NOTICE in f.read()
  meta = io.load_json(os.path.join(
      stages.Workdir(first).run_dir("adamix", 0, 1.0), "meta.json"))
  assert meta["insecure_reproducible_noise"] is True
