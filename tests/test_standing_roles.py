"""Standing roles on a real Ray: members seated in slots, a SIGKILLed one replaced in its slot.

The controller's side (training goes on, events, give-up) is in
``tests/test_controller.py`` without Ray; here the Ray parts of
``WorkerGroup`` (``seat``, ``lost_members``) and ``StandingRoles`` run for real.
"""

from __future__ import annotations

import os
import signal
import time

import ray

from orchestrator.events import EventLog
from orchestrator.program import RoleSpec
from orchestrator.programs.data_parallel import DataParallelProgram
from orchestrator.spec import JobSpec
from orchestrator.standing_roles import StandingRoles
from orchestrator.worker_group import WorkerGroup

CLIENTS = RoleSpec("client", "tests.slot_runtime:SlotRuntime", count=2, cpus=0.1, gpus=0)


class WithClients(DataParallelProgram):
    def roles(self) -> list[RoleSpec]:
        return [*super().roles(), CLIENTS]

    def role_setup_args(self, role: str, index: int) -> tuple:
        return (f"{role}/{index}",)


def test_a_killed_standing_member_is_replaced_in_its_slot(ray_session, tmp_path):
    spec = JobSpec.from_overrides([f"run_dir={tmp_path}", "elastic.max_failures=3"])
    events = EventLog(tmp_path / "events.jsonl")
    group = WorkerGroup(spec, WithClients(spec), CLIENTS, ray.put(None), 0, events, standing=True)
    roles = StandingRoles([group], events, spec.elastic.max_failures)
    try:
        roles.spawn()
        roles.seat_all(60.0, on_wait=lambda: None)
        rows = roles.describe()
        assert [(r["role"], r["rank"], r["label"]) for r in rows] == [
            ("client", 0, "client/0"),
            ("client", 1, "client/1"),
        ]
        assert roles.tend(force=True) is False  # all alive: nothing changes
        os.kill(rows[0]["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            roles.tend(force=True)
            now = {r["rank"]: r for r in roles.describe()}
            if 0 in now and now[0]["pid"] != rows[0]["pid"]:
                break
            time.sleep(0.1)
        now = {r["rank"]: r for r in roles.describe()}
        assert sorted(now) == [0, 1]
        assert now[0]["label"] == "client/0" and now[0]["worker_id"] == 2
        assert now[1]["pid"] == rows[1]["pid"]  # the other member was left alone
        died = [e for e in events.all() if e["event"] == "died"]
        assert [(e["role"], e["rank"], e["pid"]) for e in died] == [("client", 0, rows[0]["pid"])]
    finally:
        roles.kill_all()
