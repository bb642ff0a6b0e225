"""How much memory a worker can still use: the planner's input for ``shard_weights=auto``.

A GPU worker's budget is its device's free memory. A CPU worker's is what
the OS could give *this process*: the node's ``MemAvailable``, capped by the
memory limit of the process's own cgroup (a container's, or one a cluster
manager set), since a node's free memory says nothing about a worker that a
limit holds to less.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

_UNLIMITED = 1 << 60  # cgroup v1 reports "no limit" as a huge number


def node_available_bytes(meminfo: str = "/proc/meminfo") -> int:
    """Memory the node could give a process now (Linux MemAvailable; total pages elsewhere)."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cgroup_headroom_bytes(
    proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup"
) -> int | None:
    """Limit minus usage of this process's memory cgroup (v2 or v1); None if unlimited."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one unified hierarchy
            base = Path(root, path.lstrip("/"))
            limit_file, usage_file = base / "memory.max", base / "memory.current"
        elif "memory" in controllers.split(","):  # v1
            base = Path(root, "memory", path.lstrip("/"))
            limit_file, usage_file = base / "memory.limit_in_bytes", base / "memory.usage_in_bytes"
        else:
            continue
        try:
            limit = limit_file.read_text().strip()
            usage = int(usage_file.read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= _UNLIMITED:
            continue
        return max(0, int(limit) - usage)
    return None


def worker_available_bytes(device: torch.device) -> int:
    """This worker's memory budget: free device memory on a GPU, else its own host headroom."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    node = node_available_bytes()
    headroom = cgroup_headroom_bytes()
    return node if headroom is None else min(node, headroom)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def fix_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """Make glibc serve every allocation of ``nbytes`` or more with its own mmap.

    glibc raises its mmap threshold each time a large block is freed, after
    which ZeRO-3's per-block gather and gradient buffers come from the heap,
    which it does not hand back: a worker's memory grows to several blocks'
    worth more than it uses. A fixed threshold returns every such buffer to
    the system when it is freed (measured in BENCHMARKS.md: the largest model
    under a memory cap roughly doubles), at the price of fresh page faults
    for each one. Used where memory is the constraint (offloaded
    parameters). Returns False where the C library has no ``mallopt``.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(nbytes)))
    except (OSError, AttributeError):
        return False
