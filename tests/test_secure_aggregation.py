"""Secure aggregation (Bonawitz et al. 2017): exact sums, hidden inputs, dropouts, refusals.

Pure: no Ray, no network; every round runs in-process.
"""

from __future__ import annotations

import itertools
import math
import os

import numpy as np
import pytest
import torch

from collectives.secure_aggregation import (
    PRIME,
    RING_BITS,
    AdvertisedKeys,
    Quantizer,
    SecAggClient,
    SecAggError,
    SecAggServer,
    prg,
    run_round,
    shamir_reconstruct,
    shamir_split,
)

RING = 2**RING_BITS


def ring_sum(tensors) -> torch.Tensor:
    return torch.remainder(torch.stack(list(tensors)).sum(dim=0), RING)


def encoded_inputs(ids, length: int, seed: int = 0) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = Quantizer()
    return {c: q.encode(torch.randn(length, generator=g), n_summands=len(ids)) for c in ids}


def share_phase(ids, length: int, threshold: int, round_id: bytes = b"t"):
    """Phases 0 and 1 through the public API; returns (clients, server) ready for inputs."""
    clients = {c: SecAggClient(c, round_id, length) for c in ids}
    server = SecAggServer(round_id, length, threshold)
    roster = server.receive_keys([cl.advertise() for cl in clients.values()])
    inbox = server.route_shares({c: cl.share_keys(roster, threshold) for c, cl in clients.items()})
    for c, cts in inbox.items():
        clients[c].receive_shares(cts)
    return clients, server


# --------------------------------------------------------------------------- quantizer


@pytest.mark.parametrize("scale_bits", [24, 16, 8])
def test_quantize_round_trip_is_within_one_step(scale_bits):
    q = Quantizer(scale_bits)
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(5000, generator=g), torch.randn(5000, generator=g) * 1000])
    x = x.clamp(-q.max_abs(1), q.max_abs(1))
    enc = q.encode(x)
    assert enc.dtype == torch.int64
    assert int(enc.min()) >= 0 and int(enc.max()) < RING
    assert float((q.decode(enc) - x.double()).abs().max()) <= 2.0**-scale_bits


def test_sums_of_negative_and_positive_values_decode_right():
    q = Quantizer()
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(2000, generator=g) * s for s in (0.1, 3.0, 50.0, 7.0)]
    xs.append(-xs[1] - 5.0)  # some totals well below zero
    total = ring_sum(q.encode(x, n_summands=len(xs)) for x in xs)
    plain = torch.stack([x.double() for x in xs]).sum(dim=0)
    assert (plain < 0).any() and (plain > 0).any()
    assert float((q.decode(total) - plain).abs().max()) <= len(xs) * 2.0**-q.scale_bits


@pytest.mark.parametrize("n", [1, 7, 50, 1000])
def test_max_abs_is_what_n_summands_hold(n):
    q = Quantizer()
    edge = torch.tensor([q.max_abs(n), -q.max_abs(n)], dtype=torch.float64)
    enc = q.encode(edge, n_summands=n)
    total = ring_sum([enc] * n)
    assert torch.equal(q.decode(total), q.decode(enc) * n)  # the extremes, no wrap
    # float32 updates clamped to the bound encode too (the clamp rounds it to float32)
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(1000, generator=g) * 1e7).clamp(-q.max_abs(n), q.max_abs(n))
    q.encode(x, n_summands=n)
    # and the bound is tight: the next float32 above it is refused
    above = float(np.nextafter(np.float32(q.max_abs(n)), np.float32(np.inf)))
    with pytest.raises(ValueError, match="exceeds"):
        q.encode(torch.tensor([above]), n_summands=n)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_encode_rejects_non_finite(bad):
    with pytest.raises(ValueError, match="non-finite"):
        Quantizer().encode(torch.tensor([0.5, bad]))


def test_encode_rejects_values_beyond_the_bound_and_says_which():
    q = Quantizer()
    with pytest.raises(ValueError, match=r"max_abs\(1\)"):
        q.encode(torch.tensor([2.0 ** (RING_BITS - 1 - q.scale_bits)]))
    q.encode(torch.tensor([q.max_abs(10)]), n_summands=10)
    with pytest.raises(ValueError, match=r"exceeds max_abs\(10\)"):
        q.encode(torch.tensor([q.max_abs(10) * 1.01]), n_summands=10)


# --------------------------------------------------------------------------- Shamir and PRG


def test_shamir_any_t_shares_reconstruct_and_t_minus_1_do_not():
    secret = int.from_bytes(os.urandom(32), "big")
    n, t = 7, 4
    shares = shamir_split(secret, list(range(1, n + 1)), t)
    assert all(0 <= y < PRIME for y in shares.values())
    for subset in itertools.combinations(shares, t):
        assert shamir_reconstruct({x: shares[x] for x in subset}) == secret
    assert shamir_reconstruct(shares) == secret  # more than t points: the same polynomial
    for subset in itertools.combinations(shares, t - 1):
        assert shamir_reconstruct({x: shares[x] for x in subset}) != secret


def test_shamir_rejects_bad_arguments():
    with pytest.raises(ValueError):
        shamir_split(PRIME, [1, 2, 3], 2)
    with pytest.raises(ValueError):
        shamir_split(5, [1, 1, 2], 2)
    with pytest.raises(ValueError):
        shamir_split(5, [0, 1, 2], 2)
    with pytest.raises(ValueError):
        shamir_split(5, [1, 2], 3)


def test_prg_is_deterministic_and_uniform_on_the_ring():
    seed = bytes(range(32))
    a, b = prg(seed, 100_000), prg(seed, 100_000)
    assert a.dtype == torch.int64 and torch.equal(a, b)
    assert int(a.min()) >= 0 and int(a.max()) < RING
    assert torch.equal(prg(seed, 10), a[:10])  # a prefix of the same stream
    other = prg(bytes(32), 100_000)
    assert float((a == other).double().mean()) < 1e-3
    # uniform in [0, 2**48): mean near the middle, top ring bit set about half the time
    assert abs(float(a.double().mean()) / RING - 0.5) < 0.01
    assert abs(float((a >= RING // 2).double().mean()) - 0.5) < 0.01


# --------------------------------------------------------------------------- rounds


def test_run_round_sum_is_exact():
    inputs = encoded_inputs(range(6), 1000)
    total = run_round(inputs, threshold=4)
    assert total.dtype == torch.int64 and total.shape == (1000,)
    assert torch.equal(total, ring_sum(inputs.values()))


def test_run_round_with_sparse_client_ids_and_a_float_check():
    q = Quantizer()
    g = torch.Generator().manual_seed(3)
    xs = {c: torch.randn(300, generator=g) for c in (3, 17, 40, 1000)}
    total = run_round({c: q.encode(x) for c, x in xs.items()}, threshold=3, round_id=b"round-9")
    plain = torch.stack([x.double() for x in xs.values()]).sum(dim=0)
    assert float((q.decode(total) - plain).abs().max()) <= 4 * 2.0**-q.scale_bits


def test_the_server_sees_neither_inputs_nor_partial_sums():
    ids, length = range(6), 1000
    inputs = encoded_inputs(ids, length, seed=4)
    clients, server = share_phase(ids, length, threshold=4)
    masked = {}
    for c, cl in clients.items():
        masked[c] = cl.masked_input(inputs[c])
        server.receive_masked(c, masked[c])

    def mostly_differ(a: torch.Tensor, b: torch.Tensor) -> bool:
        return float((a == b).double().mean()) < 0.01

    q = Quantizer()
    for c in ids:
        assert mostly_differ(masked[c], inputs[c])
        # decoded, a masked input is noise spread over the whole range, not x plus a little
        assert float((q.decode(masked[c]) - q.decode(inputs[c])).abs().median()) > 1e3
    for k in range(1, len(ids)):
        for subset in itertools.combinations(ids, k):
            masked_sum = ring_sum(masked[c] for c in subset)
            plain_sum = ring_sum(inputs[c] for c in subset)
            assert mostly_differ(masked_sum, plain_sum), subset
    # ... while the masks of all of them together cancel to the pairwise part's zero
    survivors, dropped = server.unmask_request()
    total = server.finish({c: clients[c].unmask(survivors, dropped) for c in survivors})
    assert torch.equal(total, ring_sum(inputs.values()))


def test_dropouts_after_sharing_still_give_the_survivors_exact_sum():
    inputs = encoded_inputs(range(7), 1000, seed=5)
    total = run_round(inputs, threshold=4, drop_after_sharing=[1, 5])
    assert torch.equal(total, ring_sum(inputs[c] for c in (0, 2, 3, 4, 6)))


def test_any_threshold_many_responses_finish_the_round():
    ids, length = range(7), 200
    inputs = encoded_inputs(ids, length, seed=6)
    clients, server = share_phase(ids, length, threshold=4)
    for c in ids:
        if c != 6:
            server.receive_masked(c, clients[c].masked_input(inputs[c]))
    survivors, dropped = server.unmask_request()
    assert (survivors, dropped) == ([0, 1, 2, 3, 4, 5], [6])
    responses = {c: clients[c].unmask(survivors, dropped) for c in (1, 3, 4, 5)}
    assert torch.equal(server.finish(responses), ring_sum(inputs[c] for c in survivors))
    with pytest.raises(SecAggError, match="below the threshold"):
        server.finish({c: responses[c] for c in (1, 3, 4)})


def test_too_few_survivors_is_an_error():
    inputs = encoded_inputs(range(6), 100)
    with pytest.raises(SecAggError, match="below the threshold"):
        run_round(inputs, threshold=4, drop_after_sharing=[0, 2, 5])


def test_a_client_never_reveals_both_shares_of_one_client():
    ids, length = range(5), 100
    inputs = encoded_inputs(ids, length)
    clients, server = share_phase(ids, length, threshold=3)
    for c in ids:
        server.receive_masked(c, clients[c].masked_input(inputs[c]))
    client = clients[0]
    with pytest.raises(SecAggError, match="both"):
        client.unmask([0, 1, 2, 3], [3, 4])
    answer = client.unmask([0, 1, 2, 3, 4], [])
    assert {kind for kind, _ in answer.values()} == {"b"}
    # a server that now claims 4 dropped (its input arrived late, say) gets nothing:
    # b_4 and s_sk_4 together would unmask client 4's input alone
    with pytest.raises(SecAggError, match="refuses to reveal both"):
        client.unmask([0, 1, 2, 3], [4])
    assert client.unmask([0, 1, 2, 3, 4], []) == answer  # a consistent repeat is fine

    other = clients[1]
    other.unmask([0, 1, 2], [3, 4])
    with pytest.raises(SecAggError, match="refuses to reveal both"):
        other.unmask([0, 1, 2, 3], [4])


def test_a_tampered_share_ciphertext_names_its_sender():
    ids, length, t = range(4), 50, 3
    clients = {c: SecAggClient(c, b"t", length) for c in ids}
    server = SecAggServer(b"t", length, t)
    roster = server.receive_keys([cl.advertise() for cl in clients.values()])
    inbox = server.route_shares({c: cl.share_keys(roster, t) for c, cl in clients.items()})
    ct = bytearray(inbox[0][2])
    ct[-5] ^= 0x01
    with pytest.raises(SecAggError, match="from client 2"):
        clients[0].receive_shares({**inbox[0], 2: bytes(ct)})
    # a ciphertext sent to someone else does not pass either (the recipient is bound in)
    with pytest.raises(SecAggError, match="from client 2"):
        clients[1].receive_shares({**inbox[1], 2: inbox[3][2]})


def test_shares_from_another_round_do_not_decrypt():
    length, t = 20, 2
    a = {c: SecAggClient(c, b"round-a", length) for c in range(2)}
    roster = [cl.advertise() for cl in a.values()]
    outgoing = a[1].share_keys(roster, t)
    a[0].share_keys(roster, t)
    # same keys, but client 0 believes it is in round b
    a[0].round_id = b"round-b"
    with pytest.raises(SecAggError, match="from client 1"):
        a[0].receive_shares({1: outgoing[0]})


def test_duplicate_client_ids_and_keys_are_rejected():
    clients = [SecAggClient(c, b"t", 10) for c in range(3)]
    keys = [cl.advertise() for cl in clients]
    with pytest.raises(SecAggError, match="duplicate client id 1"):
        SecAggServer(b"t", 10, 2).receive_keys([*keys, keys[1]])
    stolen = AdvertisedKeys(7, keys[0].c_pk, SecAggClient(7, b"t", 10).advertise().s_pk)
    with pytest.raises(SecAggError, match="duplicate public key"):
        SecAggServer(b"t", 10, 2).receive_keys([*keys, stolen])


def test_the_server_checks_masked_inputs():
    ids, length = range(4), 30
    inputs = encoded_inputs(ids, length)
    clients, server = share_phase(ids, length, threshold=3)
    y = clients[0].masked_input(inputs[0])
    for bad in (y.to(torch.int32), y[:-1], torch.full((length,), RING), torch.full((length,), -1)):
        with pytest.raises(SecAggError, match="client 0"):
            server.receive_masked(0, bad)
    server.receive_masked(0, y)
    with pytest.raises(SecAggError, match="second"):
        server.receive_masked(0, y)
    with pytest.raises(SecAggError, match="did not share keys"):
        server.receive_masked(9, y)
    for c in (1, 2):
        server.receive_masked(c, clients[c].masked_input(inputs[c]))
    assert server.unmask_request() == ([0, 1, 2], [3])
    # once the unmask request is out, client 3 counts as dropped: its input comes too late
    with pytest.raises(SecAggError, match="after the unmask request"):
        server.receive_masked(3, clients[3].masked_input(inputs[3]))


def test_a_client_masks_only_once_and_only_ring_elements():
    ids, length = range(3), 30
    clients, _ = share_phase(ids, length, threshold=2)
    with pytest.raises(ValueError, match="int64"):
        clients[0].masked_input(torch.zeros(length))
    x = torch.zeros(length, dtype=torch.int64)
    clients[0].masked_input(x)
    with pytest.raises(SecAggError, match="twice"):
        clients[0].masked_input(x)
