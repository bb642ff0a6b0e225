"""Process-group lifecycle: rendezvous, creation and teardown, with explicit timeouts.

The rendezvous is a ``TCPStore`` hosted by rank 0 on an OS-chosen port
(port 0), so there is no race between "find a free port" and "bind it". The
controller asks rank 0 to host the store, then hands ``(host, port)`` to all
ranks; it never touches tensors itself.
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
    dist.init_process_group(
        rdzv.backend, store=store, rank=rank, world_size=rdzv.world_size, timeout=timeout
    )
    if rdzv.backend == "gloo":
        _connections = gloo_sockets.find_connections(store, rank, rdzv.world_size, before)


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
        if dist.is_initialized():
            dist.destroy_process_group()
        _connections = {}


# fd -> socket inode of the current gloo group's peer connections.
_connections: dict[int, int] = {}
_leaving = threading.Lock()
