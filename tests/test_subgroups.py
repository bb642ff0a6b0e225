"""Named process sub-groups built from one rendezvous (``collectives/process_group.py``)."""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from collectives.process_group import Rendezvous, host_store, join_group, leave_group, subgroup

WORLD = 4
AXES = {"dp": [[0, 2], [1, 3]], "pp": [[0, 1], [2, 3]]}


def _child(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    store = host_store("127.0.0.1", WORLD, 60.0) if rank == 0 else None
    if store is not None:  # rank 0 hosts on an OS-chosen port: tell the others
        Path(out_dir, "port.tmp").write_text(str(store.port))
        Path(out_dir, "port.tmp").rename(Path(out_dir, "port"))  # atomic: never read half-written
    else:
        while not Path(out_dir, "port").exists():
            time.sleep(0.01)
    port = int(Path(out_dir, "port").read_text())
    join_group(Rendezvous("127.0.0.1", port, WORLD, "gloo", 60.0, subgroups=AXES), rank, store)
    sums = {}
    for axis in AXES:
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=subgroup(axis))
        sums[axis] = t.item()
    world = torch.tensor([1.0])
    dist.all_reduce(world)
    sums["world"] = world.item()
    leave_group()
    try:
        subgroup("dp")
        sums["after_leave"] = "still there"
    except KeyError:
        sums["after_leave"] = "gone"
    Path(out_dir, f"{rank}.json").write_text(json.dumps(sums))


@pytest.mark.timeout(180)
def test_each_rank_reduces_within_its_own_group_of_each_axis(tmp_path):
    mp.start_processes(_child, args=(str(tmp_path),), nprocs=WORLD, start_method="spawn")
    got = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(WORLD)]
    # dp groups {0,2} and {1,3}: sums 2 and 4; pp groups {0,1} and {2,3}: sums 1 and 5.
    assert [g["dp"] for g in got] == [2.0, 4.0, 2.0, 4.0]
    assert [g["pp"] for g in got] == [1.0, 1.0, 5.0, 5.0]
    assert all(g["world"] == WORLD and g["after_leave"] == "gone" for g in got)


def test_a_partition_that_misses_a_rank_is_refused():
    from collectives.process_group import _join_axis

    with pytest.raises(ValueError, match="must partition ranks 0..3"):
        _join_axis("dp", [[0, 1], [2]], 0, 4, datetime.timedelta(seconds=1))
