"""The pure recovery planner: newest step at which the whole state can be assembled."""

from __future__ import annotations

from orchestrator.recovery import Holding, plan_recovery

BOUNDS = [(0, 10), (10, 20), (20, 30)]


def own(rank: int, done: int) -> Holding:
    lo, hi = BOUNDS[rank]
    return Holding(rank, rank, done, "own", lo, hi)


def replica(holder: int, done: int) -> Holding:
    owner = (holder - 1) % 3
    lo, hi = BOUNDS[owner]
    return Holding(holder, owner, done, "replica", lo, hi)


def test_dead_rank_rebuilt_from_its_buddy():
    # Rank 1 died; rank 2 is its buddy and holds its shard.
    holdings = [own(0, 5), own(2, 5), replica(2, 5), replica(0, 5)]
    plan = plan_recovery(BOUNDS, holdings)
    assert plan.done == 5
    assert [(p.owner, p.holder, p.kind) for p in plan.pieces] == [
        (0, 0, "own"),
        (1, 2, "replica"),
        (2, 2, "own"),
    ]
    assert plan.from_replicas == [1]


def test_goes_back_a_step_when_the_newest_replica_is_incomplete():
    # The exchange after step 6 failed on rank 2 (rank 1 died mid-transfer):
    # step 6 is not complete everywhere, step 5 is.
    holdings = [own(0, 6), own(0, 5), own(2, 6), own(2, 5), replica(2, 5), replica(0, 6)]
    assert plan_recovery(BOUNDS, holdings).done == 5


def test_rank_and_buddy_both_lost_means_no_plan():
    # Ranks 1 and 2 died: rank 1's replica lived on rank 2.
    assert plan_recovery(BOUNDS, [own(0, 5), replica(0, 5)]) is None


def test_replicated_state_takes_the_newest_live_copy():
    full = [(0, 30)]
    holdings = [Holding(0, 0, 7, "live", 0, 30), Holding(2, 0, 8, "live", 0, 30)]
    plan = plan_recovery(full, holdings)
    assert plan.done == 8 and plan.pieces[0].holder == 2


def test_own_copy_preferred_over_replica():
    holdings = [own(0, 3), replica(1, 3), own(1, 3), own(2, 3), replica(2, 3), replica(0, 3)]
    plan = plan_recovery(BOUNDS, holdings)
    assert all(p.kind == "own" for p in plan.pieces)
