"""A trunk worker's side of remote experts: dispatch to expert hosts, with deadlines.

Each MoE layer of a trunk worker's model holds a ``RemoteExperts`` in place
of its local experts. For one batch of routed tokens it sends each expert
host one Ray call holding only that host's tokens, grouped by expert
(``{expert: x}``), and waits by the k-of-n rule of Learning@home: until every
token has answers from ``k_min`` of its experts (or from all of them that
can still answer), then ``grace_s`` longer, then it stops waiting. A slot
whose host did not answer is masked (the layer renormalises the token's
gate weights over the slots that did), and in backward gets no gradient.

``ExpertClient`` keeps what the worker knows about the hosts: the registry
the controller sent with this step (slot, handle, expert range), per host
the measured latency, version, misses and failures, and bans: a host whose
call failed is skipped (its experts masked in the gate) for ``ban_s *
2^(failures-1)`` seconds — one whose actor died, until the registry drops or
replaces it — and a missed deadline halves its throughput estimate.

A slot may also have volunteers' replicas in the registry
(``actors/expert_relay.py``): an expert's tokens then go to one of the
slot's live entries, taken in turn by step, layer and expert, so the
replicas share the slot's work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from torch import nn

from actors.models.gpt_moe import scatter_slots
from collectives.moe_routing import slots_of


@dataclass(frozen=True)
class HostEntry:
    """One live expert host, or a volunteer's replica of one, as the registry names it."""

    slot: int
    handle: Any  # RuntimeHandle of its MemberActor (a replica: a VolunteerReplica)
    experts: tuple[int, int]  # expert indices [a, b) it holds in every layer
    worker_id: int = -1  # the member's id, new for a replacement in the same slot
    volunteer: str | None = None  # a replica: the volunteer's id (its calls go via the gateway)

    @property
    def key(self) -> int | str:
        """How workers tell entries apart: the slot for a host, ``"slot/volunteer"`` for a
        replica."""
        return self.slot if self.volunteer is None else f"{self.slot}/{self.volunteer}"


@dataclass
class HostStats:
    """What one worker measured about one host since the last report."""

    calls: int = 0
    answered: int = 0
    missed: int = 0  # past the deadline: given up on
    failed: int = 0  # the call raised (the host died, or errored)
    latency_s: float = 0.0  # summed over answered calls
    version: int = 0
    restored_from: str | None = None  # where the host took its experts from, if restored
    tokens_per_s: float = 0.0  # throughput estimate (EMA), halved on a miss
    tokens: int = 0  # tokens sent to it (answered or not): the demand on it


@dataclass
class Dispatch:
    """One layer's forward dispatch, kept for its backward."""

    layer: int
    # Per host that answered: {expert: (tokens, slots)} of what it was sent.
    answered: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)


class ExpertClient:
    """Dispatches to the registry's hosts for one trunk worker (see the module docstring)."""

    def __init__(self, n_expert: int, strategy: Any):
        self.n_expert = n_expert
        self.k_min, self.grace_s = strategy.k_min, strategy.grace_s
        self.timeout_s = strategy.timeout_s
        self.ban_s, self.ban_max_s = strategy.ban_s, strategy.ban_max_s
        self.hosts: dict[int | str, HostEntry] = {}  # by HostEntry.key
        self.stats: dict[int | str, HostStats] = {}
        self._strikes: dict[int | str, int] = {}
        self._banned_until: dict[int | str, float] = {}
        # Members whose actor died: masked until the registry no longer lists
        # them (the controller notices a death only at its next liveness
        # ping, and a step may already be on its way with the old registry).
        self._dead: set[int] = set()
        self.attempt, self.step = 0, 0
        self.masked_slots = 0  # routed slots that got no answer, since the last report
        self.routed_slots = 0

    def update(self, registry: list[HostEntry], attempt: int, step: int) -> None:
        """This step's registry and position (sent by the controller with every step)."""
        self.hosts = {h.key: h for h in registry}
        self._dead &= {h.worker_id for h in registry}
        self.attempt, self.step = attempt, step

    def _usable(self, h: HostEntry, now: float) -> bool:
        return h.worker_id not in self._dead and self._banned_until.get(h.key, 0.0) <= now

    def live(self) -> torch.Tensor:
        """``[E]`` bool: experts on a registered host that is not banned now."""
        live_E = torch.zeros(self.n_expert, dtype=torch.bool)
        now = time.monotonic()
        for h in self.hosts.values():
            if self._usable(h, now):
                live_E[h.experts[0] : h.experts[1]] = True
        return live_E

    def _entry_for(self, layer: int) -> dict[int, int | str]:
        """Expert -> the entry its tokens go to: a usable one holding it, taken in turn.

        (An expert the gate routed to has a usable entry, unless a ban began
        since: then any entry holding it, which answers or is masked.)
        """
        now = time.monotonic()
        usable: dict[int, list[int | str]] = {}
        holding: dict[int, list[int | str]] = {}
        for key, h in sorted(self.hosts.items(), key=lambda kv: str(kv[0])):
            for e in range(*h.experts):
                holding.setdefault(e, []).append(key)
                if self._usable(h, now):
                    usable.setdefault(e, []).append(key)
        return {
            e: (usable.get(e) or keys)[(self.step + layer + e) % len(usable.get(e) or keys)]
            for e, keys in holding.items()
        }

    # -- forward and backward -------------------------------------------------

    def forward(
        self, layer: int, x_TC: torch.Tensor, experts_TK: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Dispatch]:
        """Outputs ``[T, K, C]`` (0 where unanswered), answered mask ``[T, K]``, the dispatch."""
        T, K = experts_TK.shape
        entry_for = self._entry_for(layer)
        sent: dict[int | str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        for e in torch.unique(experts_TK[experts_TK >= 0]).tolist():
            tokens, slots = slots_of(experts_TK, e)
            sent.setdefault(entry_for[e], {})[e] = (tokens, slots)
        for key, experts in sent.items():
            self._stats(key).tokens += sum(len(t) for t, _ in experts.values())
        refs = {
            key: self.hosts[key].handle.forward.remote(
                self.attempt, self.step, layer, {e: x_TC[t] for e, (t, _) in experts.items()}
            )
            for key, experts in sent.items()
        }
        answers = self._wait(refs, sent, T)
        dispatch = Dispatch(layer)
        rows, outs = [], []
        answered_TK = torch.zeros((T, K), dtype=torch.bool)
        for key, (outputs, (version, restored_from)) in answers.items():
            self.stats[key].version = version
            self.stats[key].restored_from = restored_from
            dispatch.answered[key] = sent[key]
            for e, (tokens, slots) in sent[key].items():
                rows.append(tokens * K + slots)
                outs.append(outputs[e])
                answered_TK[tokens, slots] = True
        self.routed_slots += int((experts_TK >= 0).sum())
        self.masked_slots += int((experts_TK >= 0).sum() - answered_TK.sum())
        return scatter_slots(x_TC, T, K, rows, outs), answered_TK, dispatch

    def backward(
        self, dispatch: Dispatch, x_TC: torch.Tensor, grad_TKC: torch.Tensor
    ) -> torch.Tensor:
        """``dL/dx`` from the hosts that answered the forward; 0 from any that do not answer now."""
        T = x_TC.shape[0]
        refs = {
            key: self.hosts[key].handle.backward.remote(
                self.attempt,
                self.step,
                dispatch.layer,
                {e: (x_TC[t], grad_TKC[t, s]) for e, (t, s) in experts.items()},
            )
            for key, experts in dispatch.answered.items()
            if key in self.hosts
        }
        answers = self._wait(refs, dispatch.answered, T)
        grad_TC = torch.zeros_like(x_TC)
        for key, grads in answers.items():
            for e, (tokens, _) in dispatch.answered[key].items():
                if e in grads:
                    grad_TC.index_add_(0, tokens, grads[e].to(grad_TC.dtype))
        return grad_TC

    def _wait(
        self,
        refs: dict[int, ray.ObjectRef],
        sent: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]],
        T: int,
    ) -> dict[int, Any]:
        """Answers by host: wait for k_min per token, then grace_s, then give up on the rest."""
        if not refs:
            return {}
        # need_TH[t, i]: token t was sent to the i-th host of `order`.
        order = list(refs)
        need_TH = torch.zeros((T, len(order)), dtype=torch.bool)
        for i, key in enumerate(order):
            for tokens, _ in sent[key].values():
                need_TH[tokens, i] = True
        start = time.monotonic()
        satisfied_at: float | None = None
        pending = {refs[s]: i for i, s in enumerate(order)}
        answered: dict[int, Any] = {}
        failed: set[int] = set()
        while pending:
            if satisfied_at is None:
                deadline = start + self.timeout_s
            else:
                deadline = min(start + self.timeout_s, satisfied_at + self.grace_s)
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=left)
            for ref in ready:
                i = pending.pop(ref)
                key = order[i]
                try:
                    answered[i] = ray.get(ref)
                except ray.exceptions.RayError as e:
                    failed.add(i)
                    self._strike(key)
                    if isinstance(e, ray.exceptions.RayActorError):
                        self._dead.add(self.hosts[key].worker_id)
                    continue
                self._record(key, time.monotonic() - start, sent[key])
            if satisfied_at is None and self._satisfied(need_TH, answered, failed):
                satisfied_at = time.monotonic()
        for ref, i in pending.items():  # past the deadline: given up on
            ray.cancel(ref)
            self._miss(order[i])
        return {order[i]: a for i, a in answered.items()}

    def _satisfied(self, need_TH: torch.Tensor, answered: dict, failed: set[int]) -> bool:
        """Every token has k_min answers, or as many as its hosts that have not failed."""
        got_T = need_TH[:, sorted(answered)].sum(1) if answered else torch.zeros(len(need_TH))
        alive = [i for i in range(need_TH.shape[1]) if i not in failed]
        possible_T = need_TH[:, alive].sum(1)
        return bool((got_T >= possible_T.clamp(max=self.k_min)).all())

    # -- host health ----------------------------------------------------------

    def _stats(self, key: int | str) -> HostStats:
        return self.stats.setdefault(key, HostStats())

    def _record(self, key: int | str, seconds: float, experts: dict) -> None:
        st = self._stats(key)
        st.calls += 1
        st.answered += 1
        st.latency_s += seconds
        tokens = sum(len(t) for t, _ in experts.values())
        rate = tokens / max(seconds, 1e-6)
        st.tokens_per_s = rate if st.tokens_per_s == 0 else 0.8 * st.tokens_per_s + 0.2 * rate
        self._strikes.pop(key, None)

    def _miss(self, key: int | str) -> None:
        st = self._stats(key)
        st.calls += 1
        st.missed += 1
        st.tokens_per_s /= 2

    def _strike(self, key: int | str) -> None:
        st = self._stats(key)
        st.calls += 1
        st.failed += 1
        strikes = self._strikes.get(key, 0) + 1
        self._strikes[key] = strikes
        ban = min(self.ban_max_s, self.ban_s * 2 ** (strikes - 1))
        self._banned_until[key] = time.monotonic() + ban

    def take_report(self) -> dict[str, Any]:
        """Per entry (by ``HostEntry.key``) what was measured since the last report; then reset."""
        hosts = {
            key: {
                "calls": st.calls,
                "missed": st.missed,
                "failed": st.failed,
                "latency_ms": round(1000 * st.latency_s / st.answered, 3) if st.answered else None,
                "version": st.version,
                "restored_from": st.restored_from,
                "tokens_per_s": round(st.tokens_per_s, 1),
                "tokens": st.tokens,
            }
            for key, st in self.stats.items()
        }
        report = {
            "hosts": hosts,
            "masked_slots": self.masked_slots,
            "routed_slots": self.routed_slots,
        }
        for st in self.stats.values():
            st.calls = st.answered = st.missed = st.failed = st.tokens = 0
            st.latency_s = 0.0
        self.masked_slots = self.routed_slots = 0
        return report


class _RemoteExpertsFn(torch.autograd.Function):
    """Routed tokens to their hosts and back; gradients through the hosts that answered."""

    @staticmethod
    def forward(ctx, x_TC, experts_TK, client: ExpertClient, layer: int):  # noqa: ANN001
        out_TKC, answered_TK, dispatch = client.forward(layer, x_TC.detach(), experts_TK)
        ctx.client, ctx.dispatch = client, dispatch
        ctx.save_for_backward(x_TC.detach())
        ctx.mark_non_differentiable(answered_TK)
        return out_TKC, answered_TK

    @staticmethod
    def backward(ctx, grad_TKC, _grad_answered):  # noqa: ANN001
        (x_TC,) = ctx.saved_tensors
        return ctx.client.backward(ctx.dispatch, x_TC, grad_TKC.contiguous()), None, None, None


class RemoteExperts(nn.Module):
    """A layer's experts on expert hosts: the drop-in for ``LocalExperts`` on trunk workers."""

    def __init__(self, client: ExpertClient, layer: int):
        super().__init__()
        self.client, self.layer = client, layer

    def live(self) -> torch.Tensor:
        return self.client.live()

    def forward(
        self, x_TC: torch.Tensor, experts_TK: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _RemoteExpertsFn.apply(x_TC, experts_TK, self.client, self.layer)
