"""Federated training as a training program: ``strategy=federated``.

Two roles. ``server`` (``actors.fed_server.FederatedServerRuntime``), the
training role, one member: it holds the global model and the server's state
(the ``dp`` state space, checkpointed and resumed as every program's) and
runs one round per step. ``client`` (``actors.fed_clients.ClientGroupRuntime``),
a standing role of ``cluster.workers`` actors, each hosting the simulated
clients ``c`` with ``c % cluster.workers == slot`` and their data.

Clients keep their data: rows never leave their actor; only the global
model goes out and updates (or, with secure aggregation, masked updates)
come back. A client actor that dies mid-round costs that round its
clients' results (a dropout, as a phone that goes offline); the controller
seats a replacement in its slot, which reloads the same clients' rows, and
every later round's work item carries the new actor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from orchestrator.program import (
    GATEWAY_ROLE,
    Capacity,
    RoleSpec,
    StateSpace,
    TrainingProgram,
    WorkItem,
    common_record,
)
from orchestrator.programs.data_parallel import DataParallelPlan
from orchestrator.programs.volunteer_rows import volunteer_lines

SERVER_RUNTIME = "actors.fed_server:FederatedServerRuntime"
CLIENT_RUNTIME = "actors.fed_clients:ClientGroupRuntime"
CLIENT_ROLE = "client"

# What each round's record carries from the server's result.
_ROUND_FIELDS = (
    "clients_sampled",
    "clients_finished",
    "clients_dropped",
    "clients_late",
    "clients_rejected",
    "client_errors",
    "round_retries",
    "retry_reasons",
    "rejected",
    "epsilon",
    "delta",
    "volunteer_results",
)


class FederatedProgram(TrainingProgram):
    """A server and client actors (see the module docstring)."""

    def __init__(self, spec):
        super().__init__(spec)
        self.actors: dict[int, Any] = {}  # slot -> the live client actor's handle
        self.gateway: Any = None  # the volunteer gateway's handle (gateway.enabled)
        self._pids: dict[int, int] = {}
        self._volunteers: list[dict[str, Any]] = []  # as the gateway last reported them
        self._last: dict[str, Any] = {}
        self._totals = {"dropped": 0, "late": 0, "rejected": 0, "errors": 0, "retries": 0}

    def roles(self) -> list[RoleSpec]:
        cl, st = self.spec.cluster, self.spec.strategy
        return [
            RoleSpec(
                name="server",
                runtime=SERVER_RUNTIME,
                count=1,
                cpus=st.server_cpus,
                gpus=cl.gpus_per_worker,
            ),
            RoleSpec(
                name=CLIENT_ROLE,
                runtime=CLIENT_RUNTIME,
                count=cl.workers,
                cpus=cl.cpus_per_worker,
                gpus=cl.gpus_per_worker,
            ),
        ]

    def role_setup_args(self, role: str, index: int) -> tuple[Any, ...]:
        return (index, self.spec.cluster.workers)

    def standing_changed(self, role: str, members: Sequence[Any]) -> None:
        if role == GATEWAY_ROLE:
            self.gateway = members[0].handle if members else None
            return
        self.actors = {m.rank: m.handle for m in members}
        self._pids = {m.rank: m.pid for m in members}

    def plan(self, capacities: Sequence[Capacity], numel: int) -> DataParallelPlan:
        return DataParallelPlan(len(capacities), None)  # one server holds the whole model

    def setup_args(self, plan: DataParallelPlan, rank: int) -> tuple[Any, ...]:
        return (None, rank)

    def state_spaces(self, plan: DataParallelPlan, numel: int) -> list[StateSpace]:
        return [StateSpace("dp", ((0, numel),))]

    def begin_epoch(self, plan: DataParallelPlan) -> None:
        return None

    def work_items(self, step: int, lr: float) -> list[WorkItem]:
        # Clients train at strategy.client_lr; the controller's lr (train.lr's schedule) is unused.
        lr = self.spec.strategy.client_lr
        return [WorkItem("train_round", (step, lr, dict(self.actors), self.gateway))]

    def observe(self, results: list[Any]) -> None:
        return None

    def reduce(self, step: int, lr: float, results: list[Any], step_time_s: float) -> dict:
        (result,) = results
        lr = self.spec.strategy.client_lr
        record = common_record(step, lr, results, results, step_time_s)
        fed = result.fed
        record.update({k: fed[k] for k in _ROUND_FIELDS if k in fed})
        record.update(fed.get("eval", {}))
        self._last = {**fed, **fed.get("eval", {})}
        if "volunteers" in fed:
            self._volunteers = fed["volunteers"]
        for key, field in (
            ("dropped", "clients_dropped"),
            ("late", "clients_late"),
            ("rejected", "clients_rejected"),
            ("errors", "client_errors"),
            ("retries", "round_retries"),
        ):
            self._totals[key] += fed.get(field, 0)
        return record

    def eval_items(self) -> None:
        return None  # the server evaluates the global model inside each round

    def min_worker_bytes(self, numel: int) -> int:
        """The server: parameters, pseudo-gradient and the server optimizer's state, fp32."""
        states = 2 if self.spec.strategy.aggregator in ("fedadam", "fedyogi") else 0
        return 4 * numel * (2 + states)

    def member_fields(self, record: dict) -> list[dict[str, Any]]:
        server = {"clients_finished": record.get("clients_finished")}
        return [server] + [{"clients": self._hosted(slot)} for slot in sorted(self.actors)]

    def _hosted(self, slot: int) -> int:
        st, n = self.spec.strategy, self.spec.cluster.workers
        return len(range(slot, st.clients, n))

    def status_fields(self) -> dict[str, Any]:
        st = self.spec.strategy
        last = self._last
        fields: dict[str, Any] = {
            "clients": st.clients,
            "per_round": st.per_round,
            "aggregator": st.aggregator,
            "client_actors_live": len(self.actors),
            "totals": dict(self._totals),
        }
        line = (
            f"federated   {st.clients} clients on {len(self.actors)}/{self.spec.cluster.workers} "
            f"actors, {st.per_round} per round, {st.aggregator}"
            + (", secure aggregation" if st.secure_aggregation else "")
            + f"; last round {last.get('clients_finished', 0)}/"
            f"{last.get('clients_sampled', 0)} finished"
        )
        summary = [line]
        if "epsilon" in last:
            summary.append(
                f"  privacy     (epsilon {last['epsilon']:.3f}, delta {last['delta']:g}), "
                f"noise multiplier {st.dp.noise_multiplier:g}, clip {st.dp.clip:g}"
            )
        t = self._totals
        summary.append(
            f"  so far      {t['dropped']} dropped, {t['late']} late, {t['rejected']} rejected, "
            f"{t['errors']} client errors, {t['retries']} round retries"
        )
        for slot in range(self.spec.cluster.workers):
            pid = self._pids.get(slot) if slot in self.actors else None
            state = f"pid {pid}" if pid else "down (being replaced)"
            summary.append(f"  actor {slot}     {self._hosted(slot)} clients, {state}")
        if self.spec.gateway.enabled:
            fields["volunteers"] = self._volunteers
            summary.extend(volunteer_lines(self._volunteers))
        fields["summary"] = summary
        return {"program": fields}
