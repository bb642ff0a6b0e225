"""The federated server: the runtime of ``strategy=federated``'s training role ``server``.

It holds the global model and the server's state as a one-rank data-parallel
runtime (so checkpoints, resume and the status work as for every program):
the ``dp`` state space is the global parameters and the server optimizer's
state; SCAFFOLD's control variate and centered clipping's centre are saved
beside them. Each step is one round:

1. **Sample** ``per_round + over_commit`` of the ``clients``: a pure function
   of ``(train.seed, round, attempt)``, so a resumed run samples exactly as
   the original would (the sampler's state is the round number, which the
   checkpoint holds).
2. **Dispatch** one call per client actor that hosts sampled clients
   (``actors/fed_clients.py``), the global model put in Ray's object store
   once. With secure aggregation, three short exchanges first set up the
   pairwise masks.
3. **Collect** results as they complete (``ray.wait``, no polling), until
   all are in, the round's deadline passes, or (over-commit) ``per_round``
   clients have finished; the rest are cancelled. A dead actor's clients
   are dropouts. Every update is validated (shape, dtype, finite, norm)
   before it is used.
4. **Aggregate** by the configured rule (with central DP: clip, sum, add
   Gaussian noise, count the round in the accountant), then **apply** the
   average update as a pseudo-gradient ``-delta`` to the server optimizer
   (SGD at ``server_lr``: FedAvg; Adam: FedAdam; Yogi: FedYogi).
5. **Evaluate** the new global model on the held-out split.

A round with fewer than ``min_results`` results is retried, re-sampled
among the clients whose actors answered, ``round_retries`` times; then the
job fails with what happened to each client. A client whose code raises
fails the job (past ``max_client_errors``) with the client's error: a
failing client never leaves a run that "succeeded" with a broken model.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch

from actors.dp_runtime import DataParallelRuntime, StepResult, peak_rss_bytes
from actors.fed_clients import ClientResults
from actors.gateway_server import relative_difference
from actors.task import eval_metrics
from collectives.fed_aggregation import (
    centered_clip,
    clip_to_norm,
    coordinate_median,
    trimmed_mean,
    validate_update,
    weighted_mean,
)
from collectives.optim import OptimizerSpec
from orchestrator.programs.federated_config import ROBUST, min_results

VOLUNTEERS = -1  # the "slot" of the volunteers' results in a round


class RoundFailedError(RuntimeError):
    """A round that got too few results after every retry."""


class ClientCodeError(RuntimeError):
    """A client's own code raised (more often than ``strategy.max_client_errors``)."""


@dataclass(frozen=True)
class RoundResult(StepResult):
    # sampled, finished, dropped, late, rejected, errors, retries, epsilon, eval, ...
    fed: dict[str, Any] = None  # type: ignore[assignment]


@dataclass
class RoundOutcome:
    """What one attempt at a round collected."""

    sampled: list[int]
    results: list[ClientResults] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)  # their actor died or was unavailable
    late: list[int] = field(default_factory=list)  # past the deadline, or over-committed
    rejected: dict[int, str] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    dead_slots: set[int] = field(default_factory=set)
    secure_sum: torch.Tensor | None = None  # secure aggregation: the decoded sum

    @property
    def finished(self) -> list[int]:
        return [c for r in self.results for c in r.clients if c not in self.rejected]


def sample_clients(
    seed: int, round_: int, attempt: int, clients: int, k: int, pool: Sequence[int] | None = None
) -> list[int]:
    """``k`` distinct clients of ``pool`` (default: all), a pure function of its arguments."""
    candidates = np.arange(clients) if pool is None else np.asarray(sorted(pool))
    rng = np.random.default_rng([seed, round_, attempt, 0x5F3D])
    chosen = rng.choice(candidates, size=min(k, len(candidates)), replace=False)
    return sorted(int(c) for c in chosen)


def server_optimizer(spec: Any) -> OptimizerSpec:
    """The server's optimizer on the pseudo-gradient ``-average update``."""
    st, t = spec.strategy, spec.train
    name = {"fedadam": "adamw", "fedyogi": "yogi"}.get(st.aggregator, "sgd")
    return OptimizerSpec(
        name=name, weight_decay=0.0, beta1=t.beta1, beta2=t.beta2, eps=st.server_eps, momentum=0.0
    )


class FederatedServerRuntime(DataParallelRuntime):
    """The federated server (see the module docstring)."""

    def __init__(self, spec, worker_id: int, data: Any):
        super().__init__(spec, worker_id, data)
        self._client_errors = 0
        self._gateway: Any = None
        self.control: torch.Tensor | None = None  # scaffold's server control variate c
        self.center: torch.Tensor | None = None  # centered_clip's centre: the last aggregate
        self.accountant = None
        dp = spec.strategy.dp
        if dp.noise_multiplier > 0:
            from collectives.privacy import PrivacyAccountant

            st = spec.strategy
            self.accountant = PrivacyAccountant(
                noise_multiplier=dp.noise_multiplier,
                sample_rate=(st.per_round + st.over_commit) / st.clients,
                delta=dp.delta,
            )

    # -- the seam's hooks ---------------------------------------------------

    @property
    def _engine_strategy(self) -> str:
        return "ddp"  # one rank holds the whole global model

    def _optimizer_spec(self) -> OptimizerSpec:
        return server_optimizer(self.spec)

    @property
    def _grad_clip(self) -> float:
        return 0.0  # updates are bounded by the aggregation rule (and DP clipping), not here

    def setup(self, rdzv, shard_bounds, rank):  # type: ignore[override]
        info = super().setup(rdzv, shard_bounds, rank)
        numel = self.engine.layout.numel
        agg = self.spec.strategy.aggregator
        self.control = torch.zeros(numel) if agg == "scaffold" else None
        self.center = torch.zeros(numel) if agg == "centered_clip" else None
        return info

    def _extra_state(self, lo: int, hi: int) -> dict[str, torch.Tensor]:
        out = {}
        if self.control is not None:
            out["control"] = self.control[lo:hi]
        if self.center is not None:
            out["center"] = self.center[lo:hi]
        return out

    def _load_extra_state(self, read: Any, step: int) -> None:
        n = self.engine.layout.numel
        if self.control is not None:
            self.control.copy_(read("control", 0, n))
        if self.center is not None:
            self.center.copy_(read("center", 0, n))
        if self.accountant is not None:
            self.accountant.rounds = step  # every completed round released one noisy sum

    # -- a round ------------------------------------------------------------

    def train_round(
        self, step: int, lr: float, actors: dict[int, Any], gateway: Any = None
    ) -> RoundResult:
        """Round ``step`` with the live client actors ``{slot: handle}`` (and the volunteer
        gateway's handle, if the job has one)."""
        self._gateway = gateway
        st = self.spec.strategy
        start = time.perf_counter()
        need = min_results(st)
        unavailable: set[int] = set()
        failures: list[str] = []
        for attempt in range(st.round_retries + 1):
            live = {s: h for s, h in actors.items() if s not in unavailable}
            pool = None
            if attempt > 0:  # re-sample among clients whose actors answered
                pool = [c for c in range(st.clients) if c % self.spec.cluster.workers in live]
            k = st.per_round + st.over_commit
            sampled = sample_clients(self.spec.train.seed, step, attempt, st.clients, k, pool)
            outcome = self._attempt(step, attempt, lr, sampled, live)
            self._check_client_errors(step, outcome)
            unavailable |= outcome.dead_slots
            if len(outcome.finished) >= need:
                break
            failures.append(_describe_shortfall(attempt, outcome, need))
        else:
            raise RoundFailedError(
                f"round {step}: too few results after {st.round_retries + 1} attempts "
                f"(strategy.min_results={need}, strategy.round_retries={st.round_retries}): "
                + "; ".join(failures)
            )
        compute_s = time.perf_counter() - start
        update = self._aggregate(outcome)
        self.engine.zero_grad()
        self.engine.flat_grad.copy_(update).neg_()  # the pseudo-gradient
        stats = self.engine.step(st.server_lr)
        if self.control is not None:
            total = sum(r.control_sum for r in outcome.results if r.control_sum is not None)
            self.control.add_(total / st.clients)
        self._after_step(step + 1)
        fed = self._round_fields(step, outcome, attempt, failures)
        loss_sum = sum(r.loss_sum for r in outcome.results)
        units = sum(r.n_units for r in outcome.results)
        return RoundResult(
            step=step,
            rank=self.rank,
            loss_sum=loss_sum,
            n_units=max(units, 1),
            n_samples=sum(sum(r.samples) for r in outcome.results),
            n_tokens=units if self.task.type == "lm" else 0,
            grad_norm=stats.grad_norm,  # the norm of the average update
            compute_s=compute_s,
            comm_wait_s=0.0,
            step_s=time.perf_counter() - start,
            peak_rss=peak_rss_bytes(),
            fed=fed,
        )

    def _mode(self) -> str:
        st = self.spec.strategy
        if st.secure_aggregation:
            return "secure"
        each = st.aggregator in ROBUST or st.dp.noise_multiplier > 0 or st.max_update_norm
        # Volunteers' updates are judged one by one, so everyone's are.
        each = each or self.spec.gateway.enabled
        return "each" if each else "sum"

    def _attempt(
        self, step: int, attempt: int, lr: float, sampled: list[int], live: dict[int, Any]
    ) -> RoundOutcome:
        """One try at round ``step``: dispatch, collect (see the module docstring)."""
        st = self.spec.strategy
        out = RoundOutcome(sampled=sampled)
        n_actors = self.spec.cluster.workers
        by_slot: dict[int, list[int]] = {}
        to_volunteers = self._volunteer_work(step, sampled)
        for c in sampled:
            if c in to_volunteers.values():
                continue
            if c % n_actors in live:
                by_slot.setdefault(c % n_actors, []).append(c)
            else:
                out.dropped.append(c)
        mode = self._mode()
        secure = None
        shares: dict[int, dict[int, dict[int, bytes]]] = {}
        if mode == "secure":
            secure, shares = self._secure_setup(step, attempt, by_slot, live, out)
        params = ray.put(self.engine.flat_param)
        control = ray.put(self.control) if self.control is not None else None
        refs = {}
        for slot, clients in by_slot.items():
            ref = live[slot].train.remote(
                step, params, clients, lr, mode, control, shares.get(slot)
            )
            refs[ref] = slot
        if to_volunteers:
            ref = self._gateway.train_clients.remote(
                step, params, to_volunteers, lr, st.max_update_norm
            )
            refs[ref] = VOLUNTEERS
            by_slot[VOLUNTEERS] = list(to_volunteers.values())
        deadline = time.monotonic() + (st.round_deadline_s or self.spec.elastic.step_timeout_s)
        pending = list(refs)
        while pending:
            left = deadline - time.monotonic()
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, left))
            if not ready:
                break
            slot = refs[ready[0]]
            try:
                result: ClientResults = ray.get(ready[0])
                if slot == VOLUNTEERS:
                    result = self._spot_check(step, lr, params, control, live, *result)
                    answered = set(result.clients) | set(result.rejected)
                    out.dropped += [c for c in to_volunteers.values() if c not in answered]
            except ray.exceptions.RayTaskError as e:  # our client runtime itself failed
                out.errors.update({c: str(e)[-2000:] for c in by_slot[slot]})
                continue
            except ray.exceptions.RayError:  # the actor died: its clients drop out
                out.dead_slots.add(slot)
                out.dropped += by_slot[slot]
                continue
            out.errors.update(result.errors)
            out.rejected.update(result.rejected)
            self._validate(result, out)
            out.results.append(result)
            if st.over_commit and len(out.finished) >= st.per_round:
                break
        for ref in pending:  # stragglers: past the deadline, or not needed
            ray.cancel(ref)
            out.late += by_slot[refs[ref]]
        if secure is not None:
            self._secure_finish(secure, out, live)
        return out

    # -- volunteers ----------------------------------------------------------

    def _volunteer_work(self, step: int, sampled: list[int]) -> dict[str, int]:
        """``{volunteer: client}``: sampled clients whose work the ready volunteers take over.

        A volunteer computes exactly what the client's actor would (the same
        rows, seed and global model), so the round's result does not depend
        on who computed it, and a trusted actor can check it.
        """
        if self._gateway is None:
            return {}
        try:
            ready = ray.get(self._gateway.ready.remote(), timeout=10)
        except ray.exceptions.RayError:
            return {}  # the gateway is being replaced: this round runs without volunteers
        order = np.random.default_rng([self.spec.train.seed, step, 0x7E]).permutation(sampled)
        return {v: int(c) for v, c in zip(ready, order, strict=False)}

    def _spot_check(
        self,
        step: int,
        lr: float,
        params: Any,
        control: Any,
        live: dict[int, Any],
        result: ClientResults,
        by_client: dict[int, str],
    ) -> ClientResults:
        """Recompute a share of the volunteers' updates on trusted client actors.

        The share of volunteer ``v`` falls as it passes checks (the gateway's
        ``spot_check_shares``). A mismatch bans the volunteer, and the trusted
        update replaces its result. Honest results earn credit.
        """
        import random

        g = self.spec.gateway
        rng = random.SystemRandom()  # unpredictable: a volunteer must not know when it is checked
        n_actors = self.spec.cluster.workers
        volunteers = [by_client[c] for c in result.clients]
        shares = ray.get(self._gateway.spot_check_shares.remote(volunteers))
        checks: dict[int, ray.ObjectRef] = {}  # index in result -> the trusted recomputation
        for i, client in enumerate(result.clients):
            slot = client % n_actors
            if slot in live and rng.random() < shares[volunteers[i]]:
                checks[i] = live[slot].train.remote(step, params, [client], lr, "each", control)
            else:
                self._gateway.credit.remote(volunteers[i], 1.0)
        for i, ref in checks.items():  # all recomputed at once, compared in turn
            client, volunteer = result.clients[i], volunteers[i]
            trusted: ClientResults = ray.get(ref)
            if trusted.updates is None:  # the trusted side failed: no verdict
                continue
            mine, truth = result.updates[i], trusted.updates[0]
            rel = relative_difference(mine, truth)
            passed = rel <= g.spot_check_rtol
            reason = f"round {step}, client {client}: relative difference {rel:.3g}"
            self._gateway.record_check.remote(volunteer, passed, reason)  # credits a match
            if not passed:
                result.updates[i] = truth  # the trusted update counts instead
        return result

    def _validate(self, result: ClientResults, out: RoundOutcome) -> None:
        """Check every update before it can touch the model; reject what fails."""
        st, numel = self.spec.strategy, self.engine.layout.numel
        if result.weighted_sum is not None:
            reason = validate_update(result.weighted_sum, numel, None)
            if reason:
                out.rejected.update({c: f"partial sum: {reason}" for c in result.clients})
        if result.updates is not None:
            for c, row in zip(result.clients, result.updates, strict=True):
                reason = validate_update(row, numel, st.max_update_norm)
                if reason:
                    out.rejected[c] = reason
        if result.control_sum is not None:
            reason = validate_update(result.control_sum, numel, None)
            if reason:
                out.rejected.update({c: f"control variate: {reason}" for c in result.clients})
        if st.secure_aggregation:
            for c in result.clients:
                if c not in result.masked:
                    out.rejected[c] = "no masked input"

    def _aggregate(self, out: RoundOutcome) -> torch.Tensor:
        """The round's average update from what was accepted (see the module docstring)."""
        st = self.spec.strategy
        dp = st.dp
        if out.secure_sum is not None:
            total = out.secure_sum.float()
            if dp.noise_multiplier > 0:
                return self._noised(total[:-1]) / st.per_round
            return total[:-1] / total[-1]
        accepted = [
            (r, i) for r in out.results for i, c in enumerate(r.clients) if c not in out.rejected
        ]
        if self._mode() == "sum":
            parts = {id(r): r for r, _ in accepted}.values()
            total = sum(r.weighted_sum for r in parts)
            weight = sum(sum(r.samples) for r in parts)
            return total / weight
        updates = torch.stack([r.updates[i] for r, i in accepted])
        weights = torch.tensor([float(r.samples[i]) for r, i in accepted])
        if dp.noise_multiplier > 0:
            clipped = torch.stack([clip_to_norm(u, dp.clip)[0] for u in updates])
            return self._noised(clipped.sum(0)) / st.per_round
        if st.aggregator == "median":
            return coordinate_median(updates)
        if st.aggregator == "trimmed_mean":
            return trimmed_mean(updates, st.trim)
        if st.aggregator == "centered_clip":
            self.center = centered_clip(updates, self.center, st.clip_tau)
            return self.center
        return weighted_mean(updates, weights)

    def _noised(self, total: torch.Tensor) -> torch.Tensor:
        """``total`` plus Gaussian noise of std ``noise_multiplier * clip``; counts the round."""
        from collectives.privacy import gaussian_noise

        dp = self.spec.strategy.dp
        # Unpredictable on purpose: noise anyone could regenerate protects nothing.
        gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
        self.accountant.step()
        return total + gaussian_noise(total.numel(), dp.noise_multiplier * dp.clip, gen)

    def _check_client_errors(self, step: int, out: RoundOutcome) -> None:
        if not out.errors:
            return
        self._client_errors += len(out.errors)
        allowed = self.spec.strategy.max_client_errors
        if self._client_errors > allowed:
            client, error = next(iter(out.errors.items()))
            raise ClientCodeError(
                f"round {step}: client {client} raised (client errors so far: "
                f"{self._client_errors}, strategy.max_client_errors={allowed}):\n{error}"
            )

    def _round_fields(
        self, step: int, out: RoundOutcome, attempt: int, failures: list[str]
    ) -> dict[str, Any]:
        t = self.spec.train
        fields: dict[str, Any] = {
            "clients_sampled": len(out.sampled),
            "clients_finished": len(out.finished),
            "clients_dropped": len(out.dropped),
            "clients_late": len(out.late),
            "clients_rejected": len(out.rejected),
            "client_errors": len(out.errors),
            "round_retries": attempt,
        }
        if failures:
            fields["retry_reasons"] = failures
        if out.rejected:
            fields["rejected"] = {str(c): why for c, why in list(out.rejected.items())[:10]}
        if self.accountant is not None:
            fields["epsilon"] = round(self.accountant.epsilon(), 4)
            fields["delta"] = self.accountant.delta
        volunteers = [r for r in out.results if r.slot == VOLUNTEERS]
        if self._gateway is not None:
            fields["volunteer_results"] = sum(len(r.clients) for r in volunteers)
            try:
                fields["volunteers"] = ray.get(self._gateway.volunteers.remote(), timeout=10)
            except ray.exceptions.RayError:
                pass  # being replaced: the status keeps the last list
        last = step + 1 == t.steps
        if t.eval_every == 0 or (step + 1) % t.eval_every == 0 or last:
            fields["eval"] = eval_metrics([self.evaluate([(0, t.global_batch)])])
        return fields

    # -- secure aggregation ---------------------------------------------------

    def _secure_setup(
        self,
        step: int,
        attempt: int,
        by_slot: dict[int, list[int]],
        live: dict[int, Any],
        out: RoundOutcome,
    ) -> tuple[Any, dict[int, dict[int, dict[int, bytes]]]]:
        """Phases 1-2: collect public keys, route the encrypted key shares (server sees neither
        secret). Actors that fail here drop their clients before any mask involves them."""
        from collectives.secure_aggregation import SecAggServer

        st = self.spec.strategy
        threshold = max(2, min_results(st))
        server = SecAggServer(
            f"{self.spec.job_id}/{step}/{attempt}".encode(),
            self.engine.layout.numel + 1,
            threshold,
        )
        keys = self._each_slot(
            by_slot, live, out, lambda h, cs: h.secagg_keys.remote(step, attempt, cs)
        )
        roster = server.receive_keys([k for ks in keys.values() for k in ks])
        outgoing = self._each_slot(
            {slot: by_slot[slot] for slot in keys},
            live,
            out,
            lambda h, _: h.secagg_share.remote(roster, threshold),
        )
        routed = server.route_shares({s: sh for per in outgoing.values() for s, sh in per.items()})
        shares = {slot: {c: routed.get(c, {}) for c in by_slot[slot]} for slot in outgoing}
        for slot in list(by_slot):
            if slot not in outgoing:
                del by_slot[slot]
        return server, shares

    def _each_slot(self, by_slot, live, out: RoundOutcome, call) -> dict[int, Any]:
        """``call(handle, clients)`` on every slot at once; slots whose actor fails drop out."""
        refs = {call(live[slot], clients): slot for slot, clients in by_slot.items()}
        got = {}
        timeout = self.spec.elastic.step_timeout_s
        for ref, slot in refs.items():
            try:
                got[slot] = ray.get(ref, timeout=timeout)
            except ray.exceptions.RayError:
                out.dead_slots.add(slot)
                out.dropped += by_slot[slot]
        return got

    def _secure_finish(self, server: Any, out: RoundOutcome, live: dict[int, Any]) -> None:
        """Phase 4: unmask the sum of the inputs that arrived (dropped clients' masks removed)."""
        from collectives.secure_aggregation import Quantizer, SecAggError

        for r in out.results:
            for c, y in r.masked.items():
                if c not in out.rejected:
                    server.receive_masked(c, y)
        try:
            survivors, dropped = server.unmask_request()
        except SecAggError as e:
            out.rejected.update({c: f"secure aggregation: {e}" for c in out.finished})
            return
        slots = {r.slot for r in out.results}
        answers = self._each_slot(
            {s: [] for s in slots},
            live,
            RoundOutcome(sampled=[]),
            lambda h, _: h.secagg_unmask.remote(survivors, dropped),
        )
        responses = {c: sh for per in answers.values() for c, sh in per.items()}
        try:
            out.secure_sum = Quantizer().decode(server.finish(responses))
        except SecAggError as e:
            out.rejected.update({c: f"secure aggregation: {e}" for c in out.finished})


def _describe_shortfall(attempt: int, out: RoundOutcome, need: int) -> str:
    parts = [f"attempt {attempt}: {len(out.finished)} of {len(out.sampled)} finished (need {need})"]
    for name, items in (
        ("dropped", out.dropped),
        ("late", out.late),
        ("rejected", out.rejected),
        ("raised", out.errors),
    ):
        if items:
            parts.append(f"{len(items)} {name}")
    return ", ".join(parts)
