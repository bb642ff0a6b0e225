"""Buddy replication: every rank keeps recent snapshots of its shard and copies of a peer's.

At the end of a step, after its optimizer update, rank ``r`` snapshots the
state it owns (its flat range of parameters and optimizer state, as the
engine's ``checkpoint_slice()`` defines it) into host memory and sends the
snapshot to its buddy, rank ``(r + 1) % n``, while receiving the snapshot of
its source, rank ``(r - 1) % n``.

**Off the critical path** (``overlap=True``, ``elastic.replication=async``):
the step waits for neither the snapshot nor the exchange. The shard is sent
to the buddy straight from the live tensors, in gloo's own threads, while a
background thread copies it into host memory; both overlap the next step's
forward and backward, which do not change the shard, and that step waits for
them only before its optimizer update (``wait_until_copied()``). The
exchange is *settled* (waited for, the received copy marked complete) at the
end of that next step, or as soon as the controller asks what this rank
holds. A step's state is therefore safe against the loss of any one rank
once its exchange has settled, one step after the step itself. If a rank
dies before its last exchange landed (a node lost in the moment right after
a step), its buddy holds its shard as of the step before, and the job goes
back one step. For that, every rank must still hold its own snapshot of that
step, even if it has finished one more step meanwhile: ranks keep **three**
own snapshots (steps ``s``, ``s-1``, ``s-2`` after finishing ``s``). A
fourth is never needed: no rank can finish a step after the one the dead
rank missed, as that step's collectives need the dead rank.

**On the critical path** (``overlap=False``, ``elastic.replication=sync``):
the step returns only after its exchange settled, so every step whose result
reached the controller is on two ranks, and a single failure never sends the
job back. Two own snapshots suffice.

Either way the received copies are double-buffered (the one being received
and the last complete one), a buffer is reused only after the exchange that
used it settled, and when a rank and its buddy are both lost the replica is
gone too: the controller falls back to the last checkpoint.
``replicate_every`` trades the exchange's cost against steps redone.

**Devices.** Snapshots and replicas are host memory whatever the training
device: holding them is what frees the accelerator from a second copy of
the state. The exchange therefore moves host memory, over a group with a
gloo backend (on GPU jobs: a ``cpu:gloo,cuda:nccl`` default group, or a gloo
side group, passed as ``group``). NCCL moves device memory only, and
receiving into the device would hold the source's shard there, so an NCCL-only
group is refused at the first exchange. When the state lives on a device,
the snapshot is copied to the host first and sent from there (gloo reads
what it sends as host memory), so with ``overlap`` the copy is made on the
step's path and ``wait_until_copied()`` waits for the sends: only the
receive overlaps the next step.
"""

from __future__ import annotations

import datetime
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.distributed as dist

from storage.tiers import copy_flat

# Point-to-point tag for replica traffic, apart from anything else on the group.
_TAG = 7_000
REPLICA_BUFFERS = 2


@dataclass(eq=False)  # a buffer: compared by identity, never by its tensors
class ShardCopy:
    """Rank ``rank``'s owned range ``[lo, hi)`` of state space ``space`` after step ``step``.

    ``step`` is -1 while the buffer is being written (it holds nothing usable).
    """

    rank: int
    space: str  # the named state space the range is of ("dp", "stage/2", ...)
    step: int
    lo: int
    hi: int
    tensors: dict[str, torch.Tensor]


@dataclass
class _Exchange:
    """An exchange in flight: ``replica`` is complete once every one of ``receives`` is."""

    step: int
    replica: ShardCopy
    sends: list
    receives: list | None = None  # None: posting them failed (the source is gone)


def _wait_all(works: list, deadline: float | None) -> RuntimeError | None:
    """Wait for every work until ``deadline`` (``time.monotonic()``; None: no limit).

    Returns the first error (a failed peer, or the deadline passed), else None.
    """
    failure = None
    for w in works:
        try:
            if deadline is None:
                w.wait()
            else:
                left = max(deadline - time.monotonic(), 0.001)
                w.wait(datetime.timedelta(seconds=left))
        except RuntimeError as e:  # DistError is a RuntimeError
            failure = failure or e
    return failure


def _copy_into(copy: ShardCopy, tensors: dict[str, torch.Tensor], step: int) -> None:
    for k, t in tensors.items():
        copy_flat(copy.tensors[k], t)  # offloaded state (TierFlat): read chunk by chunk
    copy.step = step  # complete: a valid copy whatever happens to the exchange


class _Ring:
    """Up to ``capacity`` copy buffers; hands out the one to overwrite next."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.buffers: list[ShardCopy] = []  # oldest first

    def take(
        self, rank: int, space: str, lo: int, hi: int, dtypes: dict[str, torch.dtype]
    ) -> ShardCopy:
        """A host buffer for a new copy (a tensor per key, of its dtype), marked incomplete,
        moved to the newest end.

        An incomplete buffer (an exchange that failed) is reused before the
        oldest complete one, so no complete copy is dropped needlessly.
        """
        if len(self.buffers) < self.capacity:
            buf = None
        else:
            incomplete = [b for b in self.buffers if b.step < 0]
            buf = incomplete[0] if incomplete else self.buffers[0]
            self.buffers.remove(buf)
        if (
            buf is None
            or (buf.lo, buf.hi) != (lo, hi)
            or {k: t.dtype for k, t in buf.tensors.items()} != dtypes
        ):
            host = {k: torch.empty(hi - lo, dtype=d, device="cpu") for k, d in dtypes.items()}
            buf = ShardCopy(rank, space, -1, lo, hi, host)
        buf.rank, buf.space, buf.step = rank, space, -1
        self.buffers.append(buf)
        return buf

    def complete(self) -> dict[int, ShardCopy]:
        return {b.step: b for b in self.buffers if b.step >= 0}


class BuddyReplicator:
    """Snapshots this rank's shard and exchanges it with the neighbours on a ring."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        group: dist.ProcessGroup | None = None,
        overlap: bool = True,
    ):
        self.rank = rank
        self.world_size = world_size
        self.group = group
        self.overlap = overlap
        # Held while buffers change hands: the controller asks what this rank
        # holds from another thread, possibly while a step is stuck.
        self.lock = threading.Lock()
        self._own = _Ring(3 if overlap else 2)
        self._replicas = _Ring(REPLICA_BUFFERS)
        self._pending: _Exchange | None = None  # started, not yet settled
        # With overlap, the local copy is made on this background thread
        # while the next step computes.
        self._background: ThreadPoolExecutor | None = None
        self._copying: Future | None = None
        # Held through a whole replicate() or settle(), so that no exchange
        # reuses a buffer an earlier one may still be writing.
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
        *,
        space: str,
        source_space: str | None = None,
    ) -> None:
        """Snapshot ``tensors`` (this rank's ``[lo, hi)`` of ``space`` after ``step``) and start
        the exchange.

        ``source_range`` is the range the source rank owns of ``source_space``
        (by default ``space``: under data parallelism every rank owns a range
        of the same space; a pipeline's neighbour owns another stage's). Both
        come from the plan, which every rank knows; the range sizes the
        receive buffer, and the space labels the copy. First
        settles the previous exchange, raising if a peer failed during it.
        With ``overlap`` the sends go out from ``tensors`` themselves at
        once and the local copy is made in the background, so the caller
        must ``wait_until_copied()`` before changing ``tensors``; the
        exchange is settled by the next ``settle()``. Without, the exchange
        is sent from the copy and settled before returning.
        """
        with self._exchanging:
            self.settle()
            dtypes = {k: t.dtype for k, t in tensors.items()}
            with self.lock:
                own = self._own.take(self.rank, space, lo, hi, dtypes)
                replica = None
                if self.world_size > 1:
                    of = space if source_space is None else source_space
                    replica = self._replicas.take(self.source, of, *source_range, dtypes)
            # State offloaded to NVMe (a TierFlat) is no tensor gloo can send from.
            on_host = all(
                isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in tensors.values()
            )
            if not self.overlap or not on_host:
                # Device tensors go out from the host snapshot: gloo sends host memory.
                _copy_into(own, tensors, step)
                self._post(step, own.tensors, replica)
                if not self.overlap:
                    self.settle()
                return
            # Sending from the live tensors starts the transfer at once, not
            # after the copy: the moment after a step in which this rank's
            # loss would cost the step is as short as the transfer.
            self._post(step, tensors, replica)
            if self._background is None:
                self._background = ThreadPoolExecutor(1, thread_name_prefix="shoal-replica")
            self._copying = self._background.submit(_copy_into, own, tensors, step)

    def _post(
        self, step: int, send_from: dict[str, torch.Tensor], replica: ShardCopy | None
    ) -> None:
        if replica is None:
            return
        backend = str(dist.get_backend(self.group))
        if "gloo" not in backend:
            raise ValueError(
                f"buddy replication moves host memory and needs a gloo backend; the group's is "
                f"{backend!r} (make the default group 'cpu:gloo,cuda:nccl', or pass a gloo group)"
            )
        keys = list(send_from)
        # The same key order on every rank, so the n-th message of each pair
        # matches. Every send is posted before any receive: if the source
        # is gone (posting to it raises), the buddy still gets this copy.
        sends = [dist.isend(send_from[k], self.buddy, self.group, _TAG) for k in keys]
        self._pending = _Exchange(step, replica, sends=sends)
        self._pending.receives = [
            dist.irecv(replica.tensors[k], self.source, self.group, _TAG) for k in keys
        ]

    def wait_until_copied(self) -> None:
        """Block until the last ``replicate()`` no longer reads the tensors it was given.

        That is, until its local copy is made and its sends are out. Call it
        before changing those tensors (the optimizer update). Raises if the
        buddy failed meanwhile.
        """
        with self._exchanging:
            if self._copying is not None:
                self._copying.result()
            if self._pending is not None:
                # A gloo send may be waited for only once: settle() will not again.
                sends, self._pending.sends = self._pending.sends, []
                for w in sends:
                    w.wait()

    def settle(self, timeout_s: float | None = None) -> bool:
        """Wait for the exchange in flight, if any; returns whether its replica is complete.

        The replica is complete when every receive is, whatever became of
        this rank's sends (its buddy may be the one that died). With
        ``timeout_s`` None (the training path) a failed peer raises. The
        controller's queries pass a timeout and get the outcome instead; an
        exchange that has not landed by then is given up (the copy stays
        incomplete), and so is the wait for another thread's exchange.
        """
        if not self._exchanging.acquire(timeout=-1 if timeout_s is None else timeout_s):
            return False
        try:
            copying = self._copying
            if copying is not None:
                try:
                    copying.result(timeout=timeout_s)
                except TimeoutError:  # still copying; the copy is not offered yet
                    return False
                self._copying = None
            pending, self._pending = self._pending, None
            if pending is None:
                return True
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            if pending.receives is None:
                received = RuntimeError(f"rank {self.rank}: no receive from rank {self.source}")
            else:
                received = _wait_all(pending.receives, deadline)
            if received is None:
                with self.lock:
                    pending.replica.step = pending.step
            sent = _wait_all(pending.sends, deadline)
            failure = received or sent
            if failure is not None and timeout_s is None:
                raise failure
            return received is None
        finally:
            self._exchanging.release()

    def own_copies(self) -> dict[int, ShardCopy]:
        """This rank's complete snapshots, by step."""
        with self.lock:
            return self._own.complete()

    def replica_copies(self) -> dict[int, ShardCopy]:
        """The source rank's complete snapshots held here, by step."""
        with self.lock:
            return self._replicas.complete()
