"""Unequal workers: does ``train.balance=auto`` beat an equal batch split?

Two shoal workers train the same model on the same global batches. Worker 0
gets core 0 to itself; worker 1 shares core 1 with a busy-loop process, so
it runs at about half speed (every thread of each process is pinned with
``sched_setaffinity``). The same job runs twice, with ``train.balance=equal``
and ``train.balance=auto`` (batch shares re-planned from measured
throughput every few steps), and the median step time after warm-up is
compared. Losses of both runs are printed side by side: balancing changes
who computes which samples, not what is computed.

    python bench/balance.py --model gpt_small --steps 40
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from dataclasses import dataclass

import ray

from orchestrator import JobSpec, JobState, submit


@dataclass
class Result:
    balance: str
    median_step_s: float
    final_shares: list[int]
    losses: list[float]


def _spin(core: int) -> None:
    os.sched_setaffinity(0, {core})
    while True:
        pass


def _pin(pid: int, core: int) -> None:
    """Pin every thread of process ``pid`` (torch and gloo threads too) to ``core``."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), {core})
        except ProcessLookupError:
            pass


def run(balance: str, args: argparse.Namespace, run_dir: str) -> Result:
    spec = JobSpec.from_overrides(
        [
            f"model={args.model}",
            "cluster.workers=2",
            f"train.steps={args.steps}",
            f"train.global_batch={args.global_batch}",
            f"train.balance={balance}",
            "train.balance_every=4",
            "train.sample_tokens=0",
            "checkpoint.every=0",
            f"run_dir={run_dir}/{balance}",
        ]
    )
    handle = submit(spec)
    while handle.status().state != JobState.RUNNING:
        time.sleep(0.1)
    pids = handle.worker_pids()
    _pin(pids[0], 0)
    _pin(pids[1], 1)
    status = handle.wait()
    assert status.state == JobState.SUCCEEDED, status.error
    metrics = handle.metrics()
    steady = [m["step_time_s"] for m in metrics[args.warmup :]]
    return Result(
        balance, statistics.median(steady), metrics[-1]["batch"], [m["loss"] for m in metrics]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt_small")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=12)
    p.add_argument("--global-batch", type=int, default=24)
    args = p.parse_args()
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("needs at least 2 cores")
    ray.init(num_cpus=3, include_dashboard=False, logging_level=logging.WARNING)
    hog = mp.get_context("spawn").Process(target=_spin, args=(1,), daemon=True)
    hog.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            results = [run(b, args, tmp) for b in ("equal", "auto")]
    finally:
        hog.terminate()
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
