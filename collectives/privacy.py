"""Central differential privacy for federated averaging (DP-FedAvg).

McMahan et al. 2018, "Learning differentially private recurrent language
models": each round the server samples ``m`` of the ``N`` clients, clips each
client's update to L2 norm ``C``, adds Gaussian noise of standard deviation
``noise_multiplier * C`` to the *sum* of the clipped updates and divides by
``m``. :class:`PrivacyAccountant` turns (noise multiplier, sampling rate
``m / N``, rounds) into the ``(epsilon, delta)`` guarantee of everything the
server released so far, with the Rényi-DP accountant of Google's
``dp_accounting`` library; :func:`gaussian_noise` draws the noise.

Which subsampling analysis, and why
-----------------------------------
The server draws exactly ``m`` clients uniformly *without replacement*, so the
accountant composes ``SampledWithoutReplacementDpEvent`` (Wang, Balle and
Kasiviswanathan 2019, "Subsampled Rényi differential privacy and analytical
moments accountant", Theorem 27), which ``RdpAccountant`` supports for any
``(N, m)``, but only under the *replace-one* neighbouring relation: with ``N``
fixed and public, two client populations are neighbours when one client's data
is swapped for anyone else's. That has two consequences:

* The L2 sensitivity of the sum of clipped updates is ``2C`` (one update of
  norm ``<= C`` swapped for another), not ``C``. ``dp_accounting`` 0.6.0
  defines ``GaussianDpEvent.noise_multiplier`` as ``std / C`` but its
  without-replacement RDP formula reads it as ``std / sensitivity``
  (google/differential-privacy issue #378), so the event gets
  ``noise_multiplier / 2``. ``test_privacy.py`` pins this down (at
  ``sample_rate = 1`` the curve must be the Gaussian mechanism's with
  sensitivity ``2C``): a library release that did the halving itself would
  fail it instead of silently halving twice.
* The epsilon is a replace-one epsilon. It is not comparable with the
  add-or-remove-one epsilons that DP-SGD papers usually report, and for the
  same noise it comes out several to ten times larger (a swap is a removal
  plus an addition, and amplification by sampling is weaker at the lower
  effective noise): m = 10 of N = 1000, noise 1.0, 1000 rounds, delta 1e-5
  gives 21.0 here against 2.1 with the Poisson analysis below.

``PoissonSampledDpEvent(sample_rate, GaussianDpEvent(noise_multiplier))``
under add-or-remove-one (sensitivity ``C``), which is what TensorFlow Privacy
and most DP-FedAvg write-ups use, is only valid when each client is included
independently with probability ``sample_rate`` (and the sum is divided by the
*expected* ``m``). Using it for fixed-size rounds is a common approximation,
but the two analyses can differ substantially (Lebeda et al. 2024, "Avoiding
pitfalls for privacy accounting of subsampled mechanisms under composition"),
so it is opt-in here: ``poisson_sampling=True``, for a server that really
samples that way (and to check the accountant against TensorFlow Privacy's
published numbers, which use it).

The ``sample_rate`` must cover every client whose update *could* be used:
a round that samples ``per_round + over_commit`` clients and keeps the first
``per_round`` answers has ``sample_rate = (per_round + over_commit) / N``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction

import dp_accounting
import numpy as np
import torch
from dp_accounting import rdp as dp_rdp

# Rényi orders at which the RDP curve is evaluated: the library's default,
# which covers the Gaussian mechanism from epsilon well below 1 to the hundreds.
_ORDERS: tuple[float, ...] = tuple(dp_rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS)


def _round_event(
    noise_multiplier: float, sample_rate: float, poisson_sampling: bool
) -> tuple[dp_accounting.DpEvent, dp_accounting.NeighboringRelation]:
    """One round as a ``DpEvent``, and the neighbouring relation its analysis needs."""
    if poisson_sampling:
        # Add-or-remove-one: the sum's sensitivity is C, as GaussianDpEvent assumes.
        event = dp_accounting.PoissonSampledDpEvent(
            sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
        )
        return event, dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    # The RDP bound only uses m / N; any (N, m) with that ratio gives the same curve.
    rate = Fraction(sample_rate).limit_denominator(1 << 24)
    # Replace-one: sensitivity 2C, so std / sensitivity is noise_multiplier / 2
    # (see the module docstring, and issue #378 of google/differential-privacy).
    event = dp_accounting.SampledWithoutReplacementDpEvent(
        source_dataset_size=rate.denominator,
        sample_size=rate.numerator,
        event=dp_accounting.GaussianDpEvent(noise_multiplier / 2),
    )
    return event, dp_accounting.NeighboringRelation.REPLACE_ONE


@functools.lru_cache(maxsize=64)
def _round_rdp(noise_multiplier: float, sample_rate: float, poisson_sampling: bool) -> np.ndarray:
    """One round's RDP at ``_ORDERS`` (read-only; shared by every accountant with these settings).

    The without-replacement bound takes 0.3-0.8 s to evaluate at all orders,
    so it is computed once per process and setting, not once per round.
    """
    event, relation = _round_event(noise_multiplier, sample_rate, poisson_sampling)
    accountant = dp_rdp.RdpAccountant(list(_ORDERS), neighboring_relation=relation)
    accountant.compose(event)
    curve = accountant.rdp
    curve.flags.writeable = False
    return curve


@dataclass
class PrivacyAccountant:
    """``(epsilon, delta)`` of DP-FedAvg after ``rounds`` rounds, by RDP composition.

    One round: a uniform sample of ``sample_rate * N`` clients (without
    replacement, or Poisson with ``poisson_sampling``), each update clipped
    to ``C``, Gaussian noise of std ``noise_multiplier * C`` on their sum.
    See the module docstring for the neighbouring relation each mode uses.

    :meth:`epsilon` is cheap enough for every round (well under a
    millisecond): the one-round RDP curve is computed once per process and
    setting (a fraction of a second for the without-replacement bound), and
    ``rounds`` rounds compose to ``rounds`` times it.
    """

    noise_multiplier: float
    sample_rate: float  # m / N
    delta: float
    rounds: int = 0
    poisson_sampling: bool = False
    # ((noise_multiplier, sample_rate, poisson_sampling), delta, rounds) -> epsilon,
    # for repeated calls within a round.
    _last: tuple[tuple, float] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(
                f"noise_multiplier must be finite and >= 0, got {self.noise_multiplier}"
            )
        if not 0 <= self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in [0, 1], got {self.sample_rate}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {self.rounds}")

    def step(self, rounds: int = 1) -> None:
        """Count ``rounds`` more rounds released."""
        if rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {rounds}")
        self.rounds += rounds

    def _key(self) -> tuple[float, float, bool]:
        return (float(self.noise_multiplier), float(self.sample_rate), bool(self.poisson_sampling))

    def rdp(self) -> tuple[np.ndarray, np.ndarray]:
        """``(orders, rdp)``: the Rényi-DP curve after ``rounds`` rounds (copies)."""
        orders = np.array(_ORDERS)
        if self.rounds == 0 or self.sample_rate == 0:
            return orders, np.zeros_like(orders)
        if self.noise_multiplier == 0:
            # Not private at all (and the without-replacement bound divides by the noise).
            return orders, np.full_like(orders, np.inf)
        # RDP adds up under composition: what compose(event, count=rounds) does.
        return orders, self.rounds * _round_rdp(*self._key())

    def epsilon(self) -> float:
        """Epsilon at ``delta`` after ``rounds`` rounds (0 before the first, inf without noise)."""
        if self.rounds == 0 or self.sample_rate == 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf  # the sampled clients' clipped updates, released as they are
        key = (self._key(), float(self.delta), self.rounds)
        if self._last is None or self._last[0] != key:
            orders, curve = self.rdp()
            eps, _order = dp_rdp.compute_epsilon(orders, curve, self.delta)
            self._last = (key, float(eps))
        return self._last[1]

    def state(self) -> dict[str, float | int]:
        """The accountant as plain numbers, for a checkpoint (JSON or safetensors metadata)."""
        return {
            "noise_multiplier": float(self.noise_multiplier),
            "sample_rate": float(self.sample_rate),
            "delta": float(self.delta),
            "rounds": int(self.rounds),
            "poisson_sampling": int(self.poisson_sampling),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, float | int | str]) -> PrivacyAccountant:
        """The accountant :meth:`state` described.

        Values may also be the strings of those numbers (safetensors metadata
        holds strings only); keys other than :meth:`state`'s are ignored.
        """
        return cls(
            noise_multiplier=float(state["noise_multiplier"]),
            sample_rate=float(state["sample_rate"]),
            delta=float(state["delta"]),
            rounds=int(state["rounds"]),
            poisson_sampling=bool(int(state.get("poisson_sampling", 0))),
        )


def gaussian_noise(numel: int, std: float, generator: torch.Generator) -> torch.Tensor:
    """``numel`` float32 samples of N(0, std^2), drawn from ``generator`` on its device.

    For DP-FedAvg, ``std = noise_multiplier * clip``, added to the sum of the
    round's clipped updates before dividing by ``m``.

    The guarantee the accountant computes assumes ideal Gaussian noise the
    adversary cannot predict. torch's generators are not cryptographically
    secure (Mersenne Twister on CPU, Philox on CUDA): seed the generator
    from a secure source (``secrets.randbits(64)``) and keep the seed secret.
    Floating-point samples also deviate from the ideal distribution in their
    low bits (Mironov 2012, "On significance of the least significant bits for
    differential privacy"); that is accepted here, as in most DP-ML libraries.
    """
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    if not (std >= 0 and math.isfinite(std)):
        raise ValueError(f"std must be finite and >= 0, got {std}")
    noise = torch.randn(numel, generator=generator, dtype=torch.float32, device=generator.device)
    return noise.mul_(std)
