"""Nodes Ray is draining, and which workers must move off them.

Ray marks a node as draining before it goes away on purpose: autoscaler v2
removing an idle node, a cloud's spot-preemption notice turned into
``ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION``, or an operator's
drain. The node keeps running (until its deadline, if it has one), but Ray
places nothing new on it. For a training job that is the moment to move the
state of the workers there to the others, the way ``shoal scale`` down does,
instead of losing them with the node and recovering from replicas.

Ray exposes the draining set only through its internal state API (the one
Ray Data polls for the same purpose), so the read is guarded: on a Ray
without it, no node is ever seen draining and a removed node is survived as
a failure instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

# Ray answers from the GCS; once a second is plenty against deadlines of a
# minute or more (a spot notice gives two).
POLL_S = 1.0


class OnNode(Protocol):
    node_id: str | None


@dataclass(frozen=True)
class DrainDecision:
    """What to do about members on draining nodes at a step boundary."""

    leaving: list  # members to drain now (their state moves to the others first)
    postponed: list  # members left in place: too few workers would remain


def read_draining_nodes() -> dict[str, int]:
    """Node id (hex) -> drain deadline in ms since the epoch (0: none), as Ray reports it."""
    try:
        from ray._private.state import state

        return dict(state.get_draining_nodes())
    except Exception:  # noqa: BLE001 - an older or newer Ray without this API: nothing drains
        return {}


class DrainingNodes:
    """The draining set, read at most every ``poll_s`` seconds."""

    def __init__(
        self,
        poll_s: float = POLL_S,
        read: Callable[[], dict[str, int]] = read_draining_nodes,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._poll_s = poll_s
        self._read = read
        self._clock = clock
        self._last = float("-inf")
        self._nodes: dict[str, int] = {}

    def current(self) -> dict[str, int]:
        now = self._clock()
        if now - self._last >= self._poll_s:
            self._nodes = self._read()
            self._last = now
        return self._nodes


def on_draining_nodes(members: Sequence[OnNode], draining: dict[str, int]) -> list:
    """The members whose node is draining, in their order."""
    return [m for m in members if m.node_id is not None and m.node_id in draining]


def plan_drain(
    members: Sequence[OnNode], draining: dict[str, int], joining: int, minimum: int
) -> DrainDecision:
    """Which members on draining nodes leave now.

    Draining moves a worker's state to the others, so at least
    ``max(1, minimum)`` workers (those staying plus ``joining`` replacements
    ready to join at the same boundary) must remain. Otherwise the members
    stay where they are until replacements are ready; should the node go
    first, that is a failure, survived from replicas.
    """
    on_draining = on_draining_nodes(members, draining)
    if not on_draining:
        return DrainDecision(leaving=[], postponed=[])
    remaining = len(members) - len(on_draining) + joining
    if remaining >= max(1, minimum):
        return DrainDecision(leaving=on_draining, postponed=[])
    return DrainDecision(leaving=[], postponed=on_draining)
