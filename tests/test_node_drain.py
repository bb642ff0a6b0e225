"""Planning drains off nodes Ray is draining (pure: no Ray)."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.node_drain import DrainingNodes, on_draining_nodes, plan_drain


@dataclass(eq=False)
class _M:
    node_id: str | None


def test_members_on_draining_nodes_keep_their_order():
    a, b, c, unplaced = _M("n1"), _M("n2"), _M("n1"), _M(None)
    assert on_draining_nodes([a, b, c, unplaced], {"n1": 0}) == [a, c]
    assert on_draining_nodes([a, b], {}) == []


def test_drain_goes_ahead_when_enough_workers_remain():
    a, b, c = _M("n1"), _M("n2"), _M("n3")
    decision = plan_drain([a, b, c], {"n2": 123}, joining=0, minimum=2)
    assert decision.leaving == [b] and decision.postponed == []


def test_drain_waits_for_replacements_below_the_minimum():
    a, b, c = _M("n1"), _M("n2"), _M("n2")
    decision = plan_drain([a, b, c], {"n2": 0}, joining=0, minimum=2)
    assert decision.leaving == [] and decision.postponed == [b, c]
    # One replacement ready to join at the same boundary is enough.
    decision = plan_drain([a, b, c], {"n2": 0}, joining=1, minimum=2)
    assert decision.leaving == [b, c]


def test_a_lone_worker_never_drains_into_nothing():
    only = _M("n1")
    assert plan_drain([only], {"n1": 0}, joining=0, minimum=0).postponed == [only]
    assert plan_drain([only], {"n1": 0}, joining=1, minimum=0).leaving == [only]


def test_draining_set_is_read_at_most_once_per_poll_interval():
    reads, now = [], [0.0]

    def read():
        reads.append(now[0])
        return {"n1": len(reads)}

    nodes = DrainingNodes(poll_s=1.0, read=read, clock=lambda: now[0])
    assert nodes.current() == {"n1": 1}
    now[0] = 0.5
    assert nodes.current() == {"n1": 1}  # cached
    now[0] = 1.2
    assert nodes.current() == {"n1": 2}
    assert reads == [0.0, 1.2]
