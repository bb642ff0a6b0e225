"""Volunteer replicas of expert hosts, in this process (no Ray, no gRPC).

- a volunteer's ``VolunteerExperts`` computes exactly what its host computes
  (outputs, input and parameter gradients) from the parameters the host
  hands out, refuses a call at a version it was not sent, and experts or
  slots it does not hold;
- a host's ``add_grads`` of a replica's gradients trains the experts as the
  host's own ``backward`` of the same tokens does, and ``discount`` takes a
  volunteer's contribution back before the step is applied;
- the relay's ``assign`` keeps a volunteer's slot, sends a newcomer where
  the tokens per entry are highest (the fewest replicas when nothing is
  measured yet), and offers only volunteers that host experts and are not
  resting;
- a trunk worker's ``ExpertClient`` shares a slot's experts between the host
  and its replicas in turn, skips a banned replica, and keeps routing to the
  host when every replica is banned.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from actors.expert_client import ExpertClient, HostEntry
from actors.expert_relay import REST_S, ExpertRelay, slot_for_replica
from actors.volunteer_work import MOE_BACKWARD, MOE_FORWARD, StaleReplica, VolunteerExperts
from tests.test_expert_host import DATA, D, _keep_torch_threads, base_spec, make_host, spec_at

__all__ = ["_keep_torch_threads", "base_spec"]  # pytest fixtures used here


def _tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def test_a_replica_computes_what_its_host_computes(base_spec, tmp_path):
    spec = spec_at(base_spec, tmp_path)
    host = make_host(spec, 1, 2)  # experts 2..3
    replica = VolunteerExperts(spec, facts=DATA.facts)
    version, params, per_expert = host.params_at(1, 0)
    x2, x3 = _tokens(5, 0), _tokens(3, 1)
    args = {"slot": 1, "hosts": 2, "layer": 1, "version": version}

    out, meta = replica(MOE_FORWARD, {"x2": x2, "x3": x3, "params": params}, args)
    truth, _ = host.forward(1, 0, 1, {2: x2, 3: x3})
    assert meta == {"version": version}
    assert torch.equal(out["y2"], truth[2]) and torch.equal(out["y3"], truth[3])

    dy = _tokens(5, 2)
    out, _ = replica(MOE_BACKWARD, {"x2": x2, "dy2": dy}, args)  # no params: it holds them
    ((dx, g),) = host.check_backward(1, 0, 1, {2: (x2, dy)}).values()
    assert out["g2"].shape == (per_expert,)
    assert torch.equal(out["dx2"], dx) and torch.equal(out["g2"], g)

    with pytest.raises(StaleReplica):
        replica(MOE_FORWARD, {"x2": x2}, {**args, "version": version + 1})
    with pytest.raises(ValueError, match="does not hold expert 0"):
        replica(MOE_FORWARD, {"x0": x2}, args)
    with pytest.raises(ValueError, match="no slot 2 of 2"):
        replica(MOE_FORWARD, {"x2": x2}, {**args, "slot": 2})
    with pytest.raises(ValueError, match="params: shape"):
        replica(MOE_FORWARD, {"x2": x2, "params": params[:-1]}, args)


def test_a_replicas_gradients_train_the_host_as_its_own_backward_does(base_spec, tmp_path):
    spec = spec_at(base_spec, tmp_path)
    own, relayed = make_host(spec, 0, 2), make_host(spec, 0, 2)
    replica = VolunteerExperts(spec, facts=DATA.facts)
    for step in range(3):
        x, dy = _tokens(6, 10 + step), _tokens(6, 20 + step)
        own.forward(1, step, 0, {1: x})
        own.backward(1, step, 0, {1: (x, dy)})
        version, params, _ = relayed.params_at(1, step)
        args = {"slot": 0, "hosts": 2, "layer": 0, "version": version}
        out, _ = replica(MOE_BACKWARD, {"x1": x, "dy1": dy, "params": params}, args)
        assert relayed.add_grads(1, step, 0, {1: out["g1"]}, "v1")
        # A liar's contribution to the same step, taken back before it is applied.
        assert relayed.add_grads(1, step, 0, {1: out["g1"] * -5}, "liar")
        assert relayed.discount("liar") == 1
    own.forward(1, 3, 0, {})  # the first call of step 3 applies step 2
    relayed.params_at(1, 3)
    assert own.applied == relayed.applied == 3
    torch.testing.assert_close(relayed.flat_param, own.flat_param, atol=1e-6, rtol=0)
    assert not relayed.add_grads(1, 2, 0, {1: out["g1"]}, "v1")  # step 2 is applied: stale


def _volunteer(vid: str, kinds=("federated client", "expert host")) -> SimpleNamespace:
    return SimpleNamespace(volunteer_id=vid, capabilities={"kinds": list(kinds)})


def test_assign_keeps_slots_fills_the_emptiest_and_skips_resting_volunteers():
    relay = ExpertRelay(runtime=None)
    ready = [_volunteer("a"), _volunteer("b"), _volunteer("c")]
    assert relay.assign(2, ready) == [("a", 0), ("b", 1), ("c", 0)]
    # "a" left: the others keep their slots; a newcomer takes the emptier slot.
    assert relay.assign(2, [ready[1], ready[2], _volunteer("d")]) == [
        ("b", 1),
        ("c", 0),
        ("d", 0),
    ]
    assert relay.assign(2, [_volunteer("e", kinds=("federated client",))]) == []
    relay._resting["b"] = time.monotonic() + REST_S
    assert [v for v, _ in relay.assign(2, [_volunteer("b"), _volunteer("c")])] == ["c"]
    two = [_volunteer("f"), _volunteer("g")]
    assert relay.assign(2, two) == [("f", 0), ("g", 1)]
    assert relay.assign(1, two) == [("f", 0), ("g", 0)]  # fewer hosts: slot 1 is re-dealt


def test_a_new_replica_goes_where_it_relieves_most():
    hot = {0: 100.0, 1: 300.0}  # tokens per step, host and replicas together
    assert slot_for_replica([0, 0], hot) == 1
    assert slot_for_replica([0, 1], hot) == 1  # 300 / 2 entries still beats 100 / 1
    assert slot_for_replica([0, 2], hot) == 0  # 100 each: the slot with fewer replicas
    assert slot_for_replica([1, 0, 0], {}) == 1  # nothing measured yet: fewest replicas
    relay = ExpertRelay(runtime=None)
    assert relay.assign(2, [_volunteer("a"), _volunteer("b")], hot) == [("a", 1), ("b", 1)]


def test_a_slots_tokens_alternate_between_host_and_replica_and_skip_a_banned_one():
    strategy = SimpleNamespace(k_min=1, grace_s=0.0, timeout_s=1.0, ban_s=60.0, ban_max_s=60.0)
    client = ExpertClient(4, strategy)
    registry = [
        HostEntry(0, None, (0, 2), worker_id=10),
        HostEntry(1, None, (2, 4), worker_id=11),
        HostEntry(0, None, (0, 2), worker_id=99, volunteer="v"),
    ]
    picks = []
    for step in range(4):
        client.update(registry, attempt=1, step=step)
        picks.append(client._entry_for(layer=0))
    assert [p[0] for p in picks] == [0, "0/v", 0, "0/v"]  # expert 0: host and replica in turn
    assert {p[2] for p in picks} == {1}  # host 1 has no replica
    client._strike("0/v")  # the replica failed: banned for ban_s
    assert client._entry_for(layer=0)[0] == 0 and client._entry_for(layer=1)[0] == 0
    assert bool(client.live().all())
    client._strike(0)  # host and replica both banned: still routed (answers or is masked)
    assert client._entry_for(layer=0)[0] in (0, "0/v") and not bool(client.live()[:2].any())
