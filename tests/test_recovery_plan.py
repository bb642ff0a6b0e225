"""The pure recovery planner: newest step at which the whole state can be assembled."""

from __future__ import annotations

from orchestrator.recovery import Holding, plan_recovery, plan_recovery_spaces

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


# -- several state spaces --------------------------------------------------------
# dp over ranks 0-2 (BOUNDS); "server" (4 elements) owned by rank 2 alone.
SERVER = {2: (0, 4)}


def server(holder: int, done: int, kind: str = "replica") -> Holding:
    return Holding(holder, 2, done, kind, 0, 4, space="server")


def test_each_space_planned_from_its_own_holdings_at_one_step():
    # Rank 2 died: its dp shard lives on as rank 0's replica, its server state on rank 1.
    holdings = [own(0, 6), own(1, 6), replica(0, 6), server(1, 6)]
    state = plan_recovery_spaces({"dp": BOUNDS, "server": SERVER}, holdings)
    plans = state.by_space
    assert set(plans) == {"dp", "server"} and {p.done for p in plans.values()} == {6}
    assert state.done == 6 and state.from_replicas == {"dp": [2], "server": [2]}
    assert plans["dp"].space == "dp" and plans["dp"].from_replicas == [2]
    assert [(p.owner, p.holder) for p in plans["dp"].pieces] == [(0, 0), (1, 1), (2, 0)]
    assert plans["server"].space == "server"
    assert [(p.owner, p.holder, p.lo, p.hi) for p in plans["server"].pieces] == [(2, 1, 0, 4)]


def test_spaces_go_back_together_to_the_newest_step_all_of_them_have():
    # dp is complete at steps 6 and 5, server only at 5: both recover at 5.
    holdings = [own(0, 6), own(1, 6), replica(0, 6), server(1, 5)]
    holdings += [own(0, 5), own(1, 5), replica(0, 5)]
    state = plan_recovery_spaces({"dp": BOUNDS, "server": SERVER}, holdings)
    assert state.done == 5 and {p.done for p in state.by_space.values()} == {5}
    # dp alone would still recover at 6: a space is complete on its own owner ranges.
    assert plan_recovery(BOUNDS, holdings).done == 6


def test_upto_prefers_the_newest_step_not_after_it():
    # Step 7 was applied everywhere but its result never reached the controller.
    holdings = [own(0, d) for d in (6, 7)] + [own(1, d) for d in (6, 7)]
    holdings += [replica(0, d) for d in (6, 7)] + [server(1, d) for d in (6, 7)]
    bounds = {"dp": BOUNDS, "server": SERVER}
    assert plan_recovery_spaces(bounds, holdings).done == 7
    assert plan_recovery_spaces(bounds, holdings, upto=6).done == 6
    # Nothing complete at or before 5: the newest complete step after it.
    assert plan_recovery_spaces(bounds, holdings, upto=5).done == 7


def test_a_copy_of_one_space_never_serves_another():
    # A server holding with rank 2's dp range [20, 30) is no copy of rank 2's dp shard.
    holdings = [own(0, 4), own(1, 4), Holding(1, 2, 4, "replica", 20, 30, space="server")]
    assert plan_recovery(BOUNDS, holdings) is None
    assert plan_recovery({2: (20, 30)}, holdings, space="server").done == 4
    # No server copy at all: the job falls back to a checkpoint although dp is complete.
    complete_dp = [own(0, 4), own(1, 4), replica(0, 4)]
    assert plan_recovery(BOUNDS, complete_dp).done == 4
    assert plan_recovery_spaces({"dp": BOUNDS, "server": SERVER}, complete_dp) is None
