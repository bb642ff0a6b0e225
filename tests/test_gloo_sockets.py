"""Severing a gloo group: peers blocked on this rank fail at once; other sockets are untouched.

A real 3-rank gloo group in spawned processes. Rank 2 keeps an in-flight
receive alive (which keeps gloo's connections open past
``destroy_process_group``), then severs; rank 0, blocked receiving from
rank 2, must fail with a closed connection, not with the collective
timeout. Meanwhile unrelated loopback connections, opened while the group
formed (as Ray's gRPC server accepts callers at any time), must survive.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import tempfile
import threading

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from collectives import process_group
from collectives.process_group import Rendezvous, join_group, leave_group, sever_group

WORLD = 3
TIMEOUT_S = 60.0  # what rank 0 would wait for if severing did not work


class _Chatter:
    """Opens loopback connections in the background until stopped; keeps them all open."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            client = socket.create_connection(self.server.getsockname())
            accepted, _ = self.server.accept()
            self.pairs.append((client, accepted))
            self._stop.wait(0.005)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def fds(self) -> set[int]:
        return {s.fileno() for pair in self.pairs for s in pair}

    def all_alive(self) -> bool:
        for client, accepted in self.pairs:
            client.sendall(b"x")
            if accepted.recv(1) != b"x":
                return False
        return True


def _child(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    chatter = _Chatter()
    join_group(Rendezvous("127.0.0.1", port, WORLD, "gloo", TIMEOUT_S), rank)
    chatter.stop()
    report: dict = {
        "connections": len(process_group._connections),
        "chatter_opened": len(chatter.pairs),
        "chatter_taken": len(chatter.fds() & set(process_group._connections)),
    }
    store = dist.distributed_c10d._get_default_store()
    t = torch.zeros(4)
    if rank == 2:
        pending = dist.irecv(t, src=1)  # never matched: holds gloo's context open
        store.wait(["rank0-receiving"])
        report["severed"] = sever_group()
        leave_group()
        del pending
    elif rank == 0:
        store.set("rank0-receiving", "1")
        try:
            dist.recv(t, src=2)
            report["recv"] = "completed"
        except RuntimeError as e:
            report["recv"] = str(e)
        leave_group()
    else:
        store.wait(["rank0-receiving"])
        leave_group()
    report["chatter_alive"] = chatter.all_alive()
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump(report, f)


def test_sever_wakes_a_peer_blocked_on_this_rank_and_spares_other_sockets():
    store = dist.TCPStore(
        "127.0.0.1",
        0,
        WORLD,
        is_master=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_child, args=(store.port, tmp), nprocs=WORLD, start_method="spawn")
        reports = []
        for rank in range(WORLD):
            with open(os.path.join(tmp, f"{rank}.json")) as f:
                reports.append(json.load(f))
    for r in reports:
        assert r["connections"] == WORLD - 1  # one per peer: the full mesh
        assert r["chatter_opened"] > 0 and r["chatter_taken"] == 0
        assert r["chatter_alive"]
    assert reports[2]["severed"] == WORLD - 1
    assert "closed" in reports[0]["recv"].lower(), reports[0]["recv"]
