"""The controller's policies and the data-parallel program's planning, without Ray."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from orchestrator.policies import (
    RecoverySource,
    checkpoint_due,
    decide_membership,
    decide_target,
    give_up_reason,
    membership_change_wanted,
    queue_limit,
    recovery_source,
)
from orchestrator.program import Capacity, program_for
from orchestrator.spec import JobSpec


def test_checkpoints_at_every_multiple_and_the_end_and_never_queued_past():
    assert [d for d in range(1, 26) if checkpoint_due(d, 10, 25)] == [10, 20, 25]
    assert [d for d in range(1, 26) if checkpoint_due(d, 0, 25)] == [25]
    assert [queue_limit(d, 10, 25) for d in (0, 9, 10, 19, 20, 24)] == [10, 10, 20, 20, 25, 25]
    assert queue_limit(3, 0, 25) == 25


def test_failures_give_up_past_the_limit_and_recover_from_memory_first():
    assert give_up_reason(3, 3, "killed") is None
    reason = give_up_reason(4, 3, "killed")
    assert "elastic.max_failures=3" in reason and "killed" in reason
    assert recovery_source(True) is RecoverySource.BUDDIES
    assert recovery_source(False) is RecoverySource.CHECKPOINT


@pytest.mark.parametrize(
    "requested, expected",
    [(3, (3, False)), (9, (4, True)), (0, (2, True)), (2, (2, False))],
)
def test_scale_target_is_clamped_and_says_so(requested, expected):
    decision = decide_target(requested, min_workers=2, max_workers=4)
    assert (decision.target, decision.clamped) == expected


def test_when_the_membership_changes():
    # members, target, requested target, ready joiners, draining members
    assert not membership_change_wanted(3, 3, None, 0, 0)
    assert membership_change_wanted(3, 3, 4, 0, 0)  # shoal scale asked for another size
    assert not membership_change_wanted(3, 3, 3, 0, 0)
    assert membership_change_wanted(4, 3, None, 0, 0)  # above the target
    assert membership_change_wanted(3, 3, None, 0, 1)  # a node drains
    assert membership_change_wanted(2, 3, None, 1, 0)  # a replacement is ready
    assert not membership_change_wanted(2, 3, None, 0, 0)  # none ready: train on


def test_scale_up_admits_joiners_up_to_the_target_and_kills_the_rest():
    d = decide_membership(["a", "b"], draining=[], joiners=["c", "d"], target=3, pending=0)
    assert d.staying == ("a", "b") and d.joining == ("c",) and d.surplus == ("d",)
    assert d.changed and d.spawn == 0 and not d.scaled_down


def test_scale_down_drains_from_the_end_of_the_rank_order():
    d = decide_membership(["a", "b", "c", "d"], draining=[], joiners=[], target=2, pending=0)
    assert d.staying == ("a", "b") and d.scaled_down == ("c", "d") and d.changed


def test_a_draining_member_leaves_and_a_replacement_takes_its_place():
    d = decide_membership(["a", "b", "c"], draining=["b"], joiners=["x"], target=3, pending=0)
    assert d.staying == ("a", "c") and d.joining == ("x",) and d.drained == ("b",)
    assert d.changed and d.spawn == 0
    # No joiner yet and one still being placed: nothing more to spawn.
    d = decide_membership(["a", "b"], draining=[], joiners=[], target=3, pending=1)
    assert not d.changed and d.spawn == 0
    d = decide_membership(["a", "b"], draining=[], joiners=[], target=3, pending=0)
    assert d.spawn == 1


def test_spares_stand_by_beyond_the_target_and_are_replaced_when_used():
    # Two placed joiners, room for one: the other stands by as the one spare.
    d = decide_membership(["a", "b"], [], ["c", "d", "e"], target=3, pending=0, spares=1)
    assert d.joining == ("c",) and d.standby == ("d",) and d.surplus == ("e",)
    assert d.spawn == 0
    # A full epoch whose spare joined elsewhere (a recovery): a new spare is asked for.
    d = decide_membership(["a", "b", "c"], [], [], target=3, pending=0, spares=1)
    assert not d.changed and d.spawn == 1
    d = decide_membership(["a", "b", "c"], [], [], target=3, pending=1, spares=1)
    assert d.spawn == 0
    # Scaled up by two with one spare and one being placed: the spare joins, one more is asked.
    d = decide_membership(["a", "b"], [], ["s"], target=4, pending=1, spares=1)
    assert d.joining == ("s",) and d.standby == () and d.spawn == 1


def _dp_program(*overrides: str):
    spec = JobSpec.from_overrides(
        ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.seq_len=16", *overrides]
    )
    return spec, program_for(spec)


def test_data_parallel_program_plans_shards_and_batches():
    spec, program = _dp_program("strategy=zero2", "cluster.workers=3", "train.global_batch=7")
    (role,) = program.roles()
    assert (
        role.name == "worker" and role.count == 3 and role.runtime.endswith(":DataParallelRuntime")
    )
    plan = program.plan([Capacity(1)] * 3, numel=100)
    assert plan.bounds == ((0, 34), (34, 67), (67, 100))
    assert program.state_spaces(plan, 100)[0].name == "dp"
    assert program.setup_args(plan, 1) == ([(0, 34), (34, 67), (67, 100)], 1)
    program.begin_epoch(plan)
    items = program.work_items(5, 0.1)
    assert [i.method for i in items] == ["train_step"] * 3
    assert [i.args[2:] for i in items] == [(0, 3), (3, 5), (5, 7)]  # 7 samples, uneven
    # By memory: a worker with twice the memory gets twice the shard.
    auto = _dp_program("strategy=zero2", "cluster.workers=2", "strategy.shard_weights=auto")[1]
    assert auto.plan([Capacity(2), Capacity(1)], numel=90).bounds == ((0, 60), (60, 90))


def test_data_parallel_program_reduces_results_into_one_record():
    spec, program = _dp_program("strategy=ddp", "cluster.workers=2", "train.global_batch=4")
    plan = program.plan([Capacity(1)] * 2, numel=50)
    assert plan.bounds is None and program.state_spaces(plan, 50)[0].bounds == ((0, 50),)
    program.begin_epoch(plan)

    def result(rank, loss_sum, n_tokens):
        return SimpleNamespace(
            rank=rank,
            loss_sum=loss_sum,
            n_units=n_tokens,
            n_samples=n_tokens // 16,
            n_tokens=n_tokens,
            grad_norm=1.5,
            compute_s=0.1,
            comm_wait_s=0.0,
            peak_rss=2**20,
        )

    record = program.reduce(3, 0.01, [result(0, 32.0, 32), result(1, 64.0, 32)], 0.5)
    assert record["loss"] == pytest.approx(96.0 / 64)
    assert record["batch"] == [2, 2] and record["tokens_per_s"] == pytest.approx(64 / 0.5)
    assert record["samples_per_s"] == pytest.approx(4 / 0.5)
    assert program.member_fields(record) == [{"batch_share": 2, "compute_s": 0.1}] * 2
    assert program.status_fields() == {"batch_shares": [2, 2]}
    assert program.member_row(plan, 1, 50)["shard"] == [0, 50]


def test_every_strategy_has_a_program():
    from orchestrator.schema import STRATEGIES

    needs = {"moe": ["model=gpt_moe"]}  # a strategy whose model must have experts
    for name in STRATEGIES:
        overrides = [f"strategy={name}", *needs.get(name, [])]
        assert program_for(JobSpec.from_overrides(overrides)) is not None


def test_job_states_move_only_along_the_state_machine():
    from orchestrator.policies import transition
    from orchestrator.status import JobState as S

    path = [S.STARTING, S.WAITING_FOR_WORKERS, S.STARTING, S.RUNNING, S.RECOVERING]
    path += [S.WAITING_FOR_WORKERS, S.RUNNING, S.SUCCEEDED]
    state = S.PENDING
    for new in path:
        state = transition(state, new)
    assert state is S.SUCCEEDED
    for bad_from, bad_to in [
        (S.SUCCEEDED, S.RUNNING),
        (S.PENDING, S.RUNNING),
        (S.FAILED, S.FAILED),
    ]:
        if bad_from is bad_to:
            assert transition(bad_from, bad_to) is bad_to  # staying put is not a move
            continue
        with pytest.raises(ValueError, match="cannot go from"):
            transition(bad_from, bad_to)


@pytest.mark.parametrize(
    "nodes",
    [
        ["a", "a", "b", "b"],
        ["a", "a", "a", "b", "b", "b"],
        ["a", "a", "b", "c"],
        ["a", "b", "a", "b", "a"],
        ["a", "a", "a", "a", "b", "b", "c", "c"],
    ],
)
def test_no_rank_has_its_buddy_on_its_own_node_when_the_nodes_allow(nodes):
    from orchestrator.policies import order_for_buddies

    order = order_for_buddies(nodes)
    assert sorted(order) == list(range(len(nodes)))
    ranked = [nodes[i] for i in order]
    # rank r's replica lives on rank r + 1 (cyclically)
    clashes = sum(ranked[r] == ranked[(r + 1) % len(ranked)] for r in range(len(ranked)))
    most = max(nodes.count(n) for n in set(nodes))
    assert clashes == max(0, 2 * most - len(nodes))  # zero unless one node holds most


def test_buddy_order_keeps_a_single_node_as_it_is():
    from orchestrator.policies import order_for_buddies

    assert order_for_buddies(["a", "a", "a"]) == [0, 1, 2]


def test_status_rows_report_the_host_memory_held_for_replicas():
    _, program = _dp_program("strategy=zero1", "cluster.workers=2", "train.optimizer=adamw")
    plan = program.plan([Capacity(2), Capacity(1)], numel=90)
    row = program.member_row(plan, 0, 90)
    per_element = 4 * 3  # fp32 parameter + two Adam moments
    # three own snapshots of its 45 elements, two buffers for rank 1's 45
    assert row["replica_bytes"] == (3 * 45 + 2 * 45) * per_element
    _, ddp = _dp_program("strategy=ddp", "cluster.workers=2")
    assert "replica_bytes" not in ddp.member_row(ddp.plan([Capacity(1)] * 2, 90), 0, 90)
