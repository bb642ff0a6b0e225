"""Process-group lifecycle: rendezvous, creation and teardown, with explicit timeouts.

The rendezvous is a ``TCPStore`` hosted by rank 0 on an OS-chosen port
(port 0), so there is no race between "find a free port" and "bind it". The
controller asks rank 0 to host the store, then hands ``(host, port)`` to all
ranks; it never touches tensors itself.

From that one rendezvous every rank builds the default group and the
**named sub-groups** a program asks for, one per axis: ``{"dp": [[0, 2],
[1, 3]], "pp": [[0, 1], [2, 3]]}`` partitions the ranks into data-parallel
and pipeline groups. Every membership change ends them all, and the next
epoch builds them anew. On GPUs the default group is ``cpu:gloo,cuda:nccl``:
NCCL for device tensors, gloo for host memory (buddy replicas).
"""

from __future__ import annotations

import datetime
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from collectives import gloo_sockets


@dataclass(frozen=True)
class Rendezvous:
    host: str
    port: int
    world_size: int
    backend: str  # "gloo" or "nccl"
    timeout_s: float
    # Named sub-groups, axis -> a partition of the ranks (None: the default group only).
    subgroups: dict[str, list[list[int]]] | None = None
    epoch: int = 0  # the job's epoch this group belongs to (for logs)


def default_backend(use_cuda: bool) -> str:
    return "nccl" if use_cuda and torch.cuda.is_available() else "gloo"


def host_store(host: str, world_size: int, timeout_s: float) -> dist.TCPStore:
    """Start the rendezvous store on this process (rank 0); its ``.port`` is the chosen port."""
    return dist.TCPStore(
        host,
        0,
        world_size=world_size,
        is_master=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def join_group(rdzv: Rendezvous, rank: int, store: dist.TCPStore | None = None) -> None:
    """Join the default process group; ``store`` is the hosted store on rank 0.

    Blocks until all ``world_size`` ranks have joined or ``timeout_s`` passes
    (then raises). The same timeout bounds every later collective, so a dead
    peer turns into an error instead of a hang.
    """
    global _connections
    before = gloo_sockets.open_tcp_sockets()
    timeout = datetime.timedelta(seconds=rdzv.timeout_s)
    if store is None:
        store = dist.TCPStore(
            rdzv.host, rdzv.port, world_size=rdzv.world_size, is_master=False, timeout=timeout
        )
    # NCCL moves device memory only; replicas live in host memory and need gloo.
    backend = "cpu:gloo,cuda:nccl" if rdzv.backend == "nccl" else rdzv.backend
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=rdzv.world_size, timeout=timeout
    )
    _subgroups.clear()
    for axis, partition in sorted((rdzv.subgroups or {}).items()):
        _subgroups[axis] = _join_axis(axis, partition, rank, rdzv.world_size, timeout)
    # After the sub-groups: their connections are severed with the default
    # group's, or a peer blocked in a sub-group collective would wait out the timeout.
    if rdzv.backend == "gloo":
        _connections = gloo_sockets.find_connections(store, rank, rdzv.world_size, before)


def _join_axis(
    axis: str, partition: list[list[int]], rank: int, world_size: int, timeout: datetime.timedelta
) -> dist.ProcessGroup:
    """This rank's group of ``axis``; every rank creates every group, in the same order."""
    members = sorted(r for group in partition for r in group)
    if members != list(range(world_size)):
        raise ValueError(
            f"sub-groups of axis {axis!r} must partition ranks 0..{world_size - 1}, got {partition}"
        )
    mine = None
    for group_ranks in partition:
        group = dist.new_group(sorted(group_ranks), timeout=timeout)
        if rank in group_ranks:
            mine = group
    return mine


def subgroup(axis: str) -> dist.ProcessGroup:
    """This rank's process group along ``axis`` (e.g. ``"dp"``) in the current epoch."""
    try:
        return _subgroups[axis]
    except KeyError:
        raise KeyError(f"no sub-group {axis!r} in this epoch (have {sorted(_subgroups)})") from None


def sever_group() -> int:
    """Shut down this rank's connections to its peers; returns how many.

    Called after a collective failed here, so that peers still blocked
    receiving from this rank fail at once instead of at the collective
    timeout (see ``collectives/gloo_sockets.py`` for why gloo needs this).
    NCCL groups are left alone.
    """
    return gloo_sockets.sever(_connections)


def leave_group() -> None:
    """Tear down the default process group, if any (safe to call twice, and from two threads).

    A worker's training thread leaves when a collective fails, and its
    control thread when the controller ends the epoch; these can coincide.
    """
    global _connections
    with _leaving:
        _subgroups.clear()
        if dist.is_initialized():
            dist.destroy_process_group()  # with the default group go all its sub-groups
        _connections = {}


# fd -> socket inode of the current gloo group's peer connections.
_connections: dict[int, int] = {}
# axis -> this rank's sub-group in the current epoch.
_subgroups: dict[str, dist.ProcessGroup] = {}
_leaving = threading.Lock()
