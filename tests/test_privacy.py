"""Unit tests for DP-FedAvg's privacy accounting and noise (``collectives/privacy.py``, no Ray).

Known values, from TensorFlow Privacy (Poisson sampling, add-or-remove-one,
Rényi-DP accountant; ``poisson_sampling=True`` here):

* ``tensorflow_privacy/privacy/analysis/compute_dp_sgd_privacy_test.py``,
  ``test_compute_dp_sgd_privacy``: (n=60000, batch 150, noise 1.3, 15 epochs,
  delta 1e-5) -> epsilon 0.7242234026109595 at order 19, and (n=100000,
  batch 100, noise 1.0, 30 epochs, delta 1e-7) -> 1.4154988495444842 at
  order 13, computed there with ``dp_accounting.rdp.RdpAccountant``. Their
  list of orders differs from ours, but both optimal orders are in both.
* ``tutorials/README.md`` (2019): the MNIST DP-SGD tutorial's defaults
  (``compute_dp_sgd_privacy.py --N=60000 --batch_size=256
  --noise_multiplier=1.1 --epochs=60 --delta=1e-5``) satisfy "eps = 3.01".
  That number used the classic RDP-to-DP conversion
  ``min_a rdp(a) + log(1/delta) / (a - 1)`` (Mironov 2017, Prop. 3), which we
  apply to our RDP curve; ``dp_accounting`` 0.6.0's ``get_epsilon`` uses a
  tighter conversion and gives 2.5967 for the same curve.

The default mode (fixed-size sampling without replacement, replace-one) has
no published value to compare with; it is pinned by its closed form at
``sample_rate = 1`` (the Gaussian mechanism with sensitivity ``2C``) and
checked against the library composing the same events directly.
"""

from __future__ import annotations

import json
import math
from itertools import pairwise

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting import rdp as dp_rdp

from collectives import privacy
from collectives.privacy import PrivacyAccountant, gaussian_noise


def _classic_epsilon(orders: np.ndarray, rdp: np.ndarray, delta: float) -> float:
    """Mironov 2017, Prop. 3: the conversion TensorFlow Privacy's 2019 numbers used."""
    return float(np.min(rdp + math.log(1 / delta) / (orders - 1)))


# ---------------------------------------------------------------- known values


@pytest.mark.parametrize(
    "n, batch, noise, epochs, delta, expected",
    [
        (60000, 150, 1.3, 15, 1e-5, 0.7242234026109595),
        (100000, 100, 1.0, 30, 1e-7, 1.4154988495444842),
    ],
)
def test_matches_tensorflow_privacy_test_values(n, batch, noise, epochs, delta, expected):
    steps = math.ceil(epochs * n / batch)  # as compute_dp_sgd_privacy does
    acc = PrivacyAccountant(noise, batch / n, delta, rounds=steps, poisson_sampling=True)
    assert acc.epsilon() == pytest.approx(expected, rel=1e-9)


def test_matches_tensorflow_privacy_mnist_tutorial():
    steps = math.ceil(60 * 60000 / 256)  # 14063
    acc = PrivacyAccountant(1.1, 256 / 60000, 1e-5, rounds=steps, poisson_sampling=True)
    orders, rdp = acc.rdp()
    assert round(_classic_epsilon(orders, rdp, 1e-5), 2) == 3.01  # the published number
    # The tighter conversion, as dp_accounting 0.6.0 computes it: below the published 3.01.
    assert acc.epsilon() == pytest.approx(2.5967, abs=1e-4)


# ---------------------------------------------------------------- the default mode


@pytest.mark.parametrize("noise", [0.8, 1.0, 2.5])
def test_without_replacement_is_the_replace_one_gaussian_at_full_sampling(noise):
    """At sample_rate 1 a round is the Gaussian mechanism on a sum with sensitivity 2C.

    RDP of N(0, (z C)^2) noise on a sensitivity-2C query: a (2C)^2 / (2 (z C)^2)
    = 2 a / z^2. A dp_accounting that halved the noise multiplier itself
    (google/differential-privacy issue #378) would make this 8 a / z^2.
    """
    acc = PrivacyAccountant(noise, 1.0, 1e-5, rounds=1)
    orders, rdp = acc.rdp()
    np.testing.assert_allclose(rdp, 2 * orders / noise**2, rtol=1e-12)
    poisson = PrivacyAccountant(noise, 1.0, 1e-5, rounds=1, poisson_sampling=True)
    orders, rdp = poisson.rdp()
    np.testing.assert_allclose(rdp, orders / (2 * noise**2), rtol=1e-12)


@pytest.mark.parametrize("poisson", [False, True])
@pytest.mark.parametrize("noise, rate, rounds", [(1.0, 10 / 1000, 300), (1.5, 10 / 20, 40)])
def test_epsilon_equals_direct_composition(poisson, noise, rate, rounds):
    """The cached per-round curve times ``rounds`` is what composing the rounds gives."""
    acc = PrivacyAccountant(noise, rate, 1e-5, rounds=rounds, poisson_sampling=poisson)
    if poisson:
        relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
        event = dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise))
    else:
        relation = dp_accounting.NeighboringRelation.REPLACE_ONE
        n = 1000 if rate < 0.1 else 20
        event = dp_accounting.SampledWithoutReplacementDpEvent(
            n, round(rate * n), dp_accounting.GaussianDpEvent(noise / 2)
        )
    direct = dp_rdp.RdpAccountant(neighboring_relation=relation)
    direct.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    assert acc.epsilon() == pytest.approx(direct.get_epsilon(1e-5), rel=1e-9)


# ---------------------------------------------------------------- monotonicity, edges


@pytest.mark.parametrize("poisson", [False, True])
def test_epsilon_grows_with_rounds_and_falls_with_noise(poisson):
    def eps(noise: float, rounds: int) -> float:
        return PrivacyAccountant(noise, 0.05, 1e-5, rounds, poisson_sampling=poisson).epsilon()

    by_rounds = [eps(1.0, r) for r in (1, 10, 100, 1000, 10000)]
    assert all(a < b for a, b in pairwise(by_rounds)), by_rounds
    by_noise = [eps(z, 500) for z in (0.7, 1.0, 3.0, 10.0)]
    assert all(a > b for a, b in pairwise(by_noise)), by_noise
    # And with the sampling rate, at fixed noise and rounds.
    by_rate = [
        PrivacyAccountant(1.0, q, 1e-5, 500, poisson_sampling=poisson).epsilon()
        for q in (0.01, 0.05, 1.0)
    ]
    assert all(a < b for a, b in pairwise(by_rate)), by_rate


def test_edges_and_step():
    assert PrivacyAccountant(1.0, 0.1, 1e-5).epsilon() == 0.0  # no rounds yet
    assert PrivacyAccountant(1.0, 0.0, 1e-5, rounds=10).epsilon() == 0.0  # nobody sampled
    for poisson in (False, True):
        acc = PrivacyAccountant(0.0, 0.1, 1e-5, rounds=1, poisson_sampling=poisson)
        assert acc.epsilon() == math.inf
    acc = PrivacyAccountant(1.0, 0.1, 1e-5)
    acc.step()
    acc.step(4)
    acc.step(0)
    assert acc.rounds == 5
    assert acc.epsilon() == PrivacyAccountant(1.0, 0.1, 1e-5, rounds=5).epsilon()
    with pytest.raises(ValueError):
        acc.step(-1)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(noise_multiplier=-1.0, sample_rate=0.1, delta=1e-5),
        dict(noise_multiplier=math.nan, sample_rate=0.1, delta=1e-5),
        dict(noise_multiplier=1.0, sample_rate=1.5, delta=1e-5),
        dict(noise_multiplier=1.0, sample_rate=-0.1, delta=1e-5),
        dict(noise_multiplier=1.0, sample_rate=0.1, delta=0.0),
        dict(noise_multiplier=1.0, sample_rate=0.1, delta=1.0),
        dict(noise_multiplier=1.0, sample_rate=0.1, delta=1e-5, rounds=-1),
    ],
)
def test_rejects_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        PrivacyAccountant(**kwargs)


def test_epsilon_every_round_computes_the_curve_once(monkeypatch):
    composes = []
    real = dp_rdp.RdpAccountant.compose

    def counting(self, event, count=1):
        composes.append(count)
        return real(self, event, count)

    monkeypatch.setattr(dp_rdp.RdpAccountant, "compose", counting)
    privacy._round_rdp.cache_clear()  # earlier tests may have computed this curve
    acc = PrivacyAccountant(1.0, 10 / 1000, 1e-5)
    eps = []
    for _ in range(1000):
        acc.step()
        eps.append(acc.epsilon())
        assert acc.epsilon() == eps[-1]  # a second call in the same round
    assert composes == [1]
    assert all(a < b for a, b in pairwise(eps))
    # Another accountant with the same setting shares the curve (a resumed run).
    again = PrivacyAccountant.from_state(acc.state())
    assert again.epsilon() == eps[-1]
    # A changed parameter is noticed (its curve is computed).
    acc.noise_multiplier = 2.0
    assert acc.epsilon() < eps[-1]
    assert composes == [1, 1]


# ---------------------------------------------------------------- state


@pytest.mark.parametrize("poisson", [False, True])
def test_state_round_trips(poisson):
    acc = PrivacyAccountant(1.1, 0.02, 1e-6, poisson_sampling=poisson)
    acc.step(123)
    state = acc.state()
    assert all(type(v) in (int, float) for v in state.values()), state
    back = PrivacyAccountant.from_state(json.loads(json.dumps(state)))
    assert back == acc and back.epsilon() == acc.epsilon()
    # safetensors metadata holds strings only.
    back = PrivacyAccountant.from_state({k: str(v) for k, v in state.items()})
    assert back == acc and back.epsilon() == acc.epsilon()
    # And accounting continues from the restored count.
    back.step()
    acc.step()
    assert back.epsilon() == acc.epsilon()


def test_state_without_the_sampling_key_means_without_replacement():
    state = PrivacyAccountant(1.0, 0.1, 1e-5, rounds=3).state()
    del state["poisson_sampling"]
    assert PrivacyAccountant.from_state(state).poisson_sampling is False


# ---------------------------------------------------------------- noise


def test_gaussian_noise_has_the_requested_std():
    n, std = 1_000_000, 2.5
    noise = gaussian_noise(n, std, torch.Generator().manual_seed(0))
    assert noise.shape == (n,) and noise.dtype == torch.float32
    x = noise.double()
    # Standard errors: std / sqrt(n) = 0.0025 for the mean, about
    # std / sqrt(2n) = 0.0018 for the sample std; tolerances are > 5 of them.
    assert abs(float(x.mean())) < 0.015
    assert float(x.std()) == pytest.approx(std, rel=0.005)
    # Gaussian shape, not just its second moment: 68.27% within one std.
    assert float((x.abs() < std).double().mean()) == pytest.approx(0.6827, abs=0.003)


def test_gaussian_noise_is_reproducible_and_checked():
    a = gaussian_noise(1000, 1.0, torch.Generator().manual_seed(7))
    b = gaussian_noise(1000, 1.0, torch.Generator().manual_seed(7))
    c = gaussian_noise(1000, 1.0, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(gaussian_noise(5, 0.0, torch.Generator()), torch.zeros(5))
    assert gaussian_noise(0, 1.0, torch.Generator()).shape == (0,)
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError):
            gaussian_noise(5, bad, torch.Generator())
    with pytest.raises(ValueError):
        gaussian_noise(-1, 1.0, torch.Generator())


def test_default_orders_are_the_library_defaults():
    assert privacy._ORDERS == tuple(dp_rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS)
