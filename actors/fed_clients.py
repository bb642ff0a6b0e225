"""Simulated federated clients: the runtime of ``strategy=federated``'s standing role ``client``.

One actor hosts many clients (client ``c`` lives on actor slot ``c % n``):
their rows stay resident (``actors/client_data.py``), and one call trains
every client of a round that lives here, one after another, so a client
costs a few tensor copies rather than an actor or a message. The global
model arrives once per actor per round, as a Ray object.

Local training: from the global parameters, ``strategy.local_epochs``
passes over the client's rows in shuffled mini-batches of
``strategy.batch_size``, plain SGD on the mean loss at the round's learning
rate; fedprox adds the proximal gradient ``mu * (w - w_global)``; scaffold
corrects each gradient by ``c - c_i`` (server and client control variates,
Karimireddy et al. 2020, option II for the new ``c_i``).

What comes back depends on what the server needs (``mode``):

- ``sum``: one partial sum over this actor's clients, ``sum_i n_i * delta_i``
  and ``sum_i n_i`` (fedavg and the server optimizers): the bytes of one
  update per actor, whatever the number of clients;
- ``each``: every client's ``delta_i`` (robust rules and central DP, which
  judge or clip each update);
- ``secure``: every client's update quantized and masked
  (``collectives/secure_aggregation.py``): the server learns only the sum.

A client whose code raises is reported with its error (the others' results
still come back); a client whose update is not finite is reported as
rejected and left out of the partial sum. Deltas are always checked again
by the server.
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from actors.client_data import client_rows
from actors.memory import worker_available_bytes
from actors.task import build_model, make_task
from collectives.flat import FlatLayout, attach_grad_views, flatten_into
from orchestrator.spec import JobSpec


@dataclass
class ClientResults:
    """What one actor returns for one round (see the module docstring for ``mode``)."""

    slot: int
    clients: list[int] = field(default_factory=list)  # finished, in order
    samples: list[int] = field(default_factory=list)  # rows each trained on
    loss_sum: float = 0.0  # summed training loss over every local step's rows
    n_units: int = 0
    weighted_sum: torch.Tensor | None = None  # mode "sum": sum_i n_i * delta_i
    updates: torch.Tensor | None = None  # mode "each": [k, d]
    masked: dict[int, torch.Tensor] = field(default_factory=dict)  # mode "secure"
    control_sum: torch.Tensor | None = None  # scaffold: sum_i (c_i+ - c_i)
    errors: dict[int, str] = field(default_factory=dict)  # client -> its error, shortened
    rejected: dict[int, str] = field(default_factory=dict)  # client -> why
    compute_s: float = 0.0


def _short_error(e: BaseException) -> str:
    """The exception and the last frames of its traceback: enough to find the user's bug."""
    lines = traceback.format_exception(e)
    return "".join(lines[-4:]).strip()[-2000:]


class ClientGroupRuntime:
    """One actor's simulated clients (see the module docstring). Set up alone."""

    CONTROL_METHODS = ()

    def __init__(self, spec: JobSpec, worker_id: int, data: Any):
        self.spec = spec
        self.worker_id = worker_id
        self.data = data
        self.task = make_task(spec.task, data, spec.seq_len)
        torch.set_num_threads(max(1, int(spec.cluster.cpus_per_worker)))
        self.slot = -1
        self.rows: dict[int, dict[str, torch.Tensor]] = {}
        self.control: dict[int, torch.Tensor] = {}  # scaffold's c_i, by client
        self._secagg: dict[int, Any] = {}  # this round's protocol state, by client
        self._secagg_round: tuple[int, int] | None = None

    def probe(self) -> dict[str, Any]:
        import ray

        return {
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "available_memory": worker_available_bytes(torch.device("cpu")),
        }

    def setup(self, rdzv: Any, slot: int, actors: int) -> dict[str, Any]:
        """Load the rows of this slot's clients and build the model they train."""
        st, t = self.spec.strategy, self.spec.train
        self.slot = slot
        torch.manual_seed(t.seed)
        self.model = build_model(self.spec.model, self.data.facts)
        self.model.train()
        self.layout = FlatLayout.of(self.model)
        self.flat = flatten_into(self.model, self.layout, torch.float32)
        self.grad = torch.zeros_like(self.flat)
        attach_grad_views(self.model, self.layout, self.grad)
        every = client_rows(self.data, st.clients, t.seed, self.task.seq_len)
        seq_len = self.task.seq_len
        for c in range(slot, st.clients, actors):
            self.rows[c] = self.data.eval_batch(every[c], seq_len)
        return {
            "pid": os.getpid(),
            "clients": len(self.rows),
            "rows": sum(len(b["y"]) for b in self.rows.values()),
        }

    # -- training -----------------------------------------------------------

    def train(
        self,
        round_: int,
        global_flat: torch.Tensor,
        clients: list[int],
        lr: float,
        mode: str,
        control: torch.Tensor | None = None,
        incoming_shares: dict[int, dict[int, bytes]] | None = None,
    ) -> ClientResults:
        """Train ``clients`` (all living here) from ``global_flat``; see the module docstring."""
        start = time.perf_counter()
        out = ClientResults(slot=self.slot)
        global_flat = global_flat.to(self.flat.dtype)
        updates: list[torch.Tensor] = []
        for c in clients:
            try:
                delta, n, loss_sum, units, steps = self._train_client(
                    round_, c, global_flat, lr, control
                )
            except Exception as e:  # noqa: BLE001 - the client's code failed: report, go on
                out.errors[c] = _short_error(e)
                continue
            if not bool(torch.isfinite(delta).all()):
                out.rejected[c] = "update is not finite"
                continue
            out.clients.append(c)
            out.samples.append(n)
            out.loss_sum += loss_sum
            out.n_units += units
            if control is not None:
                new_c = self._new_control(c, control, delta, lr, steps)
                change = new_c - self.control.get(c, torch.zeros_like(new_c))
                self.control[c] = new_c
                out.control_sum = change if out.control_sum is None else out.control_sum + change
            if mode == "sum":
                if out.weighted_sum is None:
                    out.weighted_sum = torch.zeros_like(delta)
                out.weighted_sum.add_(delta, alpha=float(n))
            elif mode == "each":
                updates.append(delta)
            elif mode == "secure":
                out.masked[c] = self._masked(c, delta, n, incoming_shares or {})
            else:
                raise ValueError(f"unknown mode {mode!r}")
        if updates:
            out.updates = torch.stack(updates)
        out.compute_s = time.perf_counter() - start
        return out

    def _train_client(
        self,
        round_: int,
        client: int,
        global_flat: torch.Tensor,
        lr: float,
        control: torch.Tensor | None,
    ) -> tuple[torch.Tensor, int, float, int, int]:
        """``(delta, rows, loss_sum, units, local steps)`` of one client's local training."""
        st, t = self.spec.strategy, self.spec.train
        batch = self.rows[client]
        n = len(batch["y"])
        # Seeded by (seed, round, client): the same client trains the same way
        # on whichever actor hosts it, and a retried round repeats exactly.
        seed = np.random.SeedSequence([t.seed, round_, client]).generate_state(1)[0]
        gen = torch.Generator().manual_seed(int(seed))
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))  # dropout
        with torch.no_grad():
            self.flat.copy_(global_flat)
        prox = st.aggregator == "fedprox" and st.prox_mu > 0
        correction = None
        if control is not None:
            correction = control - self.control.get(client, torch.zeros_like(control))
        loss_sum, units, steps = 0.0, 0, 0
        cap = st.local_steps if st.local_steps is not None else float("inf")
        for _ in range(st.local_epochs):
            order = torch.randperm(n, generator=gen)
            for lo in range(0, n, st.batch_size):
                if steps >= cap:
                    break
                rows = order[lo : lo + st.batch_size]
                part = {k: v[rows] for k, v in batch.items()}
                self.grad.zero_()
                objective, loss, count = self.task.objective(self.model, part)
                (objective / max(count, 1)).backward()
                with torch.no_grad():
                    if prox:
                        self.grad.add_(self.flat - global_flat, alpha=st.prox_mu)
                    if correction is not None:
                        self.grad.add_(correction)
                    self.flat.add_(self.grad, alpha=-lr)
                loss_sum += float(loss.detach())
                units += count
                steps += 1
        return self.flat - global_flat, n, loss_sum, units, steps

    def _new_control(
        self, client: int, control: torch.Tensor, delta: torch.Tensor, lr: float, steps: int
    ) -> torch.Tensor:
        """SCAFFOLD option II: ``c_i+ = c_i - c + (x - y_i) / (K lr)``."""
        c_i = self.control.get(client, torch.zeros_like(control))
        if steps == 0 or lr <= 0:
            return c_i
        return c_i - control - delta / (steps * lr)

    # -- secure aggregation ---------------------------------------------------

    def secagg_keys(self, round_: int, attempt: int, clients: list[int]) -> list[Any]:
        """Phase 1: fresh key pairs for this round's clients here; their public keys."""
        from collectives.secure_aggregation import SecAggClient

        self._secagg_round = (round_, attempt)
        round_id = f"{self.spec.job_id}/{round_}/{attempt}".encode()
        length = self.layout.numel + 1  # the weighted update and its weight
        self._secagg = {c: SecAggClient(c, round_id, length) for c in clients}
        return [self._secagg[c].advertise() for c in clients]

    def secagg_share(self, roster: list[Any], threshold: int) -> dict[int, dict[int, bytes]]:
        """Phase 2: each client's encrypted key shares for the others, by sender then recipient."""
        return {c: client.share_keys(roster, threshold) for c, client in self._secagg.items()}

    def _masked(
        self, client: int, delta: torch.Tensor, n: int, incoming: dict[int, dict[int, bytes]]
    ) -> torch.Tensor:
        """Phase 3: the client's update, quantized and masked (weighted by rows, or clipped)."""
        from collectives.secure_aggregation import Quantizer

        st = self.spec.strategy
        proto = self._secagg[client]
        proto.receive_shares(incoming.get(client, {}))
        if st.dp.noise_multiplier > 0:  # DP: each update clipped, all weigh alike
            norm = float(torch.linalg.vector_norm(delta))
            value = torch.cat([delta * min(1.0, st.dp.clip / (norm + 1e-12)), delta.new_ones(1)])
        else:
            value = torch.cat([delta * n, delta.new_full((1,), float(n))])
        summands = st.per_round + st.over_commit  # the most inputs the sum can hold
        return proto.masked_input(Quantizer().encode(value.double(), n_summands=summands))

    def secagg_unmask(
        self, survivors: list[int], dropped: list[int]
    ) -> dict[int, dict[int, tuple[str, int]]]:
        """Phase 4: this actor's clients' shares that let the server remove the masks."""
        here = [c for c in survivors if c in self._secagg]  # only clients that sent an input
        return {c: self._secagg[c].unmask(survivors, dropped) for c in here}
