"""The data-parallel planner: pure arithmetic, checked exhaustively on small inputs."""

from __future__ import annotations

import itertools

import pytest

from orchestrator.shard_plan import (
    batch_shares,
    shard_bounds,
    weights_from_memory,
    weights_from_throughput,
)

WEIGHT_SETS = [[1.0], [1.0, 1.0], [2.0, 1.0, 1.0], [1.0, 1.0, 3.0], [0.001, 5.0, 5.0, 1.0], [3, 7]]


def _sizes(bounds):
    return [hi - lo for lo, hi in bounds]


@pytest.mark.parametrize("weights", WEIGHT_SETS)
@pytest.mark.parametrize("align", [1, 4])
def test_bounds_cover_contiguously_and_are_proportional(weights, align):
    for total in range(0, 60):
        bounds = shard_bounds(total, weights, align)
        assert len(bounds) == len(weights)
        assert bounds[0][0] == 0 and bounds[-1][1] == total
        for (_, hi), (lo, _) in itertools.pairwise(bounds):
            assert hi == lo
        for lo, _ in bounds[1:]:
            assert lo % align == 0
        sizes = _sizes(bounds)
        assert all(s >= 0 for s in sizes)
        if total // align >= len(weights):
            assert all(s > 0 for s in sizes), (total, weights, sizes)
        # Within one alignment unit of the exact quota (plus the forced minimum of
        # one unit and the remainder on the last range).
        quotas = [total * w / sum(weights) for w in weights]
        for i, (s, q) in enumerate(zip(sizes, quotas, strict=True)):
            slack = align * (len(weights) + 1) + (total % align if i == len(sizes) - 1 else 0)
            assert abs(s - q) <= slack


def test_bounds_examples():
    assert shard_bounds(10, [1, 1]) == [(0, 5), (5, 10)]
    assert shard_bounds(12, [2, 1, 1]) == [(0, 6), (6, 9), (9, 12)]
    # 7 * [1/2, 1/4, 1/4] = 3.5, 1.75, 1.75: remainders .5/.75/.75 -> ranks 1 and 2 round up.
    assert shard_bounds(7, [2, 1, 1]) == [(0, 3), (3, 5), (5, 7)]
    # Aligned to 4: 10 elements = 2 units + 2 left over (to the last range).
    assert shard_bounds(10, [1, 1], align=4) == [(0, 4), (4, 10)]
    # A tiny weight still gets one element when there are enough to go round.
    assert _sizes(shard_bounds(10, [1e-9, 1.0])) == [1, 9]


def test_equal_weights_match_split_evenly():
    from collectives.flat import split_evenly

    for total in range(0, 40):
        for parts in range(1, 6):
            assert shard_bounds(total, [1.0] * parts) == split_evenly(total, parts)


def test_batch_shares():
    assert batch_shares(7, [1, 1, 1]) == [3, 2, 2]
    assert batch_shares(7, [1, 2, 1]) == [2, 3, 2]
    assert batch_shares(8, [3, 1]) == [6, 2]
    assert batch_shares(3, [100, 1, 1]) == [1, 1, 1]  # each >= 1 when possible
    assert batch_shares(1, [1, 1]) == [1, 0]  # impossible: ties go to the lower rank
    for gb in range(0, 40):
        for w in WEIGHT_SETS:
            shares = batch_shares(gb, w)
            assert sum(shares) == gb
            if gb >= len(w):
                assert min(shares) >= 1


def test_weights_from_capacities():
    assert weights_from_memory([2e9, 1e9, 1e9]) == [0.5, 0.25, 0.25]
    assert weights_from_throughput([30.0, 10.0]) == [0.75, 0.25]


@pytest.mark.parametrize(
    "bad",
    [[], [0.0], [1.0, -1.0], [float("nan")], [float("inf"), 1.0]],
)
def test_bad_weights_raise(bad):
    for fn in (
        lambda: shard_bounds(10, bad),
        lambda: batch_shares(10, bad),
        lambda: weights_from_memory(bad),
        lambda: weights_from_throughput(bad),
    ):
        with pytest.raises(ValueError):
            fn()


def test_bad_totals_raise():
    with pytest.raises(ValueError, match="total"):
        shard_bounds(-1, [1.0])
    with pytest.raises(ValueError, match="align"):
        shard_bounds(10, [1.0], align=0)
    with pytest.raises(ValueError, match="global_batch"):
        batch_shares(-1, [1.0])
