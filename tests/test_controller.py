"""The controller's transitions, driven with an in-process member group: no Ray.

Each test scripts what happens to the members (``tests/inprocess_group.py``)
and checks what the controller decided: its states, its events, the steps it
ran and redid, the checkpoints it committed. The numerics of training are
the multi-actor tests' business (``tests/test_jobs.py``, ``test_elastic.py``).
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from actors.data import BYTE_FACTS
from orchestrator import standing_roles
from orchestrator.controller import JobController
from orchestrator.node_drain import DrainingNodes
from orchestrator.program import RoleSpec
from orchestrator.programs.data_parallel import DataParallelProgram
from orchestrator.report import summary
from orchestrator.spec import JobSpec
from orchestrator.status import JobState
from storage.checkpoint import committed_steps, read_manifest
from storage.object_store import open_store
from tests.inprocess_group import InProcessGroup

TINY = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.seq_len=16"]


class Recorder:
    """Builds the controller's group and keeps it, and every state the controller set."""

    def __init__(self, **group_options):
        self.group: InProcessGroup | None = None  # the training role's
        self.standing: list[InProcessGroup] = []  # standing roles', in the program's order
        self.states: list[JobState] = []
        self._options = group_options

    def factory(self, *args, standing: bool = False):
        group = InProcessGroup(*args, standing, **self._options)
        if standing:
            self.standing.append(group)
        else:
            self.group = group
        return group


def _controller(
    tmp_path, *overrides: str, recorder: Recorder | None = None, name="run", program=None
):
    spec = JobSpec.from_overrides(
        [*TINY, f"run_dir={tmp_path / name}", "train.sample_tokens=4", *overrides]
    )
    recorder = recorder or Recorder()
    controller = JobController(
        spec,
        [None],
        BYTE_FACTS,
        group_factory=recorder.factory,
        program=program and program(spec),
    )
    controller._draining = DrainingNodes(poll_s=0.0, read=dict)
    real_set = controller._set

    def recording_set(**fields):
        if "state" in fields and (not recorder.states or recorder.states[-1] != fields["state"]):
            recorder.states.append(fields["state"])
        real_set(**fields)

    controller._set = recording_set
    return spec, controller, recorder


def _events(controller) -> list[str]:
    return [e["event"] for e in controller.events()]


def _at_step(recorder: Recorder, step: int, action) -> None:
    """Run ``action(group)`` once, just before step ``step`` is sent to the members."""
    done = []

    def hook(s: int) -> None:
        if s == step and not done:
            done.append(s)
            action(recorder.group)

    recorder.group.before_step.append(hook)


def _run_with(controller, recorder: Recorder, setup) -> object:
    """Start ``controller.run()`` with ``setup(recorder)`` applied once its group exists."""
    original = recorder.factory

    def factory(*args, **kwargs):
        group = original(*args, **kwargs)
        if not kwargs.get("standing"):
            setup(recorder)
        return group

    controller._group_factory = factory
    return controller.run()


def test_start_to_success(tmp_path):
    spec, controller, rec = _controller(tmp_path, "train.steps=6", "checkpoint.every=3")
    final = controller.run()
    assert final.state == JobState.SUCCEEDED, final.error
    assert rec.states == [JobState.STARTING, JobState.RUNNING, JobState.SUCCEEDED]
    assert final.step == 6 and final.epoch == 1 and final.sample == "def xxxx"
    lines = (spec.run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(6))
    store = open_store(spec.checkpoint.uri)
    assert committed_steps(store) == [3, 6]
    assert read_manifest(store, 6).lineage == spec.job_id
    assert final.last_checkpoint.endswith("step-00000006")
    assert [w["role"] for w in final.workers] == ["worker", "worker"]
    assert sorted(rec.group.removed) == [0, 1]  # every member stopped at the end


def test_failure_recovers_from_buddies_with_no_step_lost(tmp_path):
    spec, controller, rec = _controller(tmp_path, "strategy=zero2", "train.steps=8")

    def lose_rank_1(group):
        group.members[1].lost = True

    final = _run_with(controller, rec, lambda r: _at_step(r, 4, lose_rank_1))
    assert final.state == JobState.SUCCEEDED, final.error
    assert JobState.RECOVERING in rec.states
    events = _events(controller)
    assert events.count("died") == 1 and "restored-from-buddy" in events
    assert "restored-from-checkpoint" not in events
    restored = next(e for e in controller.events() if e["event"] == "restored-from-buddy")
    assert list(restored["phases_s"]) == [
        "holdings",
        "export",
        "leave",
        "committer",
        "members",
        "epoch",
        "restore",
    ]  # where the recovery's time went
    assert final.failures_survived == 1 and final.steps_redone == 0 and final.epoch == 2
    joined = [e["worker_id"] for e in controller.events() if e["event"] == "joined"]
    assert joined == [0, 1, 2]  # a replacement for the lost member
    steps = [
        json.loads(x)["step"] for x in (spec.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(8))


def test_a_spare_replaces_a_lost_member_and_a_new_spare_is_started(tmp_path):
    spec, controller, rec = _controller(
        tmp_path, "strategy=zero2", "train.steps=8", "elastic.spares=1"
    )
    seen = {}

    def lose_rank_1(group):
        seen["spare"] = [m.worker_id for m, _ in group.pending]
        group.members[1].lost = True

    def note_spare(group):
        seen["after"] = [m.worker_id for m, _ in group.pending]
        seen["status"] = [row["worker_id"] for row in controller.status().spares]

    def setup(r):
        _at_step(r, 4, lose_rank_1)
        _at_step(r, 6, note_spare)

    final = _run_with(controller, rec, setup)
    assert final.state == JobState.SUCCEEDED, final.error
    assert seen["spare"] == [2]  # workers 0 and 1 train, worker 2 stands by
    joined = [e["worker_id"] for e in controller.events() if e["event"] == "joined"]
    assert joined == [0, 1, 2]  # the spare took the lost member's place
    assert seen["after"] == [3]  # and a new spare stands by
    assert seen["status"] == [3]  # shown in the status
    assert final.spares == []  # and gone with the job
    assert final.failures_survived == 1 and final.steps_redone == 0 and len(final.workers) == 2


def test_failure_without_copies_falls_back_to_the_checkpoint(tmp_path):
    rec = Recorder(holdings_cover=lambda: False)
    spec, controller, rec = _controller(
        tmp_path, "strategy=zero1", "train.steps=9", "checkpoint.every=3", recorder=rec
    )

    def lose_rank_0(group):
        group.members[0].lost = True

    final = _run_with(controller, rec, lambda r: _at_step(r, 5, lose_rank_0))
    assert final.state == JobState.SUCCEEDED, final.error
    events = _events(controller)
    assert "restored-from-checkpoint" in events and "restored-from-buddy" not in events
    # Step 5 failed; steps 3 and 4 ran after the checkpoint at 3 and are redone.
    assert final.steps_redone == 2 and final.failures_survived == 1
    steps = [
        json.loads(x)["step"] for x in (spec.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(9))  # redone steps replace their earlier records


def test_too_many_failures_fail_the_job(tmp_path):
    spec, controller, rec = _controller(tmp_path, "train.steps=8", "elastic.max_failures=0")

    def lose(group):
        group.members[0].lost = True

    final = _run_with(controller, rec, lambda r: _at_step(r, 2, lose))
    assert final.state == JobState.FAILED and "elastic.max_failures=0" in final.error


@pytest.mark.parametrize("target, epochs, event", [(3, 2, "joined"), (1, 2, "drained")])
def test_scale_up_and_down_at_a_step_boundary(tmp_path, target, epochs, event):
    spec, controller, rec = _controller(
        tmp_path, "train.steps=8", "cluster.min_workers=1", "cluster.max_workers=3"
    )
    final = _run_with(controller, rec, lambda r: _at_step(r, 3, lambda g: controller.scale(target)))
    assert final.state == JobState.SUCCEEDED, final.error
    assert len(final.workers) == target and final.epoch == epochs
    assert event in _events(controller) and final.steps_redone == 0
    records = [json.loads(x) for x in (spec.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records[-1]["batch"]) == target  # the batch is split among the new members


def test_a_draining_node_is_left_with_no_step_lost(tmp_path):
    spec, controller, rec = _controller(tmp_path, "strategy=zero3", "train.steps=8")
    draining: dict[str, int] = {}
    controller._draining = DrainingNodes(poll_s=0.0, read=lambda: dict(draining))

    def drain_rank_1_node(group):
        group.members[1].node_id = "node-b"
        draining["node-b"] = 0

    final = _run_with(controller, rec, lambda r: _at_step(r, 3, drain_rank_1_node))
    assert final.state == JobState.SUCCEEDED, final.error
    events = _events(controller)
    assert "node-draining" in events and "drained" in events and "joined" in events
    assert final.failures_survived == 0 and final.steps_redone == 0
    assert len(final.workers) == 2 and 1 in rec.group.removed


def test_resume_continues_the_lineage_from_the_last_checkpoint(tmp_path):
    first, controller, _ = _controller(tmp_path, "train.steps=4", "checkpoint.every=2")
    assert controller.run().state == JobState.SUCCEEDED
    spec, controller, rec = _controller(
        tmp_path, "train.steps=6", "checkpoint.every=2", "resume=latest"
    )
    final = controller.run()
    assert final.state == JobState.SUCCEEDED, final.error
    assert final.resumed_from.endswith("step-00000004")
    store = open_store(spec.checkpoint.uri)
    assert read_manifest(store, 6).lineage == first.job_id  # the resumed run's lineage
    steps = [
        json.loads(x)["step"] for x in (spec.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(6))


def test_cancel_stops_at_a_step_boundary_naming_the_last_checkpoint(tmp_path):
    spec, controller, rec = _controller(tmp_path, "train.steps=100", "checkpoint.every=2")
    final = _run_with(controller, rec, lambda r: _at_step(r, 5, lambda g: controller.cancel()))
    assert final.state == JobState.CANCELLED
    assert rec.states[-1] == JobState.CANCELLED
    assert final.last_checkpoint.endswith("step-00000004")
    assert 5 <= final.step <= 7


def test_a_fresh_run_refuses_a_root_with_another_runs_checkpoints(tmp_path):
    _, controller, _ = _controller(tmp_path, "train.steps=2", "checkpoint.every=1")
    assert controller.run().state == JobState.SUCCEEDED
    _, again, _ = _controller(tmp_path, "train.steps=2")
    final = again.run()
    assert final.state == JobState.FAILED and "checkpoint.overwrite=true" in final.error
    _, over, _ = _controller(tmp_path, "train.steps=2", "checkpoint.overwrite=true")
    assert over.run().state == JobState.SUCCEEDED


def test_step_records_carry_achieved_tflops_and_mfu_given_a_peak(tmp_path):
    spec, controller, _ = _controller(
        tmp_path, "train.steps=2", "cluster.peak_tflops_per_worker=0.5"
    )
    assert controller.run().state == JobState.SUCCEEDED
    record = controller.metrics()[-1]
    fpt = controller._flops_per_token
    assert fpt and record["tflops"] == pytest.approx(record["tokens_per_s"] * fpt / 1e12, rel=1e-4)
    assert record["mfu"] == pytest.approx(record["tflops"] / (0.5 * 2), rel=1e-4)


# -- standing roles --------------------------------------------------------------------


class WithExpertHosts(DataParallelProgram):
    """Data parallelism plus a standing role of two members, each set up for its slot."""

    def roles(self) -> list[RoleSpec]:
        hosts = RoleSpec("expert_host", "tests.unused:Runtime", count=2, cpus=1, gpus=0)
        return [*super().roles(), hosts]

    def role_setup_args(self, role: str, index: int) -> tuple:
        return (f"{role}-slot-{index}",)


@pytest.fixture
def check_every_boundary(monkeypatch):
    monkeypatch.setattr(standing_roles, "CHECK_EVERY_S", 0.0)


def test_a_standing_member_lost_is_replaced_in_its_slot_while_training_goes_on(
    tmp_path, check_every_boundary
):
    spec, controller, rec = _controller(tmp_path, "train.steps=8", program=WithExpertHosts)

    def lose_host_1(group):
        (hosts,) = rec.standing
        next(m for m in hosts.members if m.rank == 1).lost = True

    final = _run_with(controller, rec, lambda r: _at_step(r, 3, lose_host_1))
    assert final.state == JobState.SUCCEEDED, final.error
    # The training role never noticed: one epoch, nothing redone, no recovery.
    assert JobState.RECOVERING not in rec.states and final.epoch == 1
    assert final.steps_redone == 0 and final.failures_survived == 0
    died = [e for e in controller.events() if e["event"] == "died"]
    assert [(e["role"], e["rank"]) for e in died] == [("expert_host", 1)]
    hosts = [
        (e["worker_id"], e["rank"])
        for e in controller.events()
        if e["event"] == "joined" and e.get("role") == "expert_host"
    ]
    assert hosts == [(0, 0), (1, 1), (2, 1)]  # slots 0 and 1, then a new member in slot 1
    rows = final.workers
    assert [r["role"] for r in rows] == ["worker", "worker", "expert_host", "expert_host"]
    assert [r["setup"] for r in rows[2:]] == [("expert_host-slot-0",), ("expert_host-slot-1",)]
    assert sorted(rec.standing[0].removed) == [0, 2]  # stopped with the job (1 died)
    # While running, `shoal status` lists the standing members by slot.
    text = summary(dataclasses.replace(final, memory=[]), [])
    assert "slot 1      expert_host 2, pid 1002" in text and "rank 1      worker 1" in text


def test_standing_members_that_keep_dying_fail_the_job(tmp_path, check_every_boundary):
    spec, controller, rec = _controller(
        tmp_path, "train.steps=30", "elastic.max_failures=2", program=WithExpertHosts
    )

    def lose_every_host(step):
        for m in rec.standing[0].members:
            m.lost = True

    final = _run_with(controller, rec, lambda r: r.group.before_step.append(lose_every_host))
    assert final.state == JobState.FAILED
    assert "expert_host members" in final.error and "elastic.max_failures=2" in final.error
