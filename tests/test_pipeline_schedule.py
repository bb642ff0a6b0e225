"""Unit tests for ``collectives.pipeline_schedule``: GPipe and 1F1B as action lists.

Checks each stage's list (every micro-batch forward once and backward once,
backward after its forward, the exact GPipe and 1F1B orders), the activation
memory (``peak_in_flight``: ``m`` for GPipe, ``min(p - s, m)`` for 1F1B), and
that all stages of a pipeline together cannot deadlock: a small simulator runs
every stage's list with blocking receives (stage ``s``'s ``F(i)`` waits for
stage ``s - 1``'s ``F(i)``, its ``B(i)`` for stage ``s + 1``'s ``B(i)``, the
last stage's ``B(i)`` for its own ``F(i)``), and is itself shown to catch
deadlocks. Also ``bubble_formula`` and the argument checks.
"""

import pytest

from collectives.pipeline_schedule import (
    SCHEDULES,
    bubble_formula,
    peak_in_flight,
    stage_actions,
)

SIZES = [(p, m) for p in range(1, 6) for m in range(1, 10)]


def pipeline(schedule, stages, micro_batches):
    return [stage_actions(schedule, s, stages, micro_batches) for s in range(stages)]


def simulate(lists, with_steps=False):
    """Run every stage's actions with blocking receives; return the completion order.

    Each time step, every stage whose next action's input is ready runs it
    (``with_steps``: also return the number of steps). Raises
    ``AssertionError`` naming the stuck actions if no stage can move before all
    are done (a deadlock), or if a stage runs an action twice.
    """
    stages = len(lists)
    done = [set() for _ in range(stages)]
    pos = [0] * stages
    order = []
    steps = 0

    def ready(s, kind, i):
        if kind == "F":
            return s == 0 or ("F", i) in done[s - 1]
        if ("F", i) not in done[s]:  # a stage keeps its own activations for the backward
            return False
        return s == stages - 1 or ("B", i) in done[s + 1]

    while any(pos[s] < len(lists[s]) for s in range(stages)):
        moved = [s for s in range(stages) if pos[s] < len(lists[s]) and ready(s, *lists[s][pos[s]])]
        if not moved:
            stuck = {s: lists[s][pos[s]] for s in range(stages) if pos[s] < len(lists[s])}
            raise AssertionError(f"deadlock: stages wait at {stuck}")
        steps += 1
        for s in moved:  # all moves decided before any is applied: one time step
            action = lists[s][pos[s]]
            assert action not in done[s], f"stage {s} runs {action} twice"
            done[s].add(action)
            order.append((s, action))
            pos[s] += 1
    return (order, steps) if with_steps else order


# Each stage's list


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("p, m", SIZES)
def test_every_micro_batch_forward_and_backward_exactly_once(schedule, p, m):
    for s in range(p):
        actions = stage_actions(schedule, s, p, m)
        assert sorted(actions) == sorted(
            [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
        )


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("p, m", SIZES)
def test_backward_after_its_forward_and_both_in_micro_batch_order(schedule, p, m):
    for s in range(p):
        actions = stage_actions(schedule, s, p, m)
        at = {a: k for k, a in enumerate(actions)}
        assert all(at[("F", i)] < at[("B", i)] for i in range(m))
        assert [i for kind, i in actions if kind == "F"] == list(range(m))
        assert [i for kind, i in actions if kind == "B"] == list(range(m))


def test_gpipe_is_all_forwards_then_all_backwards():
    assert stage_actions("gpipe", 1, 3, 3) == [
        ("F", 0),
        ("F", 1),
        ("F", 2),
        ("B", 0),
        ("B", 1),
        ("B", 2),
    ]


def test_1f1b_exact_orders():
    # Four stages, six micro-batches: stage s warms up with 3 - s forwards.
    assert stage_actions("1f1b", 0, 4, 6) == [
        ("F", 0), ("F", 1), ("F", 2),
        ("F", 3), ("B", 0), ("F", 4), ("B", 1), ("F", 5), ("B", 2),
        ("B", 3), ("B", 4), ("B", 5),
    ]  # fmt: skip
    assert stage_actions("1f1b", 3, 4, 6) == [
        ("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2),
        ("F", 3), ("B", 3), ("F", 4), ("B", 4), ("F", 5), ("B", 5),
    ]  # fmt: skip


def test_1f1b_with_fewer_micro_batches_than_warmup_is_gpipe():
    assert stage_actions("1f1b", 0, 5, 2) == stage_actions("gpipe", 0, 5, 2)


def test_single_stage_1f1b_alternates():
    assert stage_actions("1f1b", 0, 1, 3) == [
        ("F", 0),
        ("B", 0),
        ("F", 1),
        ("B", 1),
        ("F", 2),
        ("B", 2),
    ]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_zero_micro_batches_is_empty(schedule):
    assert stage_actions(schedule, 0, 2, 0) == []


# Activation memory


@pytest.mark.parametrize("p, m", SIZES)
def test_gpipe_peak_in_flight_is_every_micro_batch(p, m):
    assert [peak_in_flight(stage_actions("gpipe", s, p, m)) for s in range(p)] == [m] * p


@pytest.mark.parametrize("p, m", SIZES)
def test_1f1b_peak_in_flight_is_stages_left_capped_by_micro_batches(p, m):
    peaks = [peak_in_flight(stage_actions("1f1b", s, p, m)) for s in range(p)]
    assert peaks == [min(p - s, m) for s in range(p)]


def test_peak_in_flight_counts_live_forwards():
    assert peak_in_flight([]) == 0
    assert peak_in_flight([("F", 0), ("B", 0), ("F", 1), ("B", 1)]) == 1
    assert peak_in_flight([("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("B", 2)]) == 2


def test_peak_in_flight_matches_the_planner():
    from orchestrator.stage_plan import in_flight

    for schedule in SCHEDULES:
        for p, m in SIZES:
            for s in range(p):
                actions = stage_actions(schedule, s, p, m)
                assert peak_in_flight(actions) == in_flight(schedule, s, p, m)


# Deadlock freedom across stages


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("p, m", SIZES)
def test_pipeline_completes_without_deadlock(schedule, p, m):
    order = simulate(pipeline(schedule, p, m))
    assert len(order) == 2 * p * m


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("p, m", [(1, 3), (2, 4), (3, 4), (4, 8), (5, 2)])
def test_simulated_time_is_the_ideal_pipeline(schedule, p, m):
    # With unit-time actions either schedule takes 2 * (m + p - 1) steps: each stage is busy
    # 2 * m of them, idle the share bubble_formula(p, m).
    _, steps = simulate(pipeline(schedule, p, m), with_steps=True)
    assert steps == 2 * (m + p - 1)
    assert 1 - 2 * m / steps == pytest.approx(bubble_formula(p, m))


def test_simulator_detects_backward_before_the_needed_forward():
    lists = pipeline("1f1b", 3, 4)
    lists[2] = [("B", 0), ("F", 0)] + [a for a in lists[2] if a not in (("F", 0), ("B", 0))]
    with pytest.raises(AssertionError, match="deadlock"):
        simulate(lists)


def test_simulator_detects_mismatched_neighbour_orders():
    # Stage 1 receives F(1) before F(0), but stage 0 sends F(1) only after B(0), which
    # stage 1 computes only after F(1): a cycle, though each list is valid on its own.
    lists = [
        [("F", 0), ("B", 0), ("F", 1), ("B", 1)],
        [("F", 1), ("F", 0), ("B", 0), ("B", 1)],
    ]
    with pytest.raises(AssertionError, match="deadlock"):
        simulate(lists)


def test_simulator_detects_a_first_stage_backward_before_its_forward():
    lists = pipeline("gpipe", 2, 2)
    lists[0] = [("B", 0), ("F", 0), ("F", 1), ("B", 1)]
    with pytest.raises(AssertionError, match="deadlock"):
        simulate(lists)


def test_simulator_detects_1f1b_without_warmup_on_the_first_stage():
    # Stage 0 alternating from the start waits for B(0) before sending F(1), while stage 1
    # (one warmup forward) needs F(1) before it runs B(0).
    lists = pipeline("1f1b", 3, 4)
    lists[0] = stage_actions("1f1b", 2, 3, 4)
    with pytest.raises(AssertionError, match="deadlock"):
        simulate(lists)


def test_simulator_rejects_a_repeated_action():
    lists = [[("F", 0), ("F", 0), ("B", 0)]]
    with pytest.raises(AssertionError, match="twice"):
        simulate(lists)


# Bubble and argument checks


@pytest.mark.parametrize(
    "p, m, expected",
    [(1, 1, 0.0), (1, 8, 0.0), (2, 1, 0.5), (4, 8, 3 / 11), (4, 4, 3 / 7), (8, 32, 7 / 39)],
)
def test_bubble_formula(p, m, expected):
    assert bubble_formula(p, m) == pytest.approx(expected)


def test_bubble_shrinks_with_more_micro_batches():
    values = [bubble_formula(4, m) for m in range(1, 20)]
    assert values == sorted(values, reverse=True)


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match="strategy.schedule"):
        stage_actions("interleaved", 0, 2, 4)


@pytest.mark.parametrize("stage, stages", [(-1, 2), (2, 2), (0, 0)])
def test_stage_out_of_range_is_rejected(stage, stages):
    with pytest.raises(ValueError, match=f"stage {stage}"):
        stage_actions("gpipe", stage, stages, 4)
