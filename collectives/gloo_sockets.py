"""Find and sever the TCP connections of a gloo process group.

Why this exists: after a collective fails on one rank (a peer died), the
other survivors may still be blocked receiving from *this* rank. gloo closes
its connections only when the last reference to its context is gone, and an
abandoned in-flight operation (or a traceback holding one) keeps it alive;
``ProcessGroup.abort()``, ``shutdown()`` and ``destroy_process_group()``
leave the sockets open in torch 2.13 (tested: the blocked peer waits for the
whole collective timeout). Shutting this rank's sockets down makes every
peer's pending receive fail at once ("Connection closed by peer"); those
peers sever theirs in turn, so a failure spreads through the group in
milliseconds.

Which sockets are gloo's: a Ray worker opens TCP connections of its own at
any time (its gRPC server accepts callers), so "sockets that appeared during
init" is not enough. Each gloo connection has one end on some rank's gloo
listener, so the ranks publish their listener addresses (IP and port)
through the rendezvous store and a connection is ours only if it appeared
during init *and* has an end on one of those addresses. (Ports alone are not
enough: a connection of Ray's to another IP may get an ephemeral port that
equals a gloo listener's; the tests saw it happen.) Linux only (``/proc``);
elsewhere nothing is severed and blocked peers wait for the collective
timeout as before.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch.distributed as dist

_LISTEN = 0x0A  # TCP_LISTEN in /proc/net/tcp's "st" column
_KEY = "shoal/gloo-listeners/{rank}"


# Addresses as /proc/net/tcp writes them (hex); a listener bound to the
# wildcard address accepts on every local address.
_ANY = frozenset({"0" * 8, "0" * 32})


@dataclass(frozen=True)
class TcpSocket:
    inode: int
    local: tuple[str, int]  # (address in /proc's hex form, port)
    remote: tuple[str, int]
    listening: bool


def open_tcp_sockets() -> dict[int, TcpSocket]:
    """fd -> TCP socket, for this process (empty where /proc is missing)."""
    table = _tcp_table()
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return {}
    out = {}
    for name in names:
        try:
            link = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # closed meanwhile
        if link.startswith("socket:["):
            sock = table.get(int(link[len("socket:[") : -1]))
            if sock is not None:
                out[int(name)] = sock
    return out


def find_connections(
    store: dist.Store, rank: int, world_size: int, before: dict[int, TcpSocket]
) -> dict[int, int]:
    """fd -> inode of the peer connections gloo opened since ``before`` was taken.

    A collective over ``store``: every rank must call it right after joining.
    """
    new = {fd: s for fd, s in open_tcp_sockets().items() if before.get(fd) != s}
    mine = {s.local for s in new.values() if s.listening}
    store.set(_KEY.format(rank=rank), ",".join(f"{a}:{p}" for a, p in sorted(mine)))
    listeners: set[tuple[str, int]] = set()
    for r in range(world_size):
        for entry in store.get(_KEY.format(rank=r)).decode().split(","):
            if entry:
                addr, port = entry.rsplit(":", 1)
                listeners.add((addr, int(port)))
    return {
        fd: s.inode
        for fd, s in new.items()
        if not s.listening and (_on(s.local, mine) or _on(s.remote, listeners))
    }


def _on(end: tuple[str, int], listeners: set[tuple[str, int]]) -> bool:
    """Whether a connection end is one of ``listeners`` (wildcard-bound ones included)."""
    _, port = end
    return end in listeners or any((any_addr, port) in listeners for any_addr in _ANY)


def sever(connections: dict[int, int]) -> int:
    """Shut down ``connections`` (fd -> inode); returns how many were still open.

    gloo may close a failed pair's socket from its own thread at any moment,
    and the OS may reuse the number, so each fd is first duplicated (which
    pins whatever socket it names now) and shut down only if that is still
    the same socket. Shutting down acts on the socket, not on the number;
    the original fd stays gloo's to close.
    """
    severed = 0
    for fd, inode in connections.items():
        try:
            pinned = os.dup(fd)
        except OSError:
            continue  # already closed by gloo
        try:
            if os.fstat(pinned).st_ino != inode:
                continue  # the number now names something else
            sock = socket.socket(fileno=pinned)
            try:
                sock.shutdown(socket.SHUT_RDWR)
                severed += 1
            except OSError:
                pass  # already reset by the peer
            finally:
                sock.detach()
        except OSError:
            continue
        finally:
            os.close(pinned)
    return severed


def _tcp_table() -> dict[int, TcpSocket]:
    """inode -> socket, from /proc/net/tcp and tcp6 (this network namespace)."""
    out = {}
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)  # header
                for line in f:
                    cols = line.split()
                    inode = int(cols[9])
                    if inode == 0:
                        continue  # TIME_WAIT and the like: no socket behind it
                    out[inode] = TcpSocket(
                        inode=inode,
                        local=_end(cols[1]),
                        remote=_end(cols[2]),
                        listening=int(cols[3], 16) == _LISTEN,
                    )
        except FileNotFoundError:
            continue
    return out


def _end(column: str) -> tuple[str, int]:
    """``"0100007F:96D3"`` -> ``("0100007F", 38611)``."""
    addr, port = column.rsplit(":", 1)
    return addr, int(port, 16)
