"""A worker's memory budget for ``shard_weights=auto`` (``actors/memory.py``), without Ray."""

from __future__ import annotations

import torch

from actors.memory import cgroup_headroom_bytes, node_available_bytes, worker_available_bytes


def _cgroup(tmp_path, line: str, files: dict[str, str]) -> tuple[str, str]:
    proc = tmp_path / "cgroup"
    proc.write_text(line + "\n")
    for rel, text in files.items():
        path = tmp_path / "fs" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(proc), str(tmp_path / "fs")


def test_v2_limit_minus_usage(tmp_path):
    proc, root = _cgroup(
        tmp_path,
        "0::/job/w1",
        {"job/w1/memory.max": "1000000\n", "job/w1/memory.current": "250000\n"},
    )
    assert cgroup_headroom_bytes(proc, root) == 750000


def test_v1_limit_minus_usage_and_unlimited(tmp_path):
    files = {
        "memory/a/memory.limit_in_bytes": "4096\n",
        "memory/a/memory.usage_in_bytes": "1024\n",
    }
    proc, root = _cgroup(tmp_path, "4:memory:/a", files)
    assert cgroup_headroom_bytes(proc, root) == 3072
    unlimited = {
        "memory/a/memory.limit_in_bytes": str(2**63 - 4096),
        "memory/a/memory.usage_in_bytes": "1",
    }
    proc, root = _cgroup(tmp_path, "4:memory:/a", unlimited)
    assert cgroup_headroom_bytes(proc, root) is None
    proc, root = _cgroup(tmp_path, "0::/b", {"b/memory.max": "max", "b/memory.current": "5"})
    assert cgroup_headroom_bytes(proc, root) is None


def test_a_cpu_worker_never_counts_more_than_the_node_has(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 100 kB\nMemAvailable: 42 kB\n")
    assert node_available_bytes(str(meminfo)) == 42 * 1024
    budget = worker_available_bytes(torch.device("cpu"))
    assert 0 < budget <= node_available_bytes()
