"""Buddy replication on a real 3-rank gloo group: each rank ends up holding its source's shard."""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from collectives.replication import BuddyReplicator

BOUNDS = [(0, 4), (4, 9), (9, 12)]  # uneven shards


def _shard(rank: int, done: int) -> dict[str, torch.Tensor]:
    lo, hi = BOUNDS[rank]
    base = torch.arange(lo, hi, dtype=torch.float32)
    return {"param": base + 100 * done, "exp_avg": -base - 100 * done}


def _child(rank: int, ws: int, store_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, ws), rank=rank, world_size=ws)
    rep = BuddyReplicator(rank, ws)
    for done in (1, 2):
        tensors = _shard(rank, done)
        rep.replicate(done, *BOUNDS[rank], tensors, BOUNDS[rep.source])
        tensors["param"].zero_()  # the snapshot is a copy, not a view
    result = {
        "own": {d: c.tensors for d, c in rep.own_copies().items()},
        "replica": {d: (c.rank, c.tensors) for d, c in rep.replica_copies().items()},
    }
    torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_replicas_land_on_the_buddy():
    ws = 3
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _child, args=(ws, os.path.join(tmp, "store"), tmp), nprocs=ws, start_method="spawn"
        )
        for rank in range(ws):
            got = torch.load(os.path.join(tmp, f"{rank}.pt"))
            source = (rank - 1) % ws
            assert sorted(got["own"]) == [1, 2] and sorted(got["replica"]) == [1, 2]
            for done in (1, 2):
                assert torch.equal(got["own"][done]["param"], _shard(rank, done)["param"])
                owner, tensors = got["replica"][done]
                assert owner == source
                for key, t in _shard(source, done).items():
                    assert torch.equal(tensors[key], t)
