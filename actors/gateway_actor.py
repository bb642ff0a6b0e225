"""The volunteer gateway as a job member: the runtime of the standing role ``gateway``.

It serves ``actors/gateway_server.py``'s ``VolunteerGateway`` (gRPC over TLS,
per-volunteer tokens, rate limits, bounded messages) from inside the Ray
cluster, so the job's programs can hand volunteers work with plain Ray
calls; the volunteers themselves never join the cluster. Its audit trail
goes to the run's ``events.jsonl`` (``volunteer-joined``, ``-lost``,
``-rejected``, ...), and the address volunteers reach it at to
``<run_dir>/gateway/address``.

What volunteers do is the program's business:

- federated clients (``strategy=federated``), through ``train_clients``:
  each volunteer trains one client's work unit (its rows of the job's
  dataset, from the global model), exactly what a client actor would
  compute for it; the server validates the results, spot-checks some
  against a trusted client actor (``record_check``) and bans a volunteer
  caught lying;
- replicas of expert hosts (``strategy=moe``), through ``expert_volunteers``
  and the relayed ``expert_forward`` / ``expert_backward`` calls of
  ``actors/expert_relay.py``; those run on the actor's serve threads, so
  trunk workers' calls to different volunteers wait side by side.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from pathlib import Path
from typing import Any

import torch

from actors.expert_relay import ROLE_KIND, ExpertRelay
from actors.fed_clients import ClientResults
from actors.gateway_server import (
    GatewayConfig,
    VolunteerGateway,
    VolunteerLost,
    VolunteerWorkError,
    WorkRejected,
    WorkTimeout,
)
from actors.volunteer_work import FED_TRAIN
from orchestrator.events import EventLog
from orchestrator.spec import JobSpec
from storage.gateway_trust import gateway_credentials, gateway_dir


def volunteer_overrides(spec: JobSpec) -> list[str]:
    """The job's overrides a volunteer needs to build the same model, data and local training.

    Only model, data, task, the strategy and the seed: nothing about where
    the job runs or stores things.
    """
    keep = ("model", "data", "task", "strategy", "train.seed", "+model", "+data")
    return [
        o
        for o in spec.overrides
        if o.split("=", 1)[0].split(".")[0] in keep or o.startswith("train.seed=")
    ]


class GatewayRuntime:
    """One gateway per job (see the module docstring). Set up alone."""

    CONTROL_METHODS = ("volunteers", "expert_volunteers")
    SERVE_METHODS = ("expert_forward", "expert_backward")

    def __init__(self, spec: JobSpec, worker_id: int, data: Any):
        self.spec = spec
        self.worker_id = worker_id
        self.gateway: VolunteerGateway | None = None
        self._valid: dict[str, int] = {}  # volunteer -> spot checks passed
        self._lock = threading.Lock()  # serve threads record checks side by side
        self.relay = ExpertRelay(self)

    def probe(self) -> dict[str, Any]:
        import ray

        return {
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "available_memory": 0,
        }

    def setup(self, rdzv: Any, slot: int, _count: int = 1) -> dict[str, Any]:
        """Start serving; write the address volunteers connect to."""
        import ray

        g, run_dir = self.spec.gateway, self.spec.run_dir
        node_ip = ray.util.get_node_ip_address()
        credentials = gateway_credentials(
            run_dir, cert_path=g.cert, key_path=g.key, ca_path=g.ca, hostnames=(node_ip,)
        )
        events = EventLog(run_dir / "events.jsonl")
        self.gateway = VolunteerGateway(
            GatewayConfig(
                job_id=self.spec.job_id,
                run_dir=str(run_dir),
                credentials=credentials,
                host=g.host,
                port=g.port,
                heartbeat_timeout_s=g.heartbeat_timeout_s,
                max_volunteers=g.max_volunteers,
                volunteer_config={
                    "strategy": self.spec.strategy.name,
                    "overrides": volunteer_overrides(self.spec),
                },
            ),
            audit=lambda event, **fields: events.emit(f"volunteer-{event}", **fields),
        )
        port = self.gateway.start()
        host = node_ip if g.host in ("0.0.0.0", "::") else g.host
        address = f"{host}:{port}"
        path = gateway_dir(run_dir) / "address"
        path.write_text(address + "\n")
        return {"pid": os.getpid(), "address": address}

    def shutdown(self) -> None:
        """The job is over: volunteers are told so (they stop instead of reconnecting)."""
        if self.gateway is not None:
            self.gateway.stop(final=True)
            self.gateway = None

    # -- what programs ask --------------------------------------------------

    def volunteers(self) -> list[dict[str, Any]]:
        """Every volunteer seen: name, role, connected since, work done/rejected, credit."""
        assert self.gateway is not None
        rows = []
        for v in self.gateway.volunteers():
            rows.append(
                {
                    "id": v.volunteer_id,
                    "name": v.name,
                    "role": v.role,
                    "connected": v.connected,
                    "connected_since": v.connected_since,
                    "work_done": v.work_done,
                    "work_rejected": v.work_rejected,
                    "credit": round(v.credit, 3),
                    "banned": v.banned,
                    "spot_checks_passed": self._valid.get(v.volunteer_id, 0),
                }
            )
        return rows

    def ready(self) -> list[str]:
        """Volunteers that can take work now (connected, not banned), in a stable order."""
        assert self.gateway is not None
        return sorted(
            v.volunteer_id for v in self.gateway.volunteers() if v.connected and not v.banned
        )

    def spot_check_shares(self, volunteers: list[str]) -> dict[str, float]:
        """The chance each volunteer's next result is recomputed: ``1 / (1 + valid)``, floored."""
        floor = self.spec.gateway.spot_check_min
        with self._lock:
            return {v: max(floor, 1.0 / (1 + self._valid.get(v, 0))) for v in volunteers}

    def expert_volunteers(
        self, hosts: int, load: dict[int, float] | None = None
    ) -> tuple[list[tuple[str, int]], list[dict[str, Any]]]:
        """``(volunteer, slot)`` for every volunteer replicating an expert host now, and the
        volunteers' rows for the status (one call a step for ``strategy=moe``). ``load``:
        tokens per step each slot served lately (where a newcomer helps most)."""
        assert self.gateway is not None
        ready = [v for v in self.gateway.volunteers() if v.connected and not v.banned]
        replicas = self.relay.assign(hosts, ready, load)
        for volunteer, slot in replicas:
            self.gateway.set_role(volunteer, f"{ROLE_KIND} {slot} replica")
        return replicas, self.volunteers()

    def expert_forward(self, volunteer: str, slot: int, hosts: int, owner: Any, *call: Any) -> Any:
        """An expert host's ``forward(attempt, step, layer, inputs)``, relayed to a volunteer."""
        return self.relay.forward(volunteer, slot, hosts, owner, *call)

    def expert_backward(self, volunteer: str, slot: int, hosts: int, owner: Any, *call: Any) -> Any:
        """An expert host's ``backward(attempt, step, layer, inputs)``, relayed to a volunteer."""
        return self.relay.backward(volunteer, slot, hosts, owner, *call)

    def train_clients(
        self,
        round_: int,
        global_flat: torch.Tensor,
        assigned: dict[str, int],
        lr: float,
        max_norm: float | None,
    ) -> tuple[ClientResults, dict[int, str]]:
        """Each volunteer trains its assigned client from ``global_flat``; as a client actor's
        ``train`` in mode ``each``, plus ``{client: volunteer}`` for what came back.

        A volunteer that is lost, times out or sends a malformed result is a
        dropout (``rejected`` for a malformed one); the gateway's checks
        (shape, dtype, finite, norm) run before anything is returned.
        """
        assert self.gateway is not None
        numel = global_flat.numel()
        futures: dict[str, Future] = {}
        for volunteer, client in assigned.items():
            self.gateway.set_role(volunteer, "federated client")
            futures[volunteer] = self.gateway.submit(
                volunteer,
                FED_TRAIN,
                {"params": global_flat},
                {"round": round_, "client": client, "lr": lr},
                step=round_,
                deadline_s=self.spec.gateway.work_deadline_s,
                expect={"delta": (torch.float32, (numel,))},
                max_norm=max_norm,
            )
        wait_futures(list(futures.values()))
        out = ClientResults(slot=-1)
        updates, by_client = [], {}
        for volunteer, future in futures.items():
            client = assigned[volunteer]
            try:
                tensors, args = future.result()
            except WorkRejected as e:
                out.rejected[client] = f"volunteer {volunteer}: {e.kind}"
                continue
            except (VolunteerLost, WorkTimeout, VolunteerWorkError):
                continue  # a dropout: the client is missing from out.clients
            out.clients.append(client)
            out.samples.append(int(args.get("samples", 0)))
            out.loss_sum += float(args.get("loss_sum", 0.0))
            out.n_units += int(args.get("units", 0))
            updates.append(tensors["delta"])
            by_client[client] = volunteer
        if updates:
            out.updates = torch.stack(updates)
        return out, by_client

    def record_check(self, volunteer: str, passed: bool, reason: str = "") -> None:
        """The outcome of a spot check: credit for a match, a ban for a mismatch."""
        assert self.gateway is not None
        if passed:
            with self._lock:
                self._valid[volunteer] = self._valid.get(volunteer, 0) + 1
            self.gateway.credit(volunteer, 1.0)
        else:
            self.gateway.ban(volunteer, f"spot check failed: {reason}")

    def credit(self, volunteer: str, amount: float) -> None:
        assert self.gateway is not None
        self.gateway.credit(volunteer, amount)


def read_address(run_dir: str | Path, timeout_s: float = 0.0) -> str | None:
    """The gateway's address once it is serving (``None`` if not within ``timeout_s``)."""
    path = gateway_dir(run_dir) / "address"
    deadline = time.monotonic() + timeout_s
    while True:
        if path.exists():
            return path.read_text().strip()
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)
