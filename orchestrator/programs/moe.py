"""Decentralized mixture of experts as a training program: ``strategy=moe``.

Two roles. ``worker`` (``actors.moe_runtime.MoEWorkerRuntime``): the trunk —
embeddings, attention, gates — trained data-parallel exactly as ``ddp``
(the ``dp`` state space holds the trunk only). ``expert_host``
(``actors.expert_host.ExpertHostRuntime``), a standing role of
``strategy.expert_hosts`` members: host ``i`` holds experts ``a..b-1`` of
every layer, a range of the ``experts`` state space, and serves the
workers' tokens over Ray calls.

The registry of which experts are alive is this program's: the controller
tells it the seated hosts whenever they change (``standing_changed``; a
host's lease is the controller's liveness ping, every second), and every
step's work item carries the registry to the workers, whose gates then route
only to live experts. A host that dies mid-step costs the tokens routed to
it in that step (masked, the gate renormalised over what answered); the
controller seats a replacement in its slot, which restores the slot's
experts from the newest checkpoint and rejoins the registry.

With ``gateway.enabled``, volunteers outside the cluster join as replicas of
the hosts' slots (``actors/expert_relay.py``): each step the program asks
the gateway which volunteers replicate which slot and adds them to the
registry beside the hosts, so the workers share a slot's tokens between its
host and its replicas. The hosts keep the state; volunteers only compute,
and what they send is checked (and spot-checked against the host) first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray

from actors.expert_client import HostEntry
from actors.expert_relay import VolunteerReplica
from actors.expert_slot import expert_range
from collectives.flat import FlatLayout
from orchestrator.program import GATEWAY_ROLE, Capacity, RoleSpec, WorkItem, training_role
from orchestrator.programs.data_parallel import DataParallelPlan, DataParallelProgram
from orchestrator.programs.volunteer_rows import volunteer_lines

WORKER_RUNTIME = "actors.moe_runtime:MoEWorkerRuntime"
HOST_RUNTIME = "actors.expert_host:ExpertHostRuntime"
HOST_ROLE = "expert_host"


class MoEProgram(DataParallelProgram):
    """Trunk workers (ddp) and expert hosts (see the module docstring)."""

    def __init__(self, spec):
        super().__init__(spec)
        self.registry: list[HostEntry] = []
        self.attempt = 0  # the trunk's epoch: a step re-run after a failure is a new attempt
        self._hosts: dict[int, dict[str, Any]] = {}  # slot -> what the status shows
        self._masked = 0.0
        self.gateway: Any = None  # the volunteer gateway member (gateway.enabled)
        self._volunteers: list[dict[str, Any]] = []  # as the gateway last reported them
        self._replica_rows: dict[str, dict[str, Any]] = {}  # "slot/volunteer" -> measured
        self._load: dict[int, float] = {}  # slot -> tokens routed to it per step (EMA)

    def roles(self) -> list[RoleSpec]:
        st = self.spec.strategy
        return [
            training_role(self.spec, "worker", WORKER_RUNTIME),
            RoleSpec(
                name=HOST_ROLE,
                runtime=HOST_RUNTIME,
                count=st.expert_hosts,
                cpus=st.host_cpus,
                gpus=st.host_gpus,
                saves_state=True,
            ),
        ]

    def role_setup_args(self, role: str, index: int) -> tuple[Any, ...]:
        return (index, self.spec.strategy.expert_hosts)

    def standing_changed(self, role: str, members: Sequence[Any]) -> None:
        if role == GATEWAY_ROLE:
            self.gateway = members[0] if members else None
            return
        n_expert, hosts = self.spec.model.n_expert, self.spec.strategy.expert_hosts
        self.registry = [
            HostEntry(m.rank, m.handle, expert_range(n_expert, hosts, m.rank), m.worker_id)
            for m in members
        ]
        live = {m.rank: m for m in members}
        for slot in list(self._hosts):
            if slot not in live:
                self._hosts[slot]["alive"] = False
        for slot, m in live.items():
            row = self._hosts.setdefault(slot, {})
            if row.get("pid") != m.pid:  # a new host in this slot
                row.clear()
            a, b = expert_range(n_expert, hosts, slot)
            row.update(alive=True, pid=m.pid, experts=f"{a}..{b - 1}" if b - a > 1 else str(a))
            row.setdefault("version", m.info.get("version", 0))

    def standing_items(self) -> list[tuple[str, int, WorkItem]]:
        """Each host's buddy: the next live slot, which keeps its replica."""
        slots = sorted(h.slot for h in self.registry)
        handle = {h.slot: h.handle for h in self.registry}
        items = []
        for i, slot in enumerate(slots):
            buddy = slots[(i + 1) % len(slots)]
            items.append(
                (HOST_ROLE, slot, WorkItem("peers", (handle[buddy] if buddy != slot else None,)))
            )
        return items

    def trained_layout(self, model: Any) -> FlatLayout:
        """The trunk: every parameter but the experts'."""
        experts = frozenset(id(p) for _, _, m in model.expert_slots() for p in m.parameters())
        return FlatLayout.of(model, exclude=experts)

    def begin_epoch(self, plan: DataParallelPlan) -> None:
        super().begin_epoch(plan)
        self.attempt += 1

    def work_items(self, step: int, lr: float) -> list[WorkItem]:
        registry = self.registry + self._volunteer_replicas()
        return [
            WorkItem("train_step", (step, lr, lo, hi, registry, self.attempt))
            for lo, hi in self.balancer.bounds()
        ]

    def eval_items(self) -> list[WorkItem]:
        return [
            WorkItem("evaluate", (*item.args, self.registry, self.attempt))
            for item in super().eval_items()
        ]

    def _volunteer_replicas(self) -> list[HostEntry]:
        """This step's volunteer replicas of the live hosts' slots (none without a gateway)."""
        if self.gateway is None:
            return []
        hosts = self.spec.strategy.expert_hosts
        try:
            assigned, self._volunteers = ray.get(
                self.gateway.handle.expert_volunteers.remote(hosts, dict(self._load)), timeout=10
            )
        except (ray.exceptions.RayError, TimeoutError):
            return []  # the gateway is being replaced: this step runs on the hosts alone
        owner = {h.slot: h for h in self.registry}
        return [
            HostEntry(
                slot,
                VolunteerReplica(self.gateway.handle, owner[slot].handle, volunteer, slot, hosts),
                owner[slot].experts,
                self.gateway.worker_id,
                volunteer,
            )
            for volunteer, slot in assigned
            if slot in owner
        ]

    def reduce(self, step: int, lr: float, results: list[Any], step_time_s: float) -> dict:
        record = super().reduce(step, lr, results, step_time_s)
        routed = sum(r.experts["routed_slots"] for r in results)
        masked = sum(r.experts["masked_slots"] for r in results)
        self._masked = masked / routed if routed else 0.0
        record["expert_slots_masked"] = round(self._masked, 4)
        record["expert_hosts_live"] = len(self.registry)
        demand: dict[int, int] = {}  # slot -> tokens sent to its host and replicas this step
        for r in results:
            for key, h in r.experts["hosts"].items():
                slot = key if isinstance(key, int) else int(key.split("/", 1)[0])
                demand[slot] = demand.get(slot, 0) + h.get("tokens", 0)
                if isinstance(key, str):  # a volunteer's replica ("slot/volunteer")
                    row = self._replica_rows.setdefault(key, {})
                    row["calls"] = row.get("calls", 0) + h["calls"]
                    if h["latency_ms"] is not None:
                        row["latency_ms"] = h["latency_ms"]
                    for k in ("missed", "failed"):
                        row[k] = row.get(k, 0) + h[k]
                    continue
                row = self._hosts.setdefault(key, {})
                row["version"] = max(row.get("version", 0), h["version"])
                if h.get("restored_from"):
                    row["restored_from"] = h["restored_from"]
                if h["latency_ms"] is not None:
                    row["latency_ms"] = h["latency_ms"]
                    row["tokens_per_s"] = h["tokens_per_s"]
                for k in ("missed", "failed"):
                    row[k] = row.get(k, 0) + h[k]
        for slot, tokens in demand.items():
            old = self._load.get(slot)
            self._load[slot] = tokens if old is None else 0.8 * old + 0.2 * tokens
        return record

    def member_fields(self, record: dict) -> list[dict[str, Any]]:
        """The workers' fields, then each seated host's (the status lists hosts by slot)."""
        hosts = [
            {k: v for k, v in self._hosts.get(h.slot, {}).items() if k not in ("alive", "pid")}
            for h in sorted(self.registry, key=lambda h: h.slot)
        ]
        return super().member_fields(record) + hosts

    def status_fields(self) -> dict[str, Any]:
        st, model = self.spec.strategy, self.spec.model
        fields: dict[str, Any] = {
            "expert_hosts": st.expert_hosts,
            "hosts_live": len(self.registry),
            "n_expert": model.n_expert,
            "top_k": model.top_k,
            "slots_masked": round(self._masked, 4),
            "hosts": {str(k): v for k, v in sorted(self._hosts.items())},
        }
        summary = [
            f"moe         {model.n_expert} experts x {self._layers()} layers, top-{model.top_k}, "
            f"{len(self.registry)}/{st.expert_hosts} hosts live, k_min {st.k_min}, "
            f"grace {st.grace_s:g}s; {self._masked:.1%} of routed slots masked last step"
        ]
        for slot, row in sorted(self._hosts.items()):
            state = "live" if row.get("alive") else "down"
            latency = row.get("latency_ms")
            summary.append(
                f"  host {slot}   experts {row.get('experts', '?')}, {state}, "
                f"pid {row.get('pid')}, "
                f"version {row.get('version', 0)}, "
                + (f"latency {latency:.1f} ms" if latency is not None else "no calls yet")
                + f", missed {row.get('missed', 0)}, failed {row.get('failed', 0)}"
                + (f"; restored from {row['restored_from']}" if row.get("restored_from") else "")
            )
        if self.spec.gateway.enabled:
            fields["volunteers"] = self._volunteers
            fields["replicas"] = self._replica_rows
            summary.extend(volunteer_lines(self._volunteers))
            names = {v["id"]: v["name"] for v in self._volunteers}
            for key, row in sorted(self._replica_rows.items()):
                slot, volunteer = key.split("/", 1)
                latency = row.get("latency_ms")
                summary.append(
                    f"    {names.get(volunteer, volunteer)}'s replica of host {slot}: "
                    f"{row.get('calls', 0)} calls"
                    + (f", latency {latency:.1f} ms" if latency is not None else "")
                    + f", missed {row.get('missed', 0)}, failed {row.get('failed', 0)}"
                )
        fields["summary"] = summary
        return {"program": fields}

    def _layers(self) -> int:
        return getattr(self.spec.model, "n_layer", 0)

    def plan(self, capacities: Sequence[Capacity], numel: int) -> DataParallelPlan:
        return DataParallelPlan(len(capacities), None)  # the trunk is replicated, as ddp

    def min_worker_bytes(self, numel: int) -> int:
        """A trunk worker holds the trunk as ddp does: parameters, gradients, optimizer state."""
        return 4 * numel * (2 + len(self._optimizer_spec.state_keys()))
