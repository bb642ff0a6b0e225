"""The pipeline program's planning and bookkeeping, without Ray: layouts of ranks, plans from
measured layer costs, re-cutting stages when measured speeds drift, config checks."""

from __future__ import annotations

import pytest

from actors.stage_runtime import StageStepResult
from orchestrator import JobSpec
from orchestrator.program import Capacity
from orchestrator.programs.pipeline import PipelineProgram, stages_for
from orchestrator.spec import ConfigError

LAYERS = 8
BIG = 1 << 40


def _profile(scale: float = 1.0) -> list[dict]:
    """Eight equal layers of 1 ms, each owning 100 flat elements."""
    return [
        {
            "name": f"l{i}",
            "compute_s": 0.001 * scale,
            "state_bytes": 1600,
            "activation_bytes": 10,
            "flat": [100 * i, 100 * (i + 1)],
        }
        for i in range(LAYERS)
    ]


def _program(*overrides: str) -> PipelineProgram:
    spec = JobSpec.from_overrides(["strategy=pipeline", "train.micro_batches=4", *overrides])
    return PipelineProgram(spec)


def _caps(*scales: float) -> list[Capacity]:
    return [Capacity(BIG, None, _profile(s), worker_id=10 + i) for i, s in enumerate(scales)]


def _results(plan, busy_per_rank: list[float], step: int = 0) -> list[StageStepResult]:
    return [
        StageStepResult(
            step=step,
            rank=r,
            stage=plan.stage_of(r),
            loss_sum=1.0 if plan.stage_of(r) == plan.stages - 1 else 0.0,
            n_units=8 if plan.stage_of(r) == plan.stages - 1 else 0,
            n_samples=8,
            n_tokens=0,
            grad_norm=1.0,
            compute_s=busy,
            comm_wait_s=0.0,
            span_s=max(busy_per_rank) * 1.2,
            step_s=max(busy_per_rank) * 1.3,
            peak_activation_bytes=100,
            peak_rss=1 << 20,
        )
        for r, busy in enumerate(busy_per_rank)
    ]


def test_stages_for_divides_the_members():
    assert stages_for(4, 2) == 2
    assert stages_for(3, 2) == 1  # 3 workers cannot form 2-stage replicas
    assert stages_for(6, 4) == 3
    assert stages_for(1, 4) == 1


def test_ranks_are_replica_major_with_matching_subgroups():
    program = _program("strategy.stages=2", "cluster.workers=4")
    plan = program.plan(_caps(1, 1, 1, 1), LAYERS * 100)
    assert (plan.stages, plan.replicas) == (2, 2)
    assert [plan.stage_of(r) for r in range(4)] == [0, 1, 0, 1]
    assert program.subgroups(plan) == {"pp": [[0, 1], [2, 3]], "dp": [[0, 2], [1, 3]]}
    # Each stage's flat range is split between its two replicas; together they tile it.
    assert plan.stage_ranges == ((0, 400), (400, 800))
    assert plan.pieces == ((0, 200), (400, 600), (200, 400), (600, 800))
    space = program.state_spaces(plan, 800)[0]
    assert space.name == "dp" and space.bounds == plan.pieces


def test_slower_worker_gets_fewer_layers():
    program = _program("strategy.stages=2", "cluster.workers=2")
    plan = program.plan(_caps(1, 3), LAYERS * 100)
    assert plan.layer_bounds == ((0, 6), (6, 8))


def test_work_items_give_each_replica_its_rows():
    program = _program("strategy.stages=2", "cluster.workers=4", "train.global_batch=10")
    plan = program.plan(_caps(1, 1, 1, 1), LAYERS * 100)
    program.begin_epoch(plan)
    items = program.work_items(7, 0.1)
    assert [i.args for i in items] == [
        (7, 0.1, 0, 5),
        (7, 0.1, 0, 5),
        (7, 0.1, 5, 10),
        (7, 0.1, 5, 10),
    ]


def test_record_has_bubble_and_per_stage_busy_time():
    program = _program("strategy.stages=2", "cluster.workers=2")
    plan = program.plan(_caps(1, 1), LAYERS * 100)
    program.begin_epoch(plan)
    record = program.reduce(0, 0.1, _results(plan, [0.010, 0.020]), 0.03)
    assert record["loss"] == pytest.approx(1 / 8)
    assert record["stage_busy_s"] == [0.01, 0.02]
    # 1 - (0.01 + 0.02) / (2 * 0.024)
    assert record["bubble"] == pytest.approx(0.375, abs=1e-4)
    assert record["bubble_formula"] == pytest.approx(1 / 5)
    status = program.status_fields()["program"]
    assert status["partition"] == [["l0", "l1", "l2", "l3"], ["l4", "l5", "l6", "l7"]]
    assert any("bubble" in line for line in status["summary"])


def test_a_worker_that_slows_down_gets_layers_taken_away():
    program = _program("strategy.stages=2", "cluster.workers=2", "strategy.rebalance_every=5")
    caps = _caps(1, 1)
    plan = program.plan(caps, LAYERS * 100)
    assert plan.layer_bounds == ((0, 4), (4, 8))
    program.begin_epoch(plan)
    # As profiled: 4 layers x 1 ms x 4 micro-batches = 16 ms per step; rank 1 takes 3x that.
    for step in range(5):
        program.observe(_results(plan, [0.016, 0.048], step))
        assert program.replan_wanted() == (step == 4)
    replan = program.plan(caps, LAYERS * 100)
    assert replan.layer_bounds == ((0, 6), (6, 8))
    program.begin_epoch(replan)
    assert not program.replan_wanted()
    # Now busy times match the corrected prediction: no further re-cut.
    for step in range(5):
        program.observe(_results(replan, [0.024, 0.024], step))
    assert not program.replan_wanted()


def test_noise_below_the_gain_threshold_does_not_re_cut():
    program = _program("strategy.stages=2", "cluster.workers=2", "strategy.rebalance_every=2")
    plan = program.plan(_caps(1, 1), LAYERS * 100)
    program.begin_epoch(plan)
    for step in range(2):
        program.observe(_results(plan, [0.016, 0.018], step))  # 12% slower: not worth a re-cut
    assert not program.replan_wanted()


def test_even_partition_never_re_cuts():
    program = _program(
        "strategy.stages=2",
        "cluster.workers=2",
        "strategy.partition=even",
        "strategy.rebalance_every=1",
    )
    plan = program.plan(_caps(1, 1), LAYERS * 100)
    program.begin_epoch(plan)
    program.observe(_results(plan, [0.016, 0.160]))
    assert not program.replan_wanted()


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["cluster.workers=3"], "cluster.workers"),
        (["cluster.workers=2", "cluster.max_workers=3"], "cluster.max_workers"),
        (["strategy.schedule=zb"], "strategy.schedule"),
        (["strategy.partition=fast"], "strategy.partition"),
        (["strategy.stages=0"], "strategy.stages"),
        (["strategy.rebalance_every=-1"], "strategy.rebalance_every"),
        (
            ["cluster.workers=4", "train.global_batch=8", "train.micro_batches=5"],
            "train.micro_batches",
        ),
    ],
)
def test_bad_pipeline_config_names_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        JobSpec.from_overrides(["strategy=pipeline", *overrides])


def test_fewer_workers_than_stages_may_still_be_the_minimum():
    spec = JobSpec.from_overrides(
        ["strategy=pipeline", "cluster.workers=2", "cluster.min_workers=1"]
    )
    assert spec.cluster.min_workers == 1


def test_a_steady_slowdown_is_measured_once_not_compounded():
    # Rank 1 steadily 10% slower than profiled: no re-cut of 8 equal layers gains 15%.
    program = _program("strategy.stages=2", "cluster.workers=2", "strategy.rebalance_every=1")
    plan = program.plan(_caps(1, 1), LAYERS * 100)
    program.begin_epoch(plan)
    for step in range(10):
        program.observe(_results(plan, [0.016, 0.0176], step))
        assert not program.replan_wanted()
    assert program._slowdown[11] == pytest.approx(1.1)


def test_one_noisy_layer_on_one_worker_does_not_move_the_cut():
    # Equal workers; worker 1 measured layer l2 ten times too slow (interference while profiling).
    caps = _caps(1, 1)
    caps[1].profile[2]["compute_s"] *= 10
    plan = _program("strategy.stages=2", "cluster.workers=2").plan(caps, LAYERS * 100)
    assert plan.layer_bounds == ((0, 4), (4, 8))
