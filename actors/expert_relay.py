"""Volunteers as replicas of expert hosts: the gateway's relay, and the handle workers call.

In ``strategy=moe`` with ``gateway.enabled``, a volunteer that offers
"expert host" is made a *replica* of one trusted expert host's slot. The
trusted host keeps the slot's state (parameters, optimizer, versions,
checkpoints); the volunteer only computes:

- trunk workers find the replica in the step's registry beside the host and
  send it some of the slot's tokens (``actors/expert_client.py`` alternates
  between a slot's live entries), calling a ``VolunteerReplica`` exactly as
  they call a host: ``forward`` / ``backward`` with the same arguments and
  answers;
- the gateway's ``ExpertRelay`` turns each call into a work item: it sends
  the slot's parameters at the call's version along with the tokens when
  the volunteer does not hold them yet (fetched once per slot and step from
  the host, ``params_at``), checks the answer (names, dtypes, shapes,
  finite: ``check_result``), spot-checks a share of answers against the
  host (``1 / (1 + passed)``, at least ``gateway.spot_check_min``), and on
  a backward adds the volunteer's parameter gradients to the host's sum for
  the step (``add_grads``);
- whatever goes wrong with a volunteer — gone, late, malformed, lying —
  its call is answered by the host instead, so the trunk sees a normal
  answer and the model only ever takes validated gradients. A volunteer
  caught lying is banned and what it added to the step not applied yet is
  taken back (``discount``); one that failed otherwise rests for
  ``REST_S`` before it is offered work again.

A joining volunteer replicates the slot where it relieves most: the one with
the most tokens per entry lately (``slot_for_replica``), so hot experts get
replicas first.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from typing import Any

import ray
import torch

from actors.gateway_server import (
    VolunteerLost,
    VolunteerWorkError,
    WorkRejected,
    WorkTimeout,
    relative_difference,
)
from actors.volunteer_work import MOE_BACKWARD, MOE_FORWARD, StaleReplica

ROLE_KIND = "expert host"  # what a volunteer offers (its capabilities' "kinds")
REST_S = 5.0  # a volunteer whose call failed is not offered work for this long
VOLUNTEER_FAILURES = (VolunteerLost, VolunteerWorkError, WorkRejected, WorkTimeout)


@dataclass(frozen=True)
class _Relayed:
    replica: VolunteerReplica
    method: str

    def remote(self, *args: Any) -> ray.ObjectRef:
        r = self.replica
        relay = getattr(r.gateway, self.method)
        return relay.remote(r.volunteer, r.slot, r.hosts, r.owner, *args)


@dataclass(frozen=True)
class VolunteerReplica:
    """A volunteer's replica of slot ``slot``, reached through the gateway.

    Quacks like an expert host's ``RuntimeHandle`` for what trunk workers
    call: ``replica.forward.remote(attempt, step, layer, inputs)`` and
    ``replica.backward.remote(...)``.
    """

    gateway: Any  # the gateway member's RuntimeHandle
    owner: Any  # the slot's trusted host (RuntimeHandle)
    volunteer: str
    slot: int
    hosts: int

    @property
    def forward(self) -> _Relayed:
        return _Relayed(self, "expert_forward")

    @property
    def backward(self) -> _Relayed:
        return _Relayed(self, "expert_backward")


def slot_for_replica(replicas: list[int], load: dict[int, float]) -> int:
    """The slot a new replica should serve: the hottest per entry already serving it.

    ``replicas[s]``: replicas slot ``s`` has; ``load[s]``: tokens routed to
    slot ``s`` per step lately (its host and replicas together). A slot's
    entries share its tokens in turn, so a new replica relieves most where
    ``load / (1 + replicas)`` is largest; with no load measured yet, the
    slot with the fewest replicas (the lowest on a tie).
    """
    return min(
        range(len(replicas)),
        key=lambda s: (-load.get(s, 0.0) / (1 + replicas[s]), replicas[s], s),
    )


class ExpertRelay:
    """The gateway's side of volunteer replicas (see the module docstring).

    ``gateway`` is the ``GatewayRuntime`` (its ``VolunteerGateway``, spot-check
    shares and verdicts); the relay's methods run on the gateway actor's serve
    threads, several at once.
    """

    def __init__(self, runtime: Any):
        self.runtime = runtime
        self._lock = threading.Lock()
        self.slot_of: dict[str, int] = {}  # volunteer -> the slot it replicates
        self._holds: dict[str, tuple[int, int]] = {}  # volunteer -> (slot, version) it was sent
        self._resting: dict[str, float] = {}  # volunteer -> not offered work before this time
        # slot -> (attempt, step, version, params, per_expert) of the host's last answer
        self._params: dict[int, tuple[int, int, int, torch.Tensor, int]] = {}
        self._rng = random.SystemRandom()  # a volunteer must not know when it is checked

    # -- which volunteers replicate which slot --------------------------------

    def assign(
        self, hosts: int, ready: list[Any], load: dict[int, float] | None = None
    ) -> list[tuple[str, int]]:
        """``(volunteer, slot)`` for each ready volunteer offering expert hosting.

        A volunteer keeps its slot while it stays; a new one goes where it
        helps most: ``slot_for_replica`` of the slots' measured ``load``.
        """
        now = time.monotonic()
        with self._lock:
            offered = sorted(
                v.volunteer_id
                for v in ready
                if ROLE_KIND in (v.capabilities.get("kinds") or [])
                and self._resting.get(v.volunteer_id, 0.0) <= now
            )
            for vid in list(self.slot_of):
                if vid not in offered or self.slot_of[vid] >= hosts:
                    del self.slot_of[vid]
            for vid in offered:
                if vid not in self.slot_of:
                    count = [0] * hosts
                    for slot in self.slot_of.values():
                        count[slot] += 1
                    self.slot_of[vid] = slot_for_replica(count, load or {})
            return [(vid, self.slot_of[vid]) for vid in offered]

    # -- relaying calls ---------------------------------------------------------

    def forward(
        self,
        volunteer: str,
        slot: int,
        hosts: int,
        owner: Any,
        attempt: int,
        step: int,
        layer: int,
        inputs: dict[int, torch.Tensor],
    ) -> tuple[dict[int, torch.Tensor], tuple[int, str | None]]:
        """A host's ``forward``, computed by the volunteer (or the host, if the volunteer fails)."""
        version, _ = self._version(slot, owner, attempt, step)
        tensors = {f"x{e}": x for e, x in inputs.items()}
        expect = {f"y{e}": (x.dtype, tuple(x.shape)) for e, x in inputs.items()}
        try:
            out = self._call(volunteer, MOE_FORWARD, slot, hosts, layer, step, tensors, expect)
        except VOLUNTEER_FAILURES:
            return ray.get(owner.forward.remote(attempt, step, layer, inputs))
        answer = {e: out[f"y{e}"] for e in inputs}
        if self._chosen_for_check(volunteer):
            truth, meta = ray.get(owner.forward.remote(attempt, step, layer, inputs))
            mine = torch.cat([answer[e].flatten() for e in inputs])
            true = torch.cat([truth[e].flatten() for e in inputs])
            if not self._verdict(volunteer, owner, mine, true, f"step {step} layer {layer}"):
                return truth, meta
        else:
            self.runtime.credit(volunteer, 1.0)
        return answer, (version, None)

    def backward(
        self,
        volunteer: str,
        slot: int,
        hosts: int,
        owner: Any,
        attempt: int,
        step: int,
        layer: int,
        inputs: dict[int, tuple[torch.Tensor, torch.Tensor]],
    ) -> dict[int, torch.Tensor]:
        """A host's ``backward``: the volunteer's input gradients, its parameter gradients
        summed into the host's step once validated (or the host's own, if it fails)."""
        _, per_expert = self._version(slot, owner, attempt, step)
        tensors: dict[str, torch.Tensor] = {}
        expect: dict[str, tuple[Any, tuple[int, ...]]] = {}
        for e, (x, dy) in inputs.items():
            tensors[f"x{e}"], tensors[f"dy{e}"] = x, dy
            expect[f"dx{e}"] = (dy.dtype, tuple(x.shape))
            expect[f"g{e}"] = (torch.float32, (per_expert,))
        try:
            out = self._call(volunteer, MOE_BACKWARD, slot, hosts, layer, step, tensors, expect)
        except VOLUNTEER_FAILURES:
            return ray.get(owner.backward.remote(attempt, step, layer, inputs))
        dx = {e: out[f"dx{e}"] for e in inputs}
        grads = {e: out[f"g{e}"] for e in inputs}
        if self._chosen_for_check(volunteer):
            truth = ray.get(owner.check_backward.remote(attempt, step, layer, inputs))
            mine = torch.cat([torch.cat([dx[e].flatten(), grads[e]]) for e in inputs])
            true = torch.cat([torch.cat([truth[e][0].flatten(), truth[e][1]]) for e in inputs])
            if not self._verdict(volunteer, owner, mine, true, f"step {step} layer {layer}"):
                dx = {e: truth[e][0] for e in inputs}
                grads = {e: truth[e][1] for e in inputs}
                volunteer = "trusted"
        else:
            self.runtime.credit(volunteer, 1.0)
        if not ray.get(owner.add_grads.remote(attempt, step, layer, grads, volunteer)):
            return {}  # the step was applied already: late, as a host's late backward is
        return dx

    # -- internals --------------------------------------------------------------

    def _version(self, slot: int, owner: Any, attempt: int, step: int) -> tuple[int, int]:
        """The host's version for a call of (attempt, step), and its experts' size."""
        with self._lock:
            held = self._params.get(slot)
        if held is None or held[:2] != (attempt, step):
            version, params, per_expert = ray.get(owner.params_at.remote(attempt, step))
            held = (attempt, step, version, params, per_expert)
            with self._lock:
                self._params[slot] = held
        return held[2], held[4]

    def _call(
        self,
        volunteer: str,
        method: str,
        slot: int,
        hosts: int,
        layer: int,
        step: int,
        tensors: dict[str, torch.Tensor],
        expect: dict[str, Any],
    ) -> dict[str, torch.Tensor]:
        """Send one call to the volunteer (with the slot's parameters if it lacks them)."""
        gateway = self.runtime.gateway
        with self._lock:
            _, _, version, params, _ = self._params[slot]
            if self._holds.get(volunteer) != (slot, version):
                tensors = {**tensors, "params": params}
                self._holds[volunteer] = (slot, version)
            args = {"slot": slot, "hosts": hosts, "layer": layer, "version": version}
            future = gateway.submit(
                volunteer,
                method,
                tensors,
                args,
                step=step,
                deadline_s=self.runtime.spec.gateway.work_deadline_s,
                expect=expect,
                max_norm=self.runtime.spec.gateway.max_result_norm,
            )
        try:
            out, _ = future.result()
            return out
        except VOLUNTEER_FAILURES as e:
            stale = isinstance(e, VolunteerWorkError) and StaleReplica.__name__ in str(e)
            with self._lock:
                self._holds.pop(volunteer, None)  # it may not have loaded what was sent
                if not stale:  # a stale replica only needs the parameters again
                    self._resting[volunteer] = time.monotonic() + REST_S
            raise

    def _chosen_for_check(self, volunteer: str) -> bool:
        share = self.runtime.spot_check_shares([volunteer])[volunteer]
        return self._rng.random() < share

    def _verdict(self, volunteer: str, owner: Any, mine: Any, truth: Any, where: str) -> bool:
        """Compare a volunteer's answer with the host's; a mismatch bans it and takes back
        what it added to the step not applied yet."""
        rel = relative_difference(mine, truth)
        passed = rel <= self.runtime.spec.gateway.spot_check_rtol
        self.runtime.record_check(volunteer, passed, f"{where}: relative difference {rel:.3g}")
        if not passed:
            ray.get(owner.discount.remote(volunteer))
            with self._lock:
                self.slot_of.pop(volunteer, None)
        return passed
