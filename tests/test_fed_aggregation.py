"""Unit tests for the federated server's aggregation rules and its Yogi optimizer (no Ray).

``collectives/fed_aggregation.py``: every rule against hand-computed small
cases; the robust rules (coordinate median, trimmed mean, centered clipping)
against 1-2 of 10 updates scaled by 1e6, which carry the weighted mean far
away; the column/row blocking against one-block results; ``clip_to_norm``
and ``validate_update`` for each kind of bad update.

``collectives/optim.py``'s ``yogi`` (FedYogi's server optimizer) is tested here
too, against a per-element float64 reference of Reddi et al. 2021's update,
since there is no ``tests/test_optim.py`` and torch has no Yogi to compare with.
"""

from __future__ import annotations

import math

import pytest
import torch

from collectives import fed_aggregation as fa
from collectives.fed_aggregation import (
    centered_clip,
    clip_to_norm,
    coordinate_median,
    trimmed_mean,
    validate_update,
    weighted_mean,
)
from collectives.optim import FlatOptimizer, OptimizerSpec


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# ---------------------------------------------------------------- hand-computed cases


def test_weighted_mean_by_hand():
    # (1*1 + 3*3) / 4 = 2.5, (1*2 + 3*4) / 4 = 3.5
    out = weighted_mean(t([[1, 2], [3, 4]]), t([1, 3]))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, t([2.5, 3.5]))
    # Integer sample counts are weights too; a zero weight drops that update.
    out = weighted_mean(t([[1, 2], [3, 4], [100, 100]]), torch.tensor([1, 1, 0]))
    torch.testing.assert_close(out, t([2.0, 3.0]))


@pytest.mark.parametrize(
    "weights", [[0.0, 0.0], [-1.0, 2.0], [float("nan"), 1.0], [1.0], [1.0, 1.0, 1.0]]
)
def test_weighted_mean_rejects_bad_weights(weights):
    with pytest.raises(ValueError):
        weighted_mean(t([[1, 2], [3, 4]]), t(weights))


def test_coordinate_median_by_hand():
    # Odd k: the middle value of each column.
    torch.testing.assert_close(coordinate_median(t([[1, 10], [2, -5], [100, 0]])), t([2, 0]))
    # Even k: the mean of the two middle values (1 3 5 7 -> 4; 0 2 4 100 -> 3).
    torch.testing.assert_close(coordinate_median(t([[1, 4], [3, 2], [5, 0], [7, 100]])), t([4, 3]))
    torch.testing.assert_close(coordinate_median(t([[1.5, -2]])), t([1.5, -2]))


def test_trimmed_mean_by_hand():
    u = t([[1, 10], [2, 20], [3, 30], [4, 40], [100, -1000]])
    # trim 0.2 of k=5: one value off each end: (2+3+4)/3 = 3, (10+20+30)/3 = 20.
    torch.testing.assert_close(trimmed_mean(u, 0.2), t([3, 20]))
    # floor(0.39 * 5) = 1, the same; floor(0.19 * 5) = 0: the plain mean.
    torch.testing.assert_close(trimmed_mean(u, 0.39), t([3, 20]))
    torch.testing.assert_close(trimmed_mean(u, 0.19), u.mean(dim=0))
    torch.testing.assert_close(trimmed_mean(u, 0.0), u.mean(dim=0))
    # trim 0.4: two off each end leaves the median (3, 20).
    torch.testing.assert_close(trimmed_mean(u, 0.4), t([3, 20]))


@pytest.mark.parametrize("k, trim", [(2, 0.5), (4, 0.5), (3, 0.7), (2, 1.0), (5, -0.1)])
def test_trimmed_mean_raises_when_nothing_remains(k, trim):
    with pytest.raises(ValueError, match="none would remain|trim must be"):
        trimmed_mean(torch.ones(k, 3), trim)


def test_centered_clip_by_hand():
    u, center = t([[0.0], [10.0]]), t([0.0])
    # Step 1 from v=0: distances 0 and 10; the second clipped to tau=1:
    # v = 0 + (0 + 1) / 2 = 0.5.
    torch.testing.assert_close(centered_clip(u, center, tau=1.0, iters=1), t([0.5]))
    # Step 2 from 0.5: -0.5 (inside tau, kept) and 9.5 (clipped to 1):
    # v = 0.5 + (-0.5 + 1) / 2 = 0.75.
    torch.testing.assert_close(centered_clip(u, center, tau=1.0, iters=2), t([0.75]))
    # In 2-D the clipped difference keeps its direction: (3, 4) has norm 5,
    # clipped to tau=1 it is (0.6, 0.8); the mean with (0, 0) is (0.3, 0.4).
    out = centered_clip(t([[0, 0], [3, 4]]), t([0, 0]), tau=1.0, iters=1)
    torch.testing.assert_close(out, t([0.3, 0.4]))
    # With tau above every distance, one step lands on the plain mean.
    u = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    out = centered_clip(u, torch.zeros(5), tau=1e6, iters=1)
    torch.testing.assert_close(out, u.mean(dim=0))
    # The centre is not modified.
    assert torch.equal(center, t([0.0]))


def test_clip_to_norm_by_hand():
    u = t([3, 4])
    clipped, norm = clip_to_norm(u, 1.0)
    torch.testing.assert_close(clipped, t([0.6, 0.8]))
    assert norm == pytest.approx(5.0)
    # Inside the ball: unchanged, but a new tensor (the caller may keep the original).
    clipped, norm = clip_to_norm(u, 10.0)
    assert torch.equal(clipped, u) and clipped.data_ptr() != u.data_ptr()
    assert norm == pytest.approx(5.0)
    assert torch.equal(u, t([3, 4]))
    clipped, norm = clip_to_norm(torch.zeros(4), 1.0)
    assert torch.equal(clipped, torch.zeros(4)) and norm == 0.0


def test_clip_to_norm_huge_and_bad_inputs():
    # Finite values whose squares overflow float32 are still clipped onto the sphere.
    u = t([3e30, 4e30])
    clipped, norm = clip_to_norm(u, 2.0)
    assert norm == pytest.approx(5e30, rel=1e-6)
    torch.testing.assert_close(clipped, t([1.2, 1.6]))
    with pytest.raises(ValueError, match="non-finite"):
        clip_to_norm(t([1.0, float("inf")]), 1.0)
    with pytest.raises(ValueError, match="bound"):
        clip_to_norm(u, 0.0)


def test_clip_to_norm_stays_within_bound():
    gen = torch.Generator().manual_seed(1)
    for scale in (1e-3, 1.0, 1e3, 1e20):
        u = torch.randn(10_001, generator=gen) * scale
        clipped, _ = clip_to_norm(u, 0.7)
        assert float(torch.linalg.vector_norm(clipped.double())) <= 0.7 * (1 + 1e-6)


# ---------------------------------------------------------------- robustness


def _honest_and_byzantine(n_bad: int, d: int = 1000, seed: int = 0):
    """10 updates: 10 - n_bad honest ones around a common direction, n_bad scaled by 1e6."""
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(d, generator=gen)
    honest = direction + 0.1 * torch.randn(10 - n_bad, d, generator=gen)
    bad = 1e6 * torch.randn(n_bad, d, generator=gen)
    # The bad ones in the middle of the stack: no rule may rely on their position.
    updates = torch.cat([honest[:3], bad, honest[3:]])
    return updates, honest


@pytest.mark.parametrize("n_bad", [1, 2])
def test_robust_rules_stay_with_the_honest_updates(n_bad):
    updates, honest = _honest_and_byzantine(n_bad)
    honest_mean = honest.mean(dim=0)
    lo, hi = honest.min(dim=0).values, honest.max(dim=0).values

    def error(x: torch.Tensor) -> float:
        return float(torch.linalg.vector_norm(x - honest_mean))

    # FedAvg's mean is carried ~1e5 away (norm ~ 1e6 * sqrt(d) * n_bad / 10).
    assert error(weighted_mean(updates, torch.ones(10))) > 1e5

    # Per coordinate, the median (with < k/2 bad) and the trimmed mean (with at
    # least as many trimmed as bad) lie within the honest values' range: a
    # guarantee, not a tolerance.
    for robust in (coordinate_median(updates), trimmed_mean(updates, 0.2)):
        assert bool(((robust >= lo) & (robust <= hi)).all())
        # ~0.1 spread per coordinate over 1000 coordinates: the honest mean's
        # own distance to each honest update is ~3.
        assert error(robust) < 3.0

    # Centered clipping from the previous round's aggregate (the honest mean
    # plus some drift): each bad update moves v by at most tau / k per step.
    gen = torch.Generator().manual_seed(1)
    center = honest_mean + 0.05 * torch.randn(honest_mean.shape, generator=gen)
    tau, iters = 5.0, 3
    cc = centered_clip(updates, center, tau=tau, iters=iters)
    assert error(cc) < error(center) + iters * n_bad * tau / 10
    assert error(cc) < 3.0


def test_blocking_matches_one_block(monkeypatch):
    """Results do not depend on how the [k, d] work is split into blocks."""
    gen = torch.Generator().manual_seed(2)
    updates = torch.randn(9, 1003, generator=gen)
    center = torch.randn(1003, generator=gen)
    expected = (
        coordinate_median(updates),
        trimmed_mean(updates, 0.2),
        centered_clip(updates, center, 0.5),
        coordinate_median(updates[:8]),
    )
    # Blocks of ~2 rows / 7 columns, with ragged ends.
    monkeypatch.setattr(fa, "_BLOCK_ELEMENTS", 63)
    blocked = (
        coordinate_median(updates),
        trimmed_mean(updates, 0.2),
        centered_clip(updates, center, 0.5),
        coordinate_median(updates[:8]),
    )
    for a, b in zip(expected, blocked, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # And against torch's own sort-based median/trimmed mean.
    ranked = updates.sort(dim=0).values
    torch.testing.assert_close(expected[0], ranked[4])
    torch.testing.assert_close(expected[1], ranked[1:8].mean(dim=0))


def test_centered_clip_huge_finite_values():
    # Distances whose squares overflow float32 still clip to tau, not to 0 or nan.
    u = t([[1.0, 1.0], [3e30, -3e30]])
    out = centered_clip(u, t([1.0, 1.0]), tau=1.0, iters=1)
    # (0 + (1, -1) / sqrt(2)) / 2 from (1, 1).
    s = 0.5 / math.sqrt(2)
    torch.testing.assert_close(out, t([1 + s, 1 - s]))


# ---------------------------------------------------------------- validation


def test_validate_update_accepts_a_good_update():
    assert validate_update(torch.ones(5), 5, None) is None
    assert validate_update(torch.ones(5), 5, max_norm=math.sqrt(5) + 1e-6) is None


@pytest.mark.parametrize(
    "update, max_norm, reason",
    [
        ([1.0] * 5, None, "not a tensor"),
        (None, None, "not a tensor"),
        (torch.ones(5, dtype=torch.float64), None, "dtype"),
        (torch.ones(5, dtype=torch.bfloat16), None, "dtype"),
        (torch.ones(5, dtype=torch.int64), None, "dtype"),
        (torch.ones(4), None, "shape"),
        (torch.ones(1, 5), None, "shape"),
        (torch.ones(5).to_sparse(), None, "dense"),
        (torch.tensor([1.0, float("nan"), 0, 0, 0]), None, "non-finite"),
        (torch.tensor([1.0, float("inf"), 0, 0, 0]), None, "non-finite"),
        (torch.tensor([1.0, -float("inf"), 0, 0, 0]), 1e9, "non-finite"),
        (torch.full((5,), 2.0), 4.0, "norm"),
        (torch.full((5,), 3e30), 1e30, "norm"),  # norm 6.7e30: its square overflows float32
    ],
)
def test_validate_update_catches_each_bad_kind(update, max_norm, reason):
    why = validate_update(update, 5, max_norm)
    assert why is not None and reason in why, why


# ---------------------------------------------------------------- yogi (collectives/optim.py)


def _yogi_reference(param, grads, lr, beta1, beta2, eps, weight_decay, decayed):
    """Reddi et al. 2021 (Algorithm 2, FedYogi), one element at a time in float64."""
    p = [float(x) for x in param]
    m = [0.0] * len(p)
    v = [eps**2] * len(p)  # v_{-1} = tau^2
    for g_t in grads:
        for i, g in enumerate(float(x) for x in g_t):
            if decayed[i]:
                p[i] *= 1 - lr * weight_decay
            m[i] = beta1 * m[i] + (1 - beta1) * g
            sign = (v[i] > g * g) - (v[i] < g * g)
            v[i] = v[i] - (1 - beta2) * g * g * sign
            p[i] -= lr * m[i] / (math.sqrt(v[i]) + eps)
    return p, m, v


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_yogi_matches_elementwise_reference(weight_decay):
    gen = torch.Generator().manual_seed(3)
    n, lr, steps = 64, 0.05, 6
    spec = OptimizerSpec("yogi", weight_decay=weight_decay, beta1=0.9, beta2=0.99, eps=1e-3)
    param = torch.randn(n, generator=gen)
    grad = torch.zeros(n)
    decayed = [(8, 20), (40, 50)]
    opt = FlatOptimizer(spec, param, grad, decayed=decayed)
    start = param.clone()
    grads = []
    for step in range(steps):
        # Gradients of very different sizes, so v both grows (v < g^2) and
        # shrinks (v > g^2), and a few exact zeros (sign 0 where v = 0 never
        # happens: v starts at eps^2).
        g = torch.randn(n, generator=gen) * torch.logspace(-4, 1, n)
        g[::17] = 0.0
        if step == 3:
            g *= 1e-3  # a quiet step: v > g^2 almost everywhere
        grads.append(g.clone())
        grad.copy_(g)
        opt.step(lr)
    in_decay = [any(a <= i < b for a, b in decayed) for i in range(n)]
    p, m, v = _yogi_reference(start, grads, lr, 0.9, 0.99, 1e-3, weight_decay, in_decay)
    f64 = torch.float64
    torch.testing.assert_close(param.to(f64), torch.tensor(p, dtype=f64), rtol=1e-5, atol=1e-6)
    state = opt.state_tensors()
    assert set(state) == {"exp_avg", "exp_avg_sq"}
    torch.testing.assert_close(state["exp_avg"].to(f64), torch.tensor(m, dtype=f64))
    torch.testing.assert_close(state["exp_avg_sq"].to(f64), torch.tensor(v, dtype=f64))
    assert bool((state["exp_avg_sq"] > 0).all())
    assert opt.step_count == steps


def test_yogi_as_fedyogi_server_moves_along_the_update():
    """The negated average update as the gradient: the first step is along the update."""
    spec = OptimizerSpec("yogi", beta1=0.9, beta2=0.99, eps=1e-3)
    param, grad = torch.zeros(3), torch.zeros(3)
    opt = FlatOptimizer(spec, param, grad, decayed=[])
    update = t([0.5, -0.2, 0.0])
    grad.copy_(-update)
    opt.step(0.01)
    assert bool((torch.sign(param) == torch.sign(update)).all())


def test_yogi_spec():
    spec = OptimizerSpec("yogi")
    assert spec.state_keys() == ("exp_avg", "exp_avg_sq")
    with pytest.raises(ValueError, match="yogi"):
        spec.build([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(ValueError, match="'adamw', 'sgd' or 'yogi'"):
        FlatOptimizer(OptimizerSpec("adam"), torch.zeros(2), torch.zeros(2), decayed=[])
    with pytest.raises(ValueError, match="'adamw', 'sgd' or 'yogi'"):
        OptimizerSpec("adam").build([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    # Checkpoint round trip: the state loads back and the next steps agree.
    a_param, a_grad = torch.randn(10, generator=torch.Generator().manual_seed(4)), torch.zeros(10)
    a = FlatOptimizer(spec, a_param, a_grad, decayed=[])
    a_grad.normal_(generator=torch.Generator().manual_seed(5))
    a.step(0.1)
    b_param, b_grad = a_param.clone(), a_grad.clone()
    b = FlatOptimizer(spec, b_param, b_grad, decayed=[])
    b.load_state({k: v.clone() for k, v in a.state_tensors().items()}, a.step_count)
    a.step(0.1)
    b.step(0.1)
    assert torch.equal(a_param, b_param)
