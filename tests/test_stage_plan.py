"""Unit tests for ``orchestrator.stage_plan``: the pipeline partition planner.

Pure functions on synthetic cost tables (no Ray, no torch): ``even_bounds``,
``in_flight``, and ``plan_partition``'s balance (even split on uniform tables,
a strictly better slowest stage than the even split on skewed ones, agreement
with a brute-force search over every contiguous partition), heterogeneous
workers and replicas (slowest replica's time, every replica's memory), memory
accounting (state plus activations per in-flight micro-batch under GPipe and
1F1B), and the errors (``PartitionError`` naming the layer that does not fit,
``ValueError`` on malformed input).
"""

import itertools
import math
import random
import re

import pytest

from orchestrator.stage_plan import (
    LayerCost,
    Partition,
    PartitionError,
    StageWorker,
    even_bounds,
    in_flight,
    plan_partition,
)

BIG = 10**12  # a memory budget nothing reaches


def table(costs, state=0, act=0, prefix="l"):
    """Layers named l0, l1, ... with the given compute times (state/act: one int or a list)."""
    n = len(costs)
    states = state if isinstance(state, list) else [state] * n
    acts = act if isinstance(act, list) else [act] * n
    return tuple(
        LayerCost(f"{prefix}{i}", float(c), states[i], acts[i]) for i, c in enumerate(costs)
    )


def worker(costs, memory=BIG, state=0, act=0):
    return StageWorker(table(costs, state, act), memory)


def one_each(*workers):
    """One worker per stage."""
    return [[w] for w in workers]


def stage_times(stage_workers, bounds):
    """Each stage's time for ``bounds``: the slowest of its workers, summed directly."""
    return [
        max(sum(c.compute_s for c in w.layers[a:b]) for w in ws)
        for ws, (a, b) in zip(stage_workers, bounds, strict=True)
    ]


def fits(stage_workers, bounds, schedule, micro_batches):
    stages = len(stage_workers)
    for s, (ws, (a, b)) in enumerate(zip(stage_workers, bounds, strict=True)):
        held = in_flight(schedule, s, stages, micro_batches)
        for w in ws:
            layers = w.layers[a:b]
            need = sum(c.state_bytes for c in layers) + held * sum(
                c.activation_bytes for c in layers
            )
            if need > w.memory_bytes:
                return False
    return True


def all_bounds(n, stages):
    """Every way to cut ``n`` layers into ``stages`` non-empty contiguous blocks."""
    for cuts in itertools.combinations(range(1, n), stages - 1):
        edges = (0, *cuts, n)
        yield tuple(itertools.pairwise(edges))


def brute_force(stage_workers, schedule="gpipe", micro_batches=1):
    """The least slowest-stage time over all feasible partitions, or None if none fits."""
    n = len(stage_workers[0][0].layers)
    best = None
    for bounds in all_bounds(n, len(stage_workers)):
        if not fits(stage_workers, bounds, schedule, micro_batches):
            continue
        t = max(stage_times(stage_workers, bounds))
        if best is None or t < best:
            best = t
    return best


def assert_valid(partition, stage_workers, schedule="gpipe", micro_batches=1):
    """Contiguous, non-empty, covering bounds; stage_s matches the tables; memory fits."""
    n = len(stage_workers[0][0].layers)
    bounds = partition.bounds
    assert len(bounds) == len(stage_workers) == len(partition.stage_s)
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    for (_, b), (c, _) in itertools.pairwise(bounds):
        assert b == c
    assert all(a < b for a, b in bounds)
    assert partition.stage_s == pytest.approx(stage_times(stage_workers, bounds), rel=1e-9)
    assert fits(stage_workers, bounds, schedule, micro_batches)


# even_bounds and in_flight


@pytest.mark.parametrize(
    "n, stages, expected",
    [
        (4, 2, ((0, 2), (2, 4))),
        (5, 2, ((0, 3), (3, 5))),
        (7, 3, ((0, 3), (3, 5), (5, 7))),
        (3, 3, ((0, 1), (1, 2), (2, 3))),
        (5, 1, ((0, 5),)),
    ],
)
def test_even_bounds(n, stages, expected):
    assert even_bounds(n, stages) == expected


def test_even_bounds_cover_all_layers_in_near_equal_blocks():
    for n in range(1, 20):
        for stages in range(1, n + 1):
            bounds = even_bounds(n, stages)
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            sizes = [b - a for a, b in bounds]
            assert max(sizes) - min(sizes) <= 1
            assert sizes == sorted(sizes, reverse=True)


def test_in_flight_gpipe_holds_every_micro_batch():
    assert [in_flight("gpipe", s, 4, 6) for s in range(4)] == [6, 6, 6, 6]


def test_in_flight_1f1b_holds_stages_left_capped_by_micro_batches():
    assert [in_flight("1f1b", s, 4, 8) for s in range(4)] == [4, 3, 2, 1]
    assert [in_flight("1f1b", s, 4, 2) for s in range(4)] == [2, 2, 2, 1]


# Balance


@pytest.mark.parametrize("n, stages", [(4, 2), (6, 3), (8, 4), (8, 2), (5, 5), (3, 1)])
def test_equal_layers_equal_workers_give_the_even_split(n, stages):
    sw = [[worker([1.0] * n)] for _ in range(stages)]
    p = plan_partition(sw)
    assert p.bounds == even_bounds(n, stages)
    assert p.stage_s == pytest.approx([n / stages] * stages)
    assert p.imbalance == pytest.approx(1.0)


@pytest.mark.parametrize("n, stages", [(5, 2), (7, 3), (10, 4)])
def test_equal_layers_uneven_count_is_as_fast_as_the_even_split(n, stages):
    sw = [[worker([1.0] * n)] for _ in range(stages)]
    p = plan_partition(sw)
    assert_valid(p, sw)
    assert max(p.stage_s) == pytest.approx(math.ceil(n / stages))
    assert max(p.stage_s) == pytest.approx(max(plan_partition(sw, even=True).stage_s))


def test_one_heavy_layer_beats_the_even_split():
    costs = [4.0] + [1.0] * 7  # 11 in all; the even split puts 7 on stage 0
    sw = one_each(worker(costs), worker(costs))
    even = plan_partition(sw, even=True)
    planned = plan_partition(sw)
    assert even.bounds == ((0, 4), (4, 8))
    assert max(even.stage_s) == pytest.approx(7.0)
    assert max(planned.stage_s) == pytest.approx(6.0)
    assert max(planned.stage_s) < max(even.stage_s)
    assert planned.bounds[0][1] < 4  # the heavy layer's stage takes fewer layers
    assert planned.imbalance < even.imbalance


def test_heavy_layer_in_the_middle_of_four_stages():
    costs = [1.0] * 12
    costs[5] = 4.0
    sw = [[worker(costs)] for _ in range(4)]
    planned = plan_partition(sw)
    even = plan_partition(sw, even=True)
    assert max(planned.stage_s) < max(even.stage_s)
    assert max(planned.stage_s) == pytest.approx(brute_force(sw))
    heavy_stage = next(s for s, (a, b) in enumerate(planned.bounds) if a <= 5 < b)
    a, b = planned.bounds[heavy_stage]
    assert b - a < 3  # fewer than the even share of 3 layers


def test_matches_brute_force_on_random_tables():
    rng = random.Random(20240611)
    for _ in range(300):
        n = rng.randint(1, 8)
        stages = rng.randint(1, n)
        costs = [rng.choice([0.5, 1.0, 2.0, 4.0]) * rng.uniform(0.5, 1.5) for _ in range(n)]
        sw = [
            [worker([c * rng.uniform(0.5, 2.0) for c in costs]) for _ in range(rng.randint(1, 2))]
            for _ in range(stages)
        ]
        p = plan_partition(sw)
        assert_valid(p, sw)
        assert max(p.stage_s) == pytest.approx(brute_force(sw), rel=1e-9)


def test_matches_brute_force_with_memory_limits():
    rng = random.Random(7)
    feasible = infeasible = 0
    for _ in range(400):
        n = rng.randint(1, 7)
        stages = rng.randint(1, min(n, 4))
        schedule = rng.choice(["gpipe", "1f1b"])
        m = rng.randint(1, 6)
        states = [rng.randint(1, 10) for _ in range(n)]
        acts = [rng.randint(0, 5) for _ in range(n)]
        sw = [
            [
                worker(
                    [rng.uniform(0.1, 3.0) for _ in range(n)],
                    memory=rng.randint(5, 80),
                    state=states,
                    act=acts,
                )
                for _ in range(rng.randint(1, 2))
            ]
            for _ in range(stages)
        ]
        expected = brute_force(sw, schedule, m)
        if expected is None:
            infeasible += 1
            with pytest.raises(PartitionError):
                plan_partition(sw, schedule=schedule, micro_batches=m)
        else:
            feasible += 1
            p = plan_partition(sw, schedule=schedule, micro_batches=m)
            assert_valid(p, sw, schedule, m)
            assert max(p.stage_s) == pytest.approx(expected, rel=1e-9)
    assert feasible > 50 and infeasible > 50  # both branches were exercised


def test_partition_imbalance():
    assert Partition(((0, 1), (1, 2)), (1.0, 3.0)).imbalance == pytest.approx(1.5)
    assert Partition(((0, 1),), (0.0,)).imbalance == 1.0


# Heterogeneous workers and replicas


def test_slower_worker_gets_fewer_layers():
    n = 6
    slow, fast = worker([2.0] * n), worker([1.0] * n)
    p = plan_partition(one_each(slow, fast))
    assert p.bounds == ((0, 2), (2, 6))
    assert p.stage_s == pytest.approx((4.0, 4.0))
    p = plan_partition(one_each(fast, slow))
    assert p.bounds == ((0, 4), (4, 6))


def test_slower_worker_among_three_stages_gets_the_fewest_layers():
    n = 12
    sw = one_each(worker([1.0] * n), worker([2.0] * n), worker([1.0] * n))
    p = plan_partition(sw)
    sizes = [b - a for a, b in p.bounds]
    assert sizes[1] < sizes[0] and sizes[1] < sizes[2]
    assert max(p.stage_s) < max(plan_partition(sw, even=True).stage_s)


def test_replicated_stage_runs_at_its_slowest_replicas_pace():
    n = 6
    fast, slow = worker([1.0] * n), worker([2.0] * n)
    p = plan_partition([[fast, slow], [fast, fast]])
    assert p.bounds == ((0, 2), (2, 6))  # as if stage 0 were the slow worker alone
    assert p.stage_s == pytest.approx((4.0, 4.0))
    assert plan_partition([[slow, fast], [fast]]).bounds == ((0, 2), (2, 6))


def test_replicated_stage_must_fit_its_smallest_replica():
    n = 6
    roomy = worker([1.0] * n, memory=100, state=10)
    small = worker([1.0] * n, memory=20, state=10)  # two layers at most
    assert plan_partition([[roomy], [roomy]]).bounds == ((0, 3), (3, 6))
    p = plan_partition([[roomy, small], [roomy]])
    assert p.bounds == ((0, 2), (2, 6))
    p = plan_partition([[roomy], [small, roomy]])
    assert p.bounds == ((0, 4), (4, 6))


def test_replicas_can_have_different_tables_and_budgets():
    a = StageWorker(table([1, 1, 1, 1], state=[5, 5, 5, 5]), 10)
    b = StageWorker(table([1, 3, 1, 1], state=[1, 1, 1, 1]), 100)
    sw = [[a, b], [a]]
    p = plan_partition(sw)
    assert_valid(p, sw)
    assert max(p.stage_s) == pytest.approx(brute_force(sw))


# Memory


def test_memory_exactly_at_the_budget_fits():
    sw = one_each(*[worker([1.0] * 4, memory=2 * 10 + 2 * 5, state=10, act=5)] * 2)
    assert plan_partition(sw).bounds == ((0, 2), (2, 4))
    sw = one_each(*[worker([1.0] * 4, memory=2 * 10 + 2 * 5 - 1, state=10, act=5)] * 2)
    with pytest.raises(PartitionError):
        plan_partition(sw)


def test_memory_pushes_layers_off_a_full_stage():
    # Compute alone would split 3/3; stage 0 holds only two layers' state.
    n = 6
    sw = one_each(worker([1.0] * n, memory=20, state=10), worker([1.0] * n, state=10))
    p = plan_partition(sw)
    assert p.bounds == ((0, 2), (2, 6))
    assert_valid(p, sw)


def test_layer_larger_than_every_budget_is_named():
    states = [1, 1, 500, 1]
    sw = [[StageWorker(table([1.0] * 4, state=states), 100)] for _ in range(2)]
    with pytest.raises(PartitionError, match="'l2'") as err:
        plan_partition(sw)
    assert "500" in str(err.value)  # what it needs
    assert "100" in str(err.value)  # the largest budget


def test_layer_whose_activations_exceed_every_budget_is_named():
    acts = [0, 0, 0, 30]
    sw = [[StageWorker(table([1.0] * 4, state=1, act=acts), 100)] for _ in range(2)]
    assert plan_partition(sw, micro_batches=3).bounds  # 1 + 3 * 30 fits
    with pytest.raises(PartitionError, match="'l3'"):
        plan_partition(sw, micro_batches=4)  # 1 + 4 * 30 does not


def test_layers_that_fit_alone_but_not_together_name_a_layer():
    # Each stage holds one 10-byte layer; four layers need four stages.
    sw = [[worker([1.0] * 4, memory=15, state=10)] for _ in range(2)]
    with pytest.raises(PartitionError) as err:
        plan_partition(sw)
    message = str(err.value)
    assert "'l2'" in message  # the first layer past two full stages
    named = re.findall(r"'(l\d+)'", message)
    assert named and set(named) <= {f"l{i}" for i in range(4)}


def test_together_but_not_alone_under_even():
    sw = [[worker([1.0] * 4, memory=15, state=10)] for _ in range(4)]
    assert plan_partition(sw).bounds == even_bounds(4, 4)
    assert plan_partition(sw, even=True).bounds == even_bounds(4, 4)


def test_activations_count_once_per_in_flight_micro_batch():
    # Two stages, four micro-batches, four layers of state 10 and activations 10.
    # 1f1b holds 2 micro-batches on stage 0 and 1 on stage 1: 2 layers each fit in 60.
    # gpipe holds 4 on both: one layer needs 50, two need 100: no plan fits in 60.
    sw = [[worker([1.0] * 4, memory=60, state=10, act=10)] for _ in range(2)]
    p = plan_partition(sw, schedule="1f1b", micro_batches=4)
    assert p.bounds == ((0, 2), (2, 4))
    assert_valid(p, sw, "1f1b", 4)
    with pytest.raises(PartitionError, match=r"'l\d'"):
        plan_partition(sw, schedule="gpipe", micro_batches=4)
    # One micro-batch holds one copy under either schedule.
    assert plan_partition(sw, schedule="gpipe", micro_batches=1).bounds == ((0, 2), (2, 4))


def test_1f1b_lets_later_stages_hold_more_activations():
    # Stage s holds min(3 - s, 8) micro-batches: 3, 2, 1. Memory 40 with act 10:
    # stage 0 fits one layer (30), stage 1 two (40), stage 2 four (40).
    n = 6
    sw = [[worker([1.0] * n, memory=40, act=10)] for _ in range(3)]
    p = plan_partition(sw, schedule="1f1b", micro_batches=8)
    assert_valid(p, sw, "1f1b", 8)
    sizes = [b - a for a, b in p.bounds]
    assert sizes[0] <= 1 and sizes[1] <= 2
    assert sizes == sorted(sizes)
    with pytest.raises(PartitionError):
        plan_partition(sw, schedule="gpipe", micro_batches=8)  # 8 * 10 > 40 for any layer


def test_micro_batches_scale_activation_memory_under_gpipe():
    sw = [[worker([1.0] * 2, memory=50, state=10, act=10)] for _ in range(2)]
    assert plan_partition(sw, micro_batches=4).bounds == ((0, 1), (1, 2))
    with pytest.raises(PartitionError, match="'l0'"):
        plan_partition(sw, micro_batches=5)


# even=True


def test_even_returns_even_bounds_even_when_slower():
    costs = [4.0] + [1.0] * 7
    sw = one_each(worker(costs), worker(costs))
    p = plan_partition(sw, even=True)
    assert p.bounds == even_bounds(8, 2)
    assert p.stage_s == pytest.approx((7.0, 4.0))


def test_even_uses_each_stages_slowest_replica():
    fast, slow = worker([1.0] * 4), worker([3.0] * 4)
    p = plan_partition([[fast, slow], [fast]], even=True)
    assert p.bounds == ((0, 2), (2, 4))
    assert p.stage_s == pytest.approx((6.0, 2.0))


def test_even_still_checks_memory():
    # The planner can fit this by giving stage 0 fewer layers; the even split cannot.
    n = 6
    sw = one_each(worker([1.0] * n, memory=20, state=10), worker([1.0] * n, state=10))
    assert plan_partition(sw).bounds == ((0, 2), (2, 6))
    with pytest.raises(PartitionError, match="stage 0") as err:
        plan_partition(sw, even=True)
    assert "l0" in str(err.value) and "l2" in str(err.value)


def test_even_checks_activations_per_schedule():
    sw = [[worker([1.0] * 4, memory=60, state=10, act=10)] for _ in range(2)]
    assert plan_partition(sw, even=True, schedule="1f1b", micro_batches=4).bounds == (
        (0, 2),
        (2, 4),
    )
    with pytest.raises(PartitionError, match="stage 0"):
        plan_partition(sw, even=True, schedule="gpipe", micro_batches=4)


# Errors on the input


@pytest.mark.parametrize("even", [False, True])
def test_fewer_layers_than_stages(even):
    sw = [[worker([1.0] * 2)] for _ in range(3)]
    with pytest.raises(PartitionError, match="3 stages") as err:
        plan_partition(sw, even=even)
    assert "has 2" in str(err.value)


def _value_error_not_partition_error(sw):
    with pytest.raises(ValueError) as err:
        plan_partition(sw)
    assert not isinstance(err.value, PartitionError)


def test_tables_with_different_layer_names_are_rejected():
    other = StageWorker(table([1.0] * 3, prefix="x"), BIG)
    _value_error_not_partition_error([[worker([1.0] * 3)], [other]])


def test_tables_with_different_lengths_are_rejected():
    _value_error_not_partition_error([[worker([1.0] * 3)], [worker([1.0] * 4)]])


def test_tables_in_a_different_order_are_rejected():
    t = table([1.0] * 3)
    swapped = StageWorker((t[1], t[0], t[2]), BIG)
    _value_error_not_partition_error([[StageWorker(t, BIG)], [swapped]])


def test_mismatched_replica_table_is_rejected():
    _value_error_not_partition_error([[worker([1.0] * 3), worker([1.0] * 2)], [worker([1.0] * 3)]])


def test_a_later_stage_without_workers_is_rejected():
    _value_error_not_partition_error([[worker([1.0] * 3)], []])


@pytest.mark.parametrize("sw", [[], [[], [worker([1.0] * 3)]]], ids=["no-stages", "empty-first"])
def test_no_stages_or_empty_first_stage_is_a_value_error(sw):
    _value_error_not_partition_error(sw)


@pytest.mark.parametrize("tiny_stage", [0, 1])
def test_a_stage_that_holds_no_layer_is_named(tiny_stage):
    workers = [worker([1.0] * 4, memory=100, state=10) for _ in range(2)]
    workers[tiny_stage] = worker([1.0] * 4, memory=5, state=10)
    with pytest.raises(PartitionError) as err:
        plan_partition(one_each(*workers))
    message = str(err.value)
    assert f"stage {tiny_stage}" in message or re.search(r"'l\d'", message), message


def test_denoised_costs_keep_speed_and_drop_spikes():
    from orchestrator.stage_plan import denoised_costs

    fast = [1.0, 2.0, 3.0, 4.0]
    slow = [2.0, 4.0, 60.0, 8.0]  # 2x slower, with one 10x spike on the third layer
    out = denoised_costs([fast, slow])
    assert out[0] == fast
    assert out[1] == [2.0, 4.0, 6.0, 8.0]
