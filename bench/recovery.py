"""Recovery from a lost worker: shoal's in-memory recovery vs. restart-from-checkpoint.

    python bench/recovery.py                                # zero2 and ddp, 3 workers
    python bench/recovery.py --strategies zero2 --repeats 3 --every 20

One job (a mid-size GPT on the standard library's source, 3 workers,
``checkpoint.every=N``) is run several ways in one process, on one local Ray
instance. In each repeat the same worker rank is SIGKILLed (``os.kill`` on
its PID from ``JobHandle.worker_pids()``) once the job has committed a step
chosen at random strictly between two checkpoints (``N+2 .. 2N-2``):

* **shoal in-memory** (``elastic.enabled=true``, the default): the
  controller ends the epoch, a replacement worker is started, the lost shard
  is rebuilt from its buddy's replica, and training continues in a new
  epoch. ``cluster.min_workers=2`` is measured too ("shoal, survivors
  only"): the survivors go on without waiting for the replacement to start.
  And ``elastic.spares=1`` ("shoal, 1 spare"): a fourth worker is started
  with the job and stands by; the lost worker's place goes to it at once.
* **restart + checkpoint**: what Ray Train's ``FailureConfig(max_failures=N)``
  does: the failure ends the whole worker group, a new one starts and loads
  the latest checkpoint. Done with shoal itself: ``elastic.enabled=false``
  makes the kill fail the job, and the driver at once resubmits the same job
  with ``resume=latest`` in the same run folder (a restart policy). Ray stays
  up, as it does under Ray Train. (Ray Train itself is not measured:
  ``ray.train`` is not importable in this venv; it needs pandas/pyarrow.)

Measured, per run, with the driver's wall clock (the controller runs on the
same machine; a metric record's time is the controller's start, as read from
``status().elapsed_s``, plus the record's ``elapsed_s``):

* **kill -> next step**: from ``os.kill`` to the commit of the first step
  newer than every step committed before the failure;
* **steps lost**: steps committed before the failure that are run again
  (shoal: ``status.steps_redone``, cross-checked against the step the new
  epoch starts from in ``events.jsonl``; restart: steps committed before the
  failure minus the checkpoint's step);
* **recovery_s**: shoal's own ``status.recovery_s`` (detection to the new
  epoch's start); for the restart, ``status.resume_s`` (the checkpoint load).

What replication costs a step without failures is measured by
``bench/replication_cost.py``. No assertions: the table goes to
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ray  # noqa: E402

from orchestrator import JobSpec, JobState, submit  # noqa: E402
from orchestrator.api import NAMESPACE  # noqa: E402

POLL_S = 0.02
SHOAL = "shoal in-memory"
SURVIVORS = "shoal, survivors only"
SPARE = "shoal, 1 spare"
RESTART = "restart + checkpoint"


@dataclass
class Recovery:
    """One kill and what it cost."""

    strategy: str
    method: str
    kill_at: int  # steps committed when the driver sent SIGKILL
    committed: int  # steps committed before the failure was handled
    resumed_from: int  # the first step run after recovery
    next_step_s: float  # kill -> commit of the first step >= committed
    steps_lost: int
    recovery_s: float  # shoal: status.recovery_s; restart: status.resume_s
    detected_s: float  # kill -> failure noticed (shoal: `died` event; restart: job FAILED)
    source: str  # where the state came from


# -- job plumbing -------------------------------------------------------------


def job_spec(
    args: argparse.Namespace, strategy: str, run_dir: Path, *extra: str, steps: int | None = None
) -> JobSpec:
    return JobSpec.from_overrides(
        [
            f"strategy={strategy}",
            f"cluster.workers={args.workers}",
            "model=gpt_small",
            f"model.n_layer={args.n_layer}",
            f"model.d_model={args.d_model}",
            f"model.seq_len={args.seq_len}",
            f"train.global_batch={args.global_batch}",
            f"train.steps={steps or args.steps}",
            "train.warmup_steps=5",
            "train.sample_tokens=0",
            "data.max_bytes=1000000",
            f"checkpoint.every={args.every}",
            f"run_dir={run_dir}",
            *extra,
        ]
    )


def controller_start(handle) -> float:
    """The controller's start time on the driver's clock (records carry ``elapsed_s`` from it)."""
    before = time.time()
    elapsed = handle.status().elapsed_s
    return (before + time.time()) / 2 - elapsed


def wait_until(handle, predicate, what: str, timeout: float = 600) -> list[dict[str, Any]]:
    """Poll ``handle.metrics()`` until ``predicate(records)``; returns the records."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        records = handle.metrics()
        if records and predicate(records):
            return records
        if handle.done():
            status = handle.wait()
            raise RuntimeError(f"job ended ({status.state}) before {what}: {status.error}")
        time.sleep(POLL_S)
    raise TimeoutError(f"timed out waiting for {what}")


def committed(records: list[dict[str, Any]]) -> int:
    """Steps committed so far (steps are numbered from 0)."""
    return max(r["step"] for r in records) + 1 if records else 0


def kill_rank(handle, rank: int) -> float:
    pid = handle.worker_pids()[rank]
    os.kill(pid, signal.SIGKILL)
    return time.time()


def record_time(start: float, record: dict[str, Any]) -> float:
    return start + record["elapsed_s"]


def stop(handle) -> None:
    """Cancel a job once it has been measured (the rest of the run tells nothing new)."""
    if not handle.done():
        handle.cancel()
    handle.wait(timeout=120)
    handle.close()


# -- the measurements ---------------------------------------------------------


def measure_shoal(
    args: argparse.Namespace, strategy: str, run_dir: Path, kill_at: int, rank: int, method: str
) -> Recovery:
    extra = {SURVIVORS: ["cluster.min_workers=2"], SPARE: ["elastic.spares=1"]}.get(method, [])
    handle = submit(job_spec(args, strategy, run_dir, *extra))
    wait_until(handle, lambda r: committed(r) >= kill_at, f"step {kill_at}")
    start = controller_start(handle)
    seen = committed(handle.metrics())
    t_kill = kill_rank(handle, rank)
    epoch = handle.metrics()[-1]["epoch"]
    records = wait_until(
        handle,
        lambda rs: any(r["epoch"] > epoch for r in rs),
        "the first step of the new epoch",
    )
    status = handle.status()
    events = handle.events()
    restored = [e for e in events if e["event"].startswith("restored-from-")]
    resumed_from = restored[-1]["step"]
    died = next(e for e in events if e["event"] == "died")
    done_before = resumed_from + status.steps_redone
    first_new = next(r for r in records if r["epoch"] > epoch and r["step"] >= done_before)
    stop(handle)
    if done_before < seen:
        print(f"  warning: {seen} steps seen at the kill, {done_before} by the controller")
    return Recovery(
        strategy=strategy,
        method=method,
        kill_at=seen,
        committed=done_before,
        resumed_from=resumed_from,
        next_step_s=record_time(start, first_new) - t_kill,
        steps_lost=status.steps_redone,
        recovery_s=status.recovery_s,
        source=restored[-1]["event"],
        detected_s=died["time"] - t_kill,
    )


def measure_restart(
    args: argparse.Namespace, strategy: str, run_dir: Path, kill_at: int, rank: int
) -> Recovery:
    handle = submit(job_spec(args, strategy, run_dir, "elastic.enabled=false"))
    wait_until(handle, lambda r: committed(r) >= kill_at, f"step {kill_at}")
    seen = committed(handle.metrics())
    t_kill = kill_rank(handle, rank)
    failed = handle.wait(timeout=300)
    detected_s = time.time() - t_kill
    if failed.state != JobState.FAILED:
        raise RuntimeError(f"expected the kill to fail the job, got {failed.state}")
    done_before = committed(handle.metrics())
    handle.close()
    # The restart policy: the same job again, from the newest committed checkpoint.
    again = submit(job_spec(args, strategy, run_dir, "elastic.enabled=false", "resume=latest"))
    start = controller_start(again)
    records = wait_until(again, lambda r: committed(r) > done_before, f"step {done_before}")
    status = again.status()
    first_new = next(r for r in records if r["step"] >= done_before)
    resumed_from = int(status.resumed_from.rsplit("step-", 1)[1])
    stop(again)
    return Recovery(
        strategy=strategy,
        method=RESTART,
        kill_at=seen,
        committed=done_before,
        resumed_from=resumed_from,
        next_step_s=record_time(start, first_new) - t_kill,
        steps_lost=done_before - resumed_from,
        recovery_s=status.resume_s or 0.0,
        source=f"checkpoint step-{resumed_from}",
        detected_s=detected_s,
    )


# -- the report ---------------------------------------------------------------


def load_average() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text)


def median_of(rows: list[Recovery], field: str) -> float:
    return statistics.median(getattr(r, field) for r in rows)


def print_recovery_table(results: list[Recovery]) -> None:
    print(
        "\n| strategy | method | kills | kill -> next step (s), median [runs] | detected (s) "
        "| steps lost [runs] | recovery_s / resume_s | state from |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    groups: dict[tuple[str, str], list[Recovery]] = {}
    for r in results:
        groups.setdefault((r.strategy, r.method), []).append(r)
    for (strategy, method), rows in groups.items():
        runs = ", ".join(f"{r.next_step_s:.1f}" for r in rows)
        lost = ", ".join(str(r.steps_lost) for r in rows)
        cells = [
            strategy,
            method,
            str(len(rows)),
            f"{median_of(rows, 'next_step_s'):.2f} [{runs}]",
            f"{median_of(rows, 'detected_s'):.2f}",
            lost,
            f"{median_of(rows, 'recovery_s'):.2f}",
            ", ".join(sorted({r.source for r in rows})),
        ]
        print("| " + " | ".join(cells) + " |")
    print("\nratios (restart + checkpoint / shoal), medians:")
    for strategy in dict.fromkeys(r.strategy for r in results):
        base = groups.get((strategy, RESTART))
        for method in (SHOAL, SURVIVORS, SPARE):
            ours = groups.get((strategy, method))
            if not base or not ours:
                continue
            ratio = median_of(base, "next_step_s") / median_of(ours, "next_step_s")
            print(
                f"  {strategy}, vs {method}: time {ratio:.2f}x; steps lost "
                f"{median_of(base, 'steps_lost'):g} vs {median_of(ours, 'steps_lost'):g}"
            )


def print_runs(results: list[Recovery]) -> None:
    print("\nper run: strategy, method, committed at kill (driver / controller), resumed from")
    for r in results:
        print(
            f"  {r.strategy:5} {r.method:22} {r.kill_at:3} / {r.committed:3} -> {r.resumed_from:3}"
            f"  detected {r.detected_s:5.2f} s, next step {r.next_step_s:6.2f} s,"
            f" lost {r.steps_lost}, {r.source}"
        )


# -- main -----------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--strategies", nargs="+", default=["zero2", "ddp"])
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--d-model", type=int, default=192)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--global-batch", type=int, default=12)
    p.add_argument("--every", type=int, default=20, help="checkpoint.every")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-survivors", action="store_true", help="skip cluster.min_workers=2")
    p.add_argument("--no-spare", action="store_true", help="skip elastic.spares=1")
    p.add_argument(
        "--no-restart", action="store_true", help="skip the restart + checkpoint baseline"
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.steps = 3 * args.every  # the kill lands in (N, 2N); the job is cancelled after
    return args


def start_ray(args: argparse.Namespace) -> None:
    """Ray as ``submit`` would start it, but without the workers' logs on our stdout (a
    killed worker's peers print gloo tracebacks)."""
    ray.init(
        address="local",  # our own instance, never another user's cluster on this machine
        namespace=NAMESPACE,
        num_cpus=max(os.cpu_count() or 1, args.workers + 1),  # + a spare
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )


def main() -> None:
    args = parse_args()
    start_ray(args)
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="shoal-recovery-"))
    print(f"load average at start: {load_average()}; runs under {root}")
    results: list[Recovery] = []
    for rep in range(args.repeats):
        for strategy in args.strategies:
            kill_at = rng.randint(args.every + 2, 2 * args.every - 2)
            rank = rng.randrange(args.workers)
            methods = ([] if args.no_restart else [RESTART]) + [SHOAL]
            methods += [] if args.no_survivors else [SURVIVORS]
            methods += [] if args.no_spare else [SPARE]
            if rep % 2:
                methods.reverse()
            for method in methods:
                run_dir = root / f"{strategy}-{slug(method)}-{rep}"
                print(
                    f"[{rep}] {strategy} {method}: kill rank {rank} at step {kill_at} "
                    f"(load {load_average()})",
                    flush=True,
                )
                if method == RESTART:
                    r = measure_restart(args, strategy, run_dir, kill_at, rank)
                else:
                    r = measure_shoal(args, strategy, run_dir, kill_at, rank, method)
                print(f"    -> {r}", flush=True)
                results.append(r)
    print(f"\nload average at end: {load_average()}")
    print_recovery_table(results)
    print_runs(results)


if __name__ == "__main__":
    main()
