"""The worker's side of elastic membership: what state it holds, and moving it between epochs.

A mixin of ``DataParallelRuntime``. The controller, after a failure or
before a planned change (a join, a drain), asks every surviving worker for
its ``holdings()``, makes a ``RecoveryPlan`` (``orchestrator/recovery.py``),
has the chosen holders ``export_piece`` their copies (the returned tensors go
to Ray's object store, owned by the controller, so they outlive the worker
that exported them), and then every member of the new epoch
``restore_from_pieces`` — reading only the pieces that overlap its new shard.

Every copy is labelled with its state space (``Holding.space``): a data-
parallel worker owns a range of ``dp``; a runtime owning another space (a
pipeline stage's ``stage/2``) overrides ``state_space`` and
``source_space``, and the same holdings, exports and restores serve it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ray
import torch

from collectives.errors import classify_peer_loss
from collectives.process_group import leave_group, sever_group
from collectives.replication import BuddyReplicator
from orchestrator.recovery import Holding
from storage.checkpoint import DEFAULT_SPACE

# How long a query for holdings waits for a replica exchange still in flight
# (a live source's bytes land in milliseconds; a dead one's never do), and
# how long a rank whose collective failed waits for it before severing.
_SETTLE_QUERY_S = 5.0
_SETTLE_ON_ABORT_S = 1.0
# How long fetching a piece of state from Ray's object store may take.
_FETCH_S = 300.0


class ElasticState:
    """Needs ``self.engine``, ``self.rank``, ``self.spec`` and ``self._bounds`` (set by setup)."""

    engine: Any
    rank: int
    spec: Any
    _bounds: list[tuple[int, int]] | None
    _engine_strategy: str  # "ddp" (replicated state) or a sharding strategy
    _replicator: BuddyReplicator | None = None
    _applied: int | None = None  # steps applied to the live engine state
    _live_valid: bool = True  # False while a failed ZeRO step may have half-updated the shard

    @property
    def state_space(self) -> str:
        """The state space whose range this rank owns (and restores) in this epoch."""
        return DEFAULT_SPACE

    @property
    def source_space(self) -> str:
        """The state space of the range that this rank's replication source owns."""
        return self.state_space

    @property
    def _sharded(self) -> bool:
        return self._engine_strategy != "ddp"

    def _start_epoch(self, world_size: int) -> None:
        self._replicator = None
        if self._sharded:
            overlap = self.spec.elastic.replication == "async"
            self._replicator = BuddyReplicator(self.rank, world_size, overlap=overlap)

    def _after_step(self, done: int) -> None:
        """Called at the end of every step: record it, and replicate the shard when due.

        The previous exchange is settled at every step's end, also when no new
        one is due, so that a replica is never more than a step behind.
        """
        self._applied = done
        if self._replicator is None or not self.spec.elastic.enabled:
            return
        if done % self.spec.elastic.replicate_every == 0:
            self._replicate(done)
        else:
            self._replicator.settle()

    def _before_update(self) -> None:
        """Called before the optimizer update, which must not change what is being replicated."""
        if self._replicator is not None:
            self._replicator.wait_until_copied()

    def _replicate(self, done: int) -> None:
        lo, hi, tensors = self.engine.checkpoint_slice()
        rep = self._replicator
        rep.replicate(
            done,
            lo,
            hi,
            tensors,
            self._bounds[rep.source],
            space=self.state_space,
            source_space=self.source_space,
        )

    # -- called by the controller --------------------------------------------

    def holdings(self) -> list[dict[str, Any]]:
        """Every complete copy of training state this worker holds, as ``Holding`` fields."""
        if self._replicator is not None:
            self._replicator.settle(timeout_s=_SETTLE_QUERY_S)
        out: list[Holding] = []
        me, space = self.rank, self.state_space
        if self._applied is not None and self.engine is not None and self._live_valid:
            if self._sharded:
                lo, hi, _ = self.engine.checkpoint_slice()
                out.append(Holding(me, me, self._applied, "live", lo, hi, space))
            else:
                numel = self.engine.layout.numel
                out.append(Holding(me, 0, self._applied, "live", 0, numel, space))
        if self._replicator is not None:
            for done, c in self._replicator.own_copies().items():
                out.append(Holding(me, me, done, "own", c.lo, c.hi, c.space))
            for done, c in self._replicator.replica_copies().items():
                out.append(Holding(me, c.rank, done, "replica", c.lo, c.hi, c.space))
        return [dataclasses.asdict(h) for h in out]

    def export_piece(
        self, kind: str, owner: int, done: int, space: str = DEFAULT_SPACE
    ) -> dict[str, torch.Tensor]:
        """The tensors of one holding (returned by value: Ray stores them for the controller)."""
        if kind == "live":
            if space != self.state_space:
                raise LookupError(f"worker {self.rank} holds no live state of space {space!r}")
            if self._sharded:
                _, _, views = self.engine.checkpoint_slice()
                return {k: v.detach().clone() for k, v in views.items()}
            lo, hi = 0, self.engine.layout.numel
            out = {"param": self.engine.flat_param[lo:hi].detach().clone()}
            for key, t in self.engine.optimizer.state_tensors().items():
                out[key] = t[lo:hi].clone()
            return out
        copies = (
            self._replicator.own_copies() if kind == "own" else self._replicator.replica_copies()
        )
        copy = copies.get(done)
        if copy is None or copy.rank != owner or copy.space != space:
            raise LookupError(
                f"worker {self.rank} holds no {kind} copy of rank {owner}'s {space!r} at {done}"
            )
        with self._replicator.lock:
            if copy.step != done:  # reused by a step that ran on meanwhile
                raise LookupError(f"worker {self.rank}: the copy of step {done} was overwritten")
            return {k: t.clone() for k, t in copy.tensors.items()}

    def _abort_epoch(self) -> None:
        """A collective failed: leave the group now, not when the controller asks.

        Peers of this rank that are still blocked in a collective with it
        then see its connections close and fail too, instead of waiting for
        the collective timeout.
        """
        if self.engine is not None:
            self.engine.abandon_collectives()
        try:
            if self._replicator is not None:
                # Severing would cut off replica bytes still on their way here
                # (or from here) from live peers; a dead peer fails at once.
                self._replicator.settle(timeout_s=_SETTLE_ON_ABORT_S)
            sever_group()
        finally:
            leave_group()

    @classify_peer_loss(on_loss=lambda self: self._abort_epoch())
    def begin(self, done: int) -> None:
        """Training starts (fresh, or from a checkpoint) with ``done`` steps applied.

        A collective: the first replication of the shards happens here, so a
        failure in the very first step is covered too.
        """
        self._applied = done
        self._live_valid = True
        if self._replicator is not None and self.spec.elastic.enabled:
            self._replicate(done)

    def leave_epoch(self) -> None:
        """Leave the (possibly broken) process group; held copies stay until the next restore."""
        leave_group()

    @classify_peer_loss(on_loss=lambda self: self._abort_epoch())
    def restore_from_pieces(
        self, pieces_by_space: dict[str, list[tuple[int, int, list[ray.ObjectRef]]]], done: int
    ) -> int:
        """Load the state of step ``done`` from ``(lo, hi, [ref])`` pieces covering this rank's
        space (``pieces_by_space[self.state_space]``).

        A collective in the new epoch (every member calls it): after loading,
        the new shards are replicated at once, so a failure in the epoch's
        first step is covered too.
        """
        try:
            pieces = pieces_by_space[self.state_space]
        except KeyError:
            raise LookupError(
                f"worker {self.rank}: no pieces of space {self.state_space!r} to restore from "
                f"(have {sorted(pieces_by_space)})"
            ) from None
        cache: dict[int, dict[str, torch.Tensor]] = {}

        def read(key: str, lo: int, hi: int) -> torch.Tensor:
            parts = []
            for i, (p_lo, p_hi, ref) in enumerate(pieces):
                a, b = max(lo, p_lo), min(hi, p_hi)
                if a >= b:
                    continue
                if i not in cache:
                    cache[i] = ray.get(ref[0], timeout=_FETCH_S)
                parts.append(cache[i][key][a - p_lo : b - p_lo])
            out = torch.cat(parts) if parts else torch.empty(0)
            if out.numel() != hi - lo:
                raise LookupError(f"pieces do not cover [{lo}, {hi}) of {key!r}")
            return out

        self.engine.load_state(read, done)
        self._applied = done
        if self._replicator is not None and self.spec.elastic.enabled:
            self._replicate(done)
        return done
