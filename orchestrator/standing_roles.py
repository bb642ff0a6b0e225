"""Standing roles: members that stand beside the training role, each on its own.

A program's first role trains in epochs (``orchestrator/worker_group.py``).
Every further role — expert hosts, federated clients, a volunteer gateway —
is *standing*: its members join no process group, each holds a slot
(``rank``: 0..count-1) and is set up alone, and a member that dies is
replaced in its slot while training goes on. Whether its loss costs the
step in flight is the program's business (an expert answer that never comes,
a client result past the round's deadline); the membership is kept here.

``StandingRoles`` starts these groups with the job, checks them at step
boundaries (no waiting: ``WorkerGroup.lost_members``), replaces the dead,
and stops them with the job. A role whose members keep dying fails the job
past ``elastic.max_failures``, as the training role does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from orchestrator.events import EventLog
from orchestrator.policies import give_up_reason
from orchestrator.worker_group import Member, WorkerGroup

# How often the step loop looks for dead standing members (each look sends
# one tiny call to each member whose previous one has been answered).
CHECK_EVERY_S = 1.0
# How long the job's end waits for standing members' ``shutdown`` before killing them.
SHUTDOWN_S = 5.0


class StandingRoles:
    """The groups of a job's standing roles (none for a single-role program)."""

    def __init__(self, groups: list[WorkerGroup], events: EventLog, max_failures: int):
        self.groups = groups
        self._events = events
        self._max_failures = max_failures
        self._checked = 0.0

    def spawn(self) -> None:
        """Ask Ray for every role's members; they are seated by ``seat_all``."""
        for g in self.groups:
            g.spawn(g.role.count)

    def seat_all(self, timeout: float, on_wait: Callable[[], None]) -> None:
        """Wait until every role has its minimum of members set up, then return.

        Members placed later (up to the role's count) are seated by ``tend``.
        """
        for g in self.groups:
            deadline = time.monotonic() + timeout
            have: list[Member] = g.admit_ready()
            while len(g.members) < g.role.minimum:
                need = g.role.minimum - len(g.members)
                left = max(0.0, deadline - time.monotonic())
                have = g.wait_for_members(have, need, left, on_wait)
                self._seat(g, have)
                have = []

    def tend(self, force: bool = False) -> bool:
        """Replace dead members and seat placed ones; returns whether membership changed.

        At most every ``CHECK_EVERY_S`` unless ``force``.
        """
        now = time.monotonic()
        if not self.groups or (not force and now - self._checked < CHECK_EVERY_S):
            return False
        self._checked = now
        changed = False
        for g in self.groups:
            lost = g.lost_members()
            for m in lost:
                self._events.emit(
                    "died", role=m.role, worker_id=m.worker_id, rank=m.rank, pid=m.pid
                )
            if lost:
                g.failures += len(lost)
                give_up = give_up_reason(g.failures, self._max_failures, "process died")
                if give_up:
                    raise RuntimeError(f"{g.role.name} members: {give_up}")
            missing = g.role.count - len(g.members) - len(g.pending)
            if missing > 0:
                g.spawn(missing)
            seated = self._seat(g, g.admit_ready())
            changed = changed or bool(lost or seated)
        return changed

    def _seat(self, g: WorkerGroup, members: list[Member]) -> list[Member]:
        seated = g.seat(members) if members else []
        for m in seated:
            self._events.emit("joined", role=m.role, worker_id=m.worker_id, rank=m.rank, pid=m.pid)
        return seated

    def state_holders(self) -> list[Member] | None:
        """Members of the roles that save state (``RoleSpec.saves_state``), by role and slot.

        None while such a role has an empty slot: its range of state has no
        holder, so no checkpoint could be complete.
        """
        holders: list[Member] = []
        for g in self.groups:
            if g.role.saves_state:
                if len(g.members) < g.role.count:
                    return None
                holders += g.members
        return holders

    def call_items(self, items: list[tuple[str, int, Any]]) -> None:
        """Send each ``(role, slot, WorkItem)`` to that member, without waiting for it."""
        for role, slot, item in items:
            for g in self.groups:
                if g.role.name != role:
                    continue
                for m in g.members:
                    if m.rank == slot:
                        getattr(m.handle, item.method).remote(*item.args)

    def describe(self) -> list[dict[str, Any]]:
        """Status rows of every standing member, role by role."""
        return [row for g in self.groups for row in g.describe()]

    def kill_all(self) -> None:
        """Let every member say goodbye (a gateway tells its volunteers the job is over),
        for up to ``SHUTDOWN_S``, then kill them all."""
        for g in self.groups:
            g.kill_all(goodbye_s=SHUTDOWN_S)
