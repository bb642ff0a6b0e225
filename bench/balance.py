"""Unequal workers: does ``train.balance=auto`` beat an equal batch split?

Two shoal workers train the same model on the same global batches. Worker 1
is limited to half a CPU with a CFS quota (a cgroup v1 ``cpu`` group with
``cpu.cfs_quota_us`` = half of ``cpu.cfs_period_us``; needs root), worker 0
is not. The same job runs with ``train.balance=equal`` and with
``train.balance=auto`` (batch shares re-planned from measured throughput
every few steps), and the median step time after warm-up is compared. The
losses of both runs are printed side by side: balancing changes who
computes which samples, not what is computed.

    python bench/balance.py --model gpt_tiny --steps 80
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray

from orchestrator import JobSpec, JobState, submit

CGROUP = Path("/sys/fs/cgroup/cpu/shoal-bench-half-cpu")


@dataclass
class Result:
    balance: str
    median_step_s: float
    final_shares: list[int]
    losses: list[float]


def half_cpu_group() -> Path:
    """A cgroup v1 cpu group limited to 50% of one CPU."""
    if not CGROUP.parent.is_dir():
        raise SystemExit("needs the cgroup v1 cpu controller at /sys/fs/cgroup/cpu (and root)")
    CGROUP.mkdir(exist_ok=True)
    period = int((CGROUP / "cpu.cfs_period_us").read_text())
    (CGROUP / "cpu.cfs_quota_us").write_text(str(period // 2))
    return CGROUP


def throttle(pid: int, group: Path) -> None:
    """Move every thread of ``pid`` into ``group``."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            (group / "tasks").write_text(tid)
        except OSError:
            pass  # the thread ended meanwhile


def run(balance: str, args: argparse.Namespace, run_dir: str, group: Path) -> Result:
    spec = JobSpec.from_overrides(
        [
            f"model={args.model}",
            "cluster.workers=2",
            f"train.steps={args.steps}",
            f"train.global_batch={args.global_batch}",
            f"train.balance={balance}",
            "train.balance_every=5",
            "train.sample_tokens=0",
            "checkpoint.every=0",
            f"run_dir={run_dir}/{balance}",
        ]
    )
    handle = submit(spec)
    while handle.status().state != JobState.RUNNING:
        time.sleep(0.1)
    throttle(handle.worker_pids()[1], group)
    status = handle.wait()
    assert status.state == JobState.SUCCEEDED, status.error
    metrics = handle.metrics()
    steady = [m["step_time_s"] for m in metrics[args.warmup :]]
    return Result(
        balance, statistics.median(steady), metrics[-1]["batch"], [m["loss"] for m in metrics]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt_tiny")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--global-batch", type=int, default=32)
    args = p.parse_args()
    group = half_cpu_group()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            results = [run(b, args, tmp, group) for b in ("equal", "auto")]
    finally:
        ray.shutdown()
    print(f"load average: {os.getloadavg()}")
    print(f"{'balance':8} {'median step (s)':>16} {'final batch shares':>20}")
    for r in results:
        print(f"{r.balance:8} {r.median_step_s:16.3f} {str(r.final_shares):>20}")
    equal, auto = results
    print(f"auto / equal step time: {auto.median_step_s / equal.median_step_s:.2f}")
    diff = max(abs(a - b) for a, b in zip(equal.losses, auto.losses, strict=True))
    print(f"max loss difference between the two runs: {diff:.2e}")


if __name__ == "__main__":
    main()
