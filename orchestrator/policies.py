"""The controller's policies and state machine: pure functions from an observation to a decision.

The controller (``orchestrator/controller.py``) observes (members, joiners,
draining nodes, failures, the step) and carries decisions out; what to do is
decided here, without Ray, so every rule is unit-tested on its own
(``tests/test_policies.py``). Members are identified by any hashable id.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from enum import Enum

from orchestrator.status import JobState

# -- checkpoints ----------------------------------------------------------------


def checkpoint_due(done: int, every: int, total: int) -> bool:
    """Whether a checkpoint is taken once ``done`` steps are complete (always at the end)."""
    return done == total or (every > 0 and done % every == 0)


def eval_due(done: int, every: int, total: int) -> bool:
    """Whether the model is evaluated once ``done`` steps are complete (``every`` 0: never)."""
    return every > 0 and (done % every == 0 or done == total)


def queue_limit(done: int, every: int, total: int) -> int:
    """Steps may be queued up to (not including) this one: never past the next boundary
    of period ``every`` (a checkpoint, an evaluation).

    A checkpoint or an evaluation must see a quiescent, fully committed step.
    """
    if every == 0:
        return total
    return min(total, (done // every + 1) * every)


# -- failures -------------------------------------------------------------------


def give_up_reason(failures: int, max_failures: int, last_reason: str) -> str | None:
    """Why the job stops recovering after ``failures`` lost members in all (None: go on).

    A crash loop is not elasticity: past ``elastic.max_failures`` the job fails.
    """
    if failures > max_failures:
        return (
            f"{failures} workers lost, more than elastic.max_failures={max_failures}; "
            f"the last: {last_reason}"
        )
    return None


class RecoverySource(str, Enum):
    BUDDIES = "buddies"  # the survivors' copies (own state, snapshots, replicas) cover a step
    CHECKPOINT = "checkpoint"  # some shard and its replica are both gone


def recovery_source(copies_exported: bool) -> RecoverySource:
    """Where a new epoch's state comes from: memory when it is complete there, else storage."""
    return RecoverySource.BUDDIES if copies_exported else RecoverySource.CHECKPOINT


# -- scaling and drains -----------------------------------------------------------


@dataclass(frozen=True)
class ScaleDecision:
    target: int
    clamped: bool  # the request was outside [min_workers, max_workers]


def decide_target(requested: int, min_workers: int, max_workers: int) -> ScaleDecision:
    """``shoal scale``: the target actually set for a request."""
    target = max(min_workers, min(max_workers, int(requested)))
    return ScaleDecision(target, target != requested)


def membership_change_wanted(
    members: int, target: int, requested_target: int | None, ready_joiners: int, draining: int
) -> bool:
    """Whether the next step boundary should change the membership.

    ``draining``: members that would leave now because their node drains.
    """
    if requested_target is not None and requested_target != target:
        return True
    if members > target or draining > 0:
        return True
    return members < target and ready_joiners > 0


@dataclass(frozen=True)
class MembershipDecision:
    """Who is in the next epoch, who leaves (their state moved off first), who is sent away."""

    staying: tuple[Hashable, ...]  # members that stay, in rank order
    joining: tuple[Hashable, ...]  # placed joiners admitted now
    drained: tuple[Hashable, ...]  # members leaving a draining node
    scaled_down: tuple[Hashable, ...]  # members above the target
    surplus: tuple[Hashable, ...]  # placed joiners beyond the target and the spares: killed
    standby: tuple[Hashable, ...]  # placed joiners kept idle as spares (elastic.spares)
    spawn: int  # new members to ask Ray for

    @property
    def changed(self) -> bool:
        """Whether the decision ends the epoch (someone joins or leaves)."""
        return bool(self.joining or self.drained or self.scaled_down)


def decide_membership(
    members: Sequence[Hashable],
    draining: Sequence[Hashable],
    joiners: Sequence[Hashable],
    target: int,
    pending: int,
    spares: int = 0,
) -> MembershipDecision:
    """At a quiescent step boundary: the next epoch's membership.

    ``draining``: members leaving because their node drains (already decided
    by ``node_drain.plan_drain``); ``joiners``: placed, admitted members;
    ``pending``: members still being placed (spares included). Members above
    ``target`` leave from the end of the rank order; joiners fill the room up
    to it, and up to ``spares`` more stand by.
    """
    staying = [m for m in members if m not in draining]
    scaled_down = staying[target:]
    staying = staying[:target]
    room = max(0, target - len(staying))
    joining = list(joiners[:room])
    standby, surplus = list(joiners[room : room + spares]), list(joiners[room + spares :])
    spawn = max(0, target + spares - len(staying) - len(joining) - len(standby) - pending)
    return MembershipDecision(
        staying=tuple(staying),
        joining=tuple(joining),
        drained=tuple(m for m in members if m in draining),
        scaled_down=tuple(scaled_down),
        surplus=tuple(surplus),
        standby=tuple(standby),
        spawn=spawn,
    )


# -- job states -------------------------------------------------------------------

_ENDS = {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}
# Which states may follow which; the finished states are final.
TRANSITIONS: dict[JobState, set[JobState]] = {
    JobState.PENDING: {JobState.STARTING, JobState.FAILED, JobState.CANCELLED},
    JobState.STARTING: {JobState.WAITING_FOR_WORKERS, JobState.RUNNING} | _ENDS,
    JobState.WAITING_FOR_WORKERS: {JobState.STARTING, JobState.RUNNING} | _ENDS,
    JobState.RUNNING: {JobState.RECOVERING, JobState.WAITING_FOR_WORKERS} | _ENDS,
    JobState.RECOVERING: {JobState.WAITING_FOR_WORKERS, JobState.RUNNING} | _ENDS,
    JobState.SUCCEEDED: set(),
    JobState.FAILED: set(),
    JobState.CANCELLED: set(),
}


def transition(current: JobState, new: JobState) -> JobState:
    """The job's next state; ``ValueError`` for a move the state machine does not have."""
    if new is current or new in TRANSITIONS[current]:
        return new
    raise ValueError(f"job state cannot go from {current.value} to {new.value}")


# -- rank order -----------------------------------------------------------------------


def order_for_buddies(node_ids: Sequence[Hashable]) -> list[int]:
    """A rank order (indices into ``node_ids``) in which neighbours sit on different nodes.

    Rank ``r``'s shard is replicated on rank ``r + 1`` (cyclically), so
    whenever the nodes allow it no rank's buddy is on its own node, and
    losing a node never loses a shard together with its replica. Greedy:
    each next rank comes from the node with the most members left that is
    not the previous rank's (nor, for the last, the first rank's). Members
    keep their relative order within a node.
    """
    by_node: dict[Hashable, list[int]] = {}
    for i, node in enumerate(node_ids):
        by_node.setdefault(node, []).append(i)
    order: list[int] = []
    while len(order) < len(node_ids):
        prev = node_ids[order[-1]] if order else None
        first = node_ids[order[0]] if order else None
        last_one = len(order) == len(node_ids) - 1
        candidates = [n for n, left in by_node.items() if left and n != prev]
        if last_one:
            candidates = [n for n in candidates if n != first] or candidates
        if not candidates:  # only the previous rank's node has members left
            candidates = [n for n, left in by_node.items() if left]
        node = max(candidates, key=lambda n: len(by_node[n]))
        order.append(by_node[node].pop(0))
    return order
