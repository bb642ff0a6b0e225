"""Buddy replication: every rank keeps its last good shard and a copy of a peer's.

At the end of a step, after its optimizer update, rank ``r`` snapshots the
state it owns (its flat range of parameters and optimizer state, as the
engine's ``checkpoint_slice()`` defines it) into host memory and sends the
snapshot to its buddy, rank ``(r + 1) % n``, while receiving the snapshot of
rank ``(r - 1) % n``. The step returns only after the exchange completed, so
when the controller has seen every rank finish step ``s``:

* every rank holds a snapshot of its own shard as of the end of ``s`` (to roll
  back a later step that a failure interrupted half-way), and
* every rank's shard as of the end of ``s`` also lives on its buddy,

so a single dead rank's shard is rebuilt from host memory with no checkpoint
and no lost step. The exchange is double-buffered: if it fails (a peer died
mid-transfer), the previous, complete pair is kept, and recovery goes back
to that step. When both a rank and its buddy are lost, the replica is gone
too, and the controller falls back to the last checkpoint.

Why at the end of the step, on the critical path: then "committed" simply
means "replicated". Sending during the next step's forward pass would hide
the transfer, but a failure in that step would then lose the last step.
``replicate_every`` trades the transfer's cost against steps redone.
"""

from __future__ import annotations

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
        """Snapshot ``tensors`` (this rank's ``[lo, hi)`` after ``step``) and swap with the buddies.

        ``source_range`` is the flat range the source rank owns (from the
        plan, which every rank knows); it sizes the receive buffer. Blocks
        until sent and received; raises if a peer fails mid-way, keeping the
        previous complete pair.
        """
        keys = list(tensors)
        # The spares are about to be overwritten: until they are complete
        # they hold nothing usable (step -1), whatever they held before.
        with self.lock:
            own = _fill(self._spare_own, self.rank, lo, hi, keys)
            self._spare_own = own
        for k, t in tensors.items():
            own.tensors[k].copy_(t)
        own.step = step  # complete: a valid copy even if the exchange below fails
        replica = None
        if self.world_size > 1:
            src_lo, src_hi = source_range
            with self.lock:
                replica = _fill(self._spare_replica, self.source, src_lo, src_hi, keys)
                self._spare_replica = replica
            works = []
            # The same key order on every rank, so the n-th message of each pair matches.
            for k in keys:
                works.append(dist.isend(own.tensors[k], self.buddy, self.group, _TAG))
                works.append(dist.irecv(replica.tensors[k], self.source, self.group, _TAG))
            for w in works:
                w.wait()
            replica.step = step
        with self.lock:
            self._spare_own, self.own = self.own, own
            self._spare_replica, self.replica = self.replica, replica

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

    def state_bytes(self) -> int:
        """Host memory held for snapshots and replicas, spares included."""
        total = 0
        for copy in (self.own, self.replica, self._spare_own, self._spare_replica):
            if copy is not None:
                total += sum(t.numel() * t.element_size() for t in copy.tensors.values())
        return total
