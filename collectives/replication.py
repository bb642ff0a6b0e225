"""Buddy replication: every rank keeps its last good shard and a copy of a peer's.

At the end of a step, after its optimizer update, rank ``r`` snapshots the
state it owns (its flat range of parameters and optimizer state, as the
engine's ``checkpoint_slice()`` defines it) into host memory and starts
sending the snapshot to its buddy, rank ``(r + 1) % n``, while receiving the
snapshot of rank ``(r - 1) % n``. The step does not wait for the exchange:
it completes during the next step's compute (off the critical path), and is
settled (waited for, and the received copy marked complete) at the end of
that next step, or as soon as the controller asks what this rank holds.

What a failure finds, then, when the controller has seen every rank finish
step ``s``: every survivor has a snapshot of its own shard as of ``s`` (a
local copy, complete at once), and the dead rank's shard as of ``s`` is on
its buddy as soon as the exchange of ``s`` has settled. That exchange was
started before the dead rank returned step ``s``, so its bytes were already
on their way; settling waits for them (a dead source's connection fails the
receive at once instead). Only if they never arrived does recovery go back
to the previous exchange, one step earlier: the buffers are double-buffered,
so that pair is still complete. (Unless an exchange takes longer than a
whole step, e.g. large shards on a slow link: then the other ranks may have
reused their older snapshot before the failure, no step is complete in
memory, and recovery falls back to the checkpoint. A third own snapshot
would close that window for one more shard copy of host memory.) When both
a rank and its buddy are lost, the replica is gone too, and the controller
falls back to the last checkpoint.
``replicate_every`` trades the exchange's cost against steps redone.
"""

from __future__ import annotations

import datetime
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Point-to-point tag for replica traffic, apart from anything else on the group.
_TAG = 7_000


@dataclass
class ShardCopy:
    """Rank ``rank``'s owned flat range ``[lo, hi)`` as of the end of step ``step``."""

    rank: int
    step: int
    lo: int
    hi: int
    tensors: dict[str, torch.Tensor]


def _fill(spare: ShardCopy | None, rank: int, lo: int, hi: int, keys: list[str]) -> ShardCopy:
    """A buffer of the right shape (reusing ``spare`` when it fits), marked incomplete (step -1)."""
    if spare is None or (spare.lo, spare.hi) != (lo, hi) or list(spare.tensors) != keys:
        return ShardCopy(rank, -1, lo, hi, {k: torch.empty(hi - lo) for k in keys})
    spare.rank, spare.step = rank, -1
    return spare


@dataclass
class _Exchange:
    """An exchange in flight: ``replica`` is complete once every one of ``receives`` is."""

    step: int
    replica: ShardCopy
    receives: list
    sends: list


def _wait_all(works: list, timeout_s: float | None) -> RuntimeError | None:
    """Wait for every work; the first error (a failed peer, or the timeout), else None."""
    failure = None
    for w in works:
        try:
            if timeout_s is None:
                w.wait()
            else:
                w.wait(datetime.timedelta(seconds=timeout_s))
        except RuntimeError as e:
            failure = failure or e
    return failure


class BuddyReplicator:
    """Keeps ``own`` (this rank's snapshot) and ``replica`` (the source rank's), same step."""

    def __init__(self, rank: int, world_size: int, group: dist.ProcessGroup | None = None):
        self.rank = rank
        self.world_size = world_size
        self.group = group
        # Held while buffers change hands: the controller may ask what this rank
        # holds from another thread while a step is stuck in a collective.
        self.lock = threading.Lock()
        self.own: ShardCopy | None = None
        self.replica: ShardCopy | None = None
        self._spare_own: ShardCopy | None = None
        self._spare_replica: ShardCopy | None = None
        self._pending: _Exchange | None = None  # started, not yet settled
        # Held through a whole replicate() or settle(): the control thread's
        # settle must not let a new exchange reuse the buffer still receiving.
        self._exchanging = threading.RLock()

    @property
    def buddy(self) -> int:
        return (self.rank + 1) % self.world_size

    @property
    def source(self) -> int:
        """The rank whose replica this rank holds."""
        return (self.rank - 1) % self.world_size

    def replicate(
        self,
        step: int,
        lo: int,
        hi: int,
        tensors: dict[str, torch.Tensor],
        source_range: tuple[int, int],
    ) -> None:
        """Snapshot ``tensors`` (this rank's ``[lo, hi)`` after ``step``); start the exchange.

        ``source_range`` is the flat range the source rank owns (from the
        plan, which every rank knows); it sizes the receive buffer. First
        settles the previous exchange (raising if a peer failed during it);
        the new one runs in the background until the next call or
        ``settle()``.
        """
        with self._exchanging:
            self.settle()
            keys = list(tensors)
            # The spares are about to be overwritten: until they are complete
            # they hold nothing usable (step -1), whatever they held before.
            with self.lock:
                own = _fill(self._spare_own, self.rank, lo, hi, keys)
                self._spare_own = own
            for k, t in tensors.items():
                own.tensors[k].copy_(t)
            own.step = step  # complete: a valid copy whatever happens to the exchange
            with self.lock:
                self._spare_own, self.own = self.own, own
            if self.world_size == 1:
                return
            src_lo, src_hi = source_range
            with self.lock:
                replica = _fill(self._spare_replica, self.source, src_lo, src_hi, keys)
                self._spare_replica = replica
            sends, receives = [], []
            # The same key order on every rank, so the n-th message of each pair matches.
            for k in keys:
                sends.append(dist.isend(own.tensors[k], self.buddy, self.group, _TAG))
                receives.append(dist.irecv(replica.tensors[k], self.source, self.group, _TAG))
            with self.lock:
                self._pending = _Exchange(step, replica, receives, sends)

    def settle(self, timeout_s: float | None = None) -> bool:
        """Wait for the exchange in flight, if any; returns whether its replica is complete.

        The replica is complete when every receive is, whatever became of
        this rank's sends (its buddy may be the one that died). If a peer
        failed (or ``timeout_s`` passed), the error is raised only when
        ``timeout_s`` is None (the training path); the controller's queries
        pass a timeout and get the outcome instead.
        """
        with self._exchanging:
            with self.lock:
                pending, self._pending = self._pending, None
            if pending is None:
                return True
            received = _wait_all(pending.receives, timeout_s)
            if received is None:
                with self.lock:
                    pending.replica.step = pending.step
                    self._spare_replica, self.replica = self.replica, pending.replica
            sent = _wait_all(pending.sends, timeout_s)
            failure = received or sent
            if failure is not None and timeout_s is None:
                raise failure
            return received is None

    def own_copies(self) -> dict[int, ShardCopy]:
        """This rank's complete snapshots by step (the newest and, if intact, the one before)."""
        with self.lock:
            copies = (self._spare_own, self.own)
            return {c.step: c for c in copies if c is not None and c.step >= 0}

    def replica_copies(self) -> dict[int, ShardCopy]:
        """The source rank's complete snapshots held here, by step."""
        with self.lock:
            copies = (self._spare_replica, self.replica)
            return {c.step: c for c in copies if c is not None and c.step >= 0}

    def forget(self) -> None:
        """Drop everything (a new epoch with a new plan starts from fresh snapshots)."""
        self.own = self.replica = self._spare_own = self._spare_replica = None
        self._pending = None

    def state_bytes(self) -> int:
        """Host memory held for snapshots and replicas, spares included."""
        total = 0
        for copy in (self.own, self.replica, self._spare_own, self._spare_replica):
            if copy is not None:
                total += sum(t.numel() * t.element_size() for t in copy.tensors.values())
        return total
