"""strategy=pipeline: bubble, shoal vs torch.distributed.pipelining, partitioning, recovery.

    python bench/pipeline.py            # everything, ~10 min on 2 cores
    python bench/pipeline.py --quick    # a smoke run: a couple of steps per case
    python bench/pipeline.py --parts 1 2 --stages 2

One local Ray instance; every shoal job is a fresh ``submit`` into its own
run folder; the step records (``handle.metrics()``) are read after a
warm-up of ``--warmup`` steps and medians are taken over the ``--steps``
steps after it. Four measurements, each printed as a markdown table with the
command line and the job overrides that produced it:

1. **Bubble, measured vs formula**: GPipe and 1F1B, ``--stages`` stages and
   ``--micro-batches`` micro-batches, on a GPT big enough that compute
   dominates the point-to-point sends on CPU. "measured" is the records'
   ``bubble`` (``1 - sum(stage busy) / (stages * schedule span)``);
   "formula" is ``(p-1)/(m+p-1)``, which assumes equal stages; "formula,
   measured stages" is the same ideal pipeline with the stages' measured
   busy times (``1 - sum(b) / (p * (sum(b) + (m-1) max(b)) / m)``), which
   tells an imbalance (the partition's doing) from scheduling overhead.
2. **shoal vs torch.distributed.pipelining driven directly**: right after
   each job of part 1, the same model, split (the partition shoal chose),
   batches, micro-batches and schedule run in plain spawned processes
   (``bench/pipeline_torch.py``: ``PipelineStage`` + ``ScheduleGPipe`` /
   ``Schedule1F1B``, tied gradients summed, global-norm clipping, AdamW).
   Median step time over the same steps; shoal's is the records'
   ``step_time_s`` (the controller's time between step completions). Step
   0's loss (before any update) is printed for both as a check that they run
   the same computation. For 2 stages and ``--elastic-off-m`` micro-batches
   the shoal job is run again with ``elastic.enabled=false`` (no buddy
   replica of each stage's state sent every step), to show what that costs.
3. **Speed-aware vs even partition on unequal layers**:
   ``bench/pipeline_models.py``'s ``UnequalMLP`` (blocks costing 6:4:4:2:2:2)
   on ``data=digits``, 2 stages, ``strategy.partition=auto`` vs ``even``:
   per-stage busy times, their max/min ratio, step times and the speedup,
   ``--partition-repeats`` times each. Also ``partition=auto`` with the run-time
   re-cut (``strategy.rebalance_every=--recut-every``; the partitions seen while
   it runs are printed), and the cut the planner makes from a layer profile
   this driver takes alone, for reference. ``--slowed-ms X`` uses
   ``SlowedMLP`` instead: the same 6:4:4:2:2:2 costs spent waiting (X ms per
   unit per forward), as layers on devices of their own would cost, so the
   step follows the slowest stage even on two shared cores.
4. **Recovery after killing a stage**: a 2-stage x 1-replica job with
   ``checkpoint.every`` beyond the run; once ``--kill-at`` steps have
   committed, one stage's worker is SIGKILLed (its pid from
   ``JobHandle.worker_pids()``). Reported: kill -> the commit of the first
   step past those committed before the kill (driver's clock; a record's
   time is the controller's start plus its ``elapsed_s``), steps lost
   (``status.steps_redone``), ``status.recovery_s``, where the state came
   from, and the stages the job ran with afterwards. A job that does not
   recover is reported with its error.

No assertions: the tables go to BENCHMARKS.md. Only one thing runs at a
time (the torch baseline's processes idle while a shoal job runs).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402

from bench.pipeline_torch import TorchConfig, TorchPipelines, TorchResult  # noqa: E402
from bench.recovery import committed, wait_until  # noqa: E402
from orchestrator import JobSpec, JobState, submit  # noqa: E402
from orchestrator.api import NAMESPACE, load_data  # noqa: E402

UNEQUAL = "bench.pipeline_models.UnequalMLP"
SLOWED = "bench.pipeline_models.SlowedMLP"


# -- jobs -----------------------------------------------------------------------


@dataclass
class JobRun:
    """One finished (or failed) shoal job and its step records after the warm-up."""

    label: str
    overrides: list[str]
    state: str
    error: str | None
    records: list[dict[str, Any]]
    partition: list[list[str]] | None
    wall_s: float
    first_loss: float  # step 0's loss (before any update)

    @property
    def ok(self) -> bool:
        return self.state == JobState.SUCCEEDED.name and bool(self.records)

    def median(self, key: str) -> float:
        return statistics.median(float(r[key]) for r in self.records)

    def medians(self, key: str) -> list[float]:
        """Element-wise medians of a per-stage (or per-rank) list field."""
        rows = [r[key] for r in self.records]
        return [statistics.median(float(row[i]) for row in rows) for i in range(len(rows[0]))]


def gpt_overrides(args: argparse.Namespace) -> list[str]:
    return [
        "model=gpt_small",
        f"model.n_layer={args.n_layer}",
        f"model.d_model={args.d_model}",
        f"model.n_head={args.n_head}",
        f"model.seq_len={args.seq_len}",
        f"train.global_batch={args.global_batch}",
        "data.max_bytes=1000000",
    ]


def common_overrides(args: argparse.Namespace) -> list[str]:
    return [
        "strategy=pipeline",
        f"train.steps={args.warmup + args.steps}",
        "train.sample_tokens=0",
        "checkpoint.every=0",
        "strategy.rebalance_every=0",  # the partition planned at the start, all run long
        *args.extra,
    ]


def partition_of(status: Any) -> list[list[str]] | None:
    """The layers of each stage at the job's end, from the status's program fields."""
    for name in ("program", "pipeline"):
        fields = getattr(status, name, None)
        if isinstance(fields, dict) and fields.get("partition"):
            return [list(names) for names in fields["partition"]]
    return None


def run_job(
    args: argparse.Namespace,
    root: Path,
    label: str,
    overrides: list[str],
    last_epoch: bool = False,
    cuts: list[str] | None = None,
) -> JobRun:
    """Run a job to its end; its records after the warm-up (``last_epoch``: the records of its
    last epoch but that epoch's first step). ``cuts``: polls the status while the job runs and
    appends each new partition seen, with the step it was first seen at."""
    run_dir = root / slug(label)
    overrides = merged(overrides)
    spec = JobSpec.from_overrides([*overrides, f"run_dir={run_dir}"])
    start = time.time()
    handle = submit(spec)
    if cuts is not None:
        seen = None
        while not handle.done() and time.time() - start < args.job_timeout:
            status = handle.status()
            cut = partition_of(status)
            if cut and cut != seen:
                seen = cut
                cuts.append(f"step {status.step}: {' | '.join(', '.join(s) for s in cut)}")
            time.sleep(0.2)
    status = handle.wait(timeout=args.job_timeout)
    if not handle.done():
        handle.cancel()
        status = handle.wait(timeout=120)
        status.error = f"timed out after {args.job_timeout} s; {status.error or ''}"
    every = handle.metrics()
    records = [r for r in every if r["step"] >= args.warmup]
    if last_epoch and every:
        last = [r for r in every if r["epoch"] == every[-1]["epoch"]]
        records = last[1:] or last
    first = [r["loss"] for r in every if r["step"] == 0]
    handle.close()
    return JobRun(
        label,
        overrides,
        status.state.name,
        status.error,
        records,
        partition_of(status),
        time.time() - start,
        first[0] if first else float("nan"),
    )


def merged(overrides: list[str]) -> list[str]:
    """``overrides`` with a key given twice kept once, with its last value."""
    out: dict[str, str] = {}
    for item in overrides:
        out[item.split("=", 1)[0].lstrip("+")] = item
    return list(out.values())


def bounds_of(partition: list[list[str]], names: list[str]) -> tuple[tuple[int, int], ...]:
    """``[first, last)`` layer indices per stage, from each stage's layer names (or first..last)."""
    out = []
    for stage in partition:
        a, b = names.index(stage[0]), names.index(stage[-1]) + 1
        out.append((a, b))
    return tuple(out)


# -- part 1 and 2: bubble; shoal vs torch ------------------------------------------


@dataclass
class BubbleCase:
    stages: int
    schedule: str
    m: int
    job: JobRun
    torch: TorchResult | None = None
    plain: JobRun | None = None  # the same job with elastic.enabled=false (no buddy replicas)


def layer_names(spec: JobSpec, data: Any) -> list[str]:
    import torch

    from actors.stages import pipeline_layers
    from actors.task import build_model

    with torch.device("meta"):
        model = build_model(spec.model, data.facts)
    return [n for n, _ in pipeline_layers(model)]


def bubble_cases(args: argparse.Namespace, root: Path) -> list[BubbleCase]:
    cases: list[BubbleCase] = []
    spec = JobSpec.from_overrides([*common_overrides(args), *gpt_overrides(args)])
    data = load_data(spec) if args.torch else None
    names = layer_names(spec, data or load_data(spec))
    for stages in args.stages:
        pool = TorchPipelines(stages, spec, data) if args.torch else None
        ms = args.micro_batches if stages <= 2 else args.micro_batches_more_stages
        try:
            for schedule in args.schedules:
                for m in ms:
                    overrides = [
                        *common_overrides(args),
                        *gpt_overrides(args),
                        f"cluster.workers={stages}",
                        f"strategy.stages={stages}",
                        f"strategy.schedule={schedule}",
                        f"train.micro_batches={m}",
                    ]
                    label = f"p{stages}-{schedule}-m{m}"
                    log(f"{label}: shoal")
                    case = BubbleCase(stages, schedule, m, run_job(args, root, label, overrides))
                    if not case.job.ok:
                        log(f"  failed: {case.job.state}: {case.job.error}")
                    elif pool is not None and case.job.partition:
                        log(f"{label}: torch.distributed.pipelining")
                        config = TorchConfig(
                            schedule,
                            m,
                            bounds_of(case.job.partition, names),
                            args.warmup + args.steps,
                            args.warmup,
                        )
                        case.torch = pool.run(config)
                        if case.torch.error:
                            log(f"  torch failed: {case.torch.error}")
                    if args.torch and stages == 2 and m in args.elastic_off_m:
                        log(f"{label}: shoal, elastic.enabled=false")
                        plain = [*overrides, "elastic.enabled=false"]
                        case.plain = run_job(args, root, f"{label}-plain", plain)
                    cases.append(case)
        finally:
            if pool is not None:
                pool.close()
    return cases


def ideal_bubble(busy: list[float], m: int) -> float:
    """The bubble of an ideal pipeline whose stages take ``busy`` seconds per step."""
    p, total = len(busy), sum(busy)
    span = (total + (m - 1) * max(busy)) / m
    return 1.0 - total / (p * span) if span > 0 else 0.0


def fmt_list(values: list[float], digits: int = 3) -> str:
    return " / ".join(f"{v:.{digits}f}" for v in values)


def print_bubble_table(args: argparse.Namespace, cases: list[BubbleCase]) -> None:
    print_header(
        args,
        "Bubble, measured vs formula",
        [*common_overrides(args), *gpt_overrides(args)]
        + [
            "cluster.workers=P",
            "strategy.stages=P",
            "strategy.schedule=S",
            "train.micro_batches=M",
        ],
    )
    print(
        "| stages | schedule | m | bubble measured | formula (p-1)/(m+p-1) | measured - formula "
        "| formula, measured stages | step (s) | stage busy (s) | comm wait (s), per stage "
        "| partition |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |")
    for c in cases:
        if not c.job.ok:
            print(f"| {c.stages} | {c.schedule} | {c.m} | failed: {c.job.state}: {c.job.error} |")
            continue
        bubble, formula = c.job.median("bubble"), c.job.median("bubble_formula")
        busy = c.job.medians("stage_busy_s")
        cells = [
            str(c.stages),
            c.schedule,
            str(c.m),
            f"{bubble:.3f}",
            f"{formula:.3f}",
            f"{bubble - formula:+.3f}",
            f"{ideal_bubble(busy, c.m):.3f}",
            f"{c.job.median('step_time_s'):.3f}",
            fmt_list(busy),
            fmt_list(c.job.medians("comm_wait_s")),
            " \\| ".join(layers_label(s) for s in c.job.partition or []),
        ]
        print("| " + " | ".join(cells) + " |")
    print(
        f"\n(medians over steps {args.warmup}..{args.warmup + args.steps - 1}; one worker per "
        f"stage, {os.cpu_count()} cores: {max(args.stages)} stages on {os.cpu_count()} cores "
        "share them)"
        if max(args.stages) > (os.cpu_count() or 1)
        else f"\n(medians over steps {args.warmup}..{args.warmup + args.steps - 1})"
    )


def print_torch_table(args: argparse.Namespace, cases: list[BubbleCase]) -> None:
    print_header(
        args,
        "shoal vs torch.distributed.pipelining (same model, split, batches, schedule)",
        [*common_overrides(args), *gpt_overrides(args)],
    )
    print(
        "shoal (elastic.enabled=false): the same job without buddy replicas of the stages' "
        "state (and without recovery)\n"
    )
    print(
        "| stages | schedule | m | shoal step (s) | torch step (s) | shoal / torch "
        "| shoal, elastic.enabled=false (s) | its / torch | step-0 loss shoal / torch "
        "| partition |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    ratios = []
    for c in cases:
        head = f"| {c.stages} | {c.schedule} | {c.m} |"
        if not c.job.ok:
            print(f"{head} shoal failed: {c.job.error} | | | | | | |")
            continue
        if c.torch is None or c.torch.error:
            err = "not run" if c.torch is None else c.torch.error.strip().splitlines()[-1]
            print(f"{head} {c.job.median('step_time_s'):.3f} | torch failed: {err} | | | | | |")
            continue
        shoal_s = c.job.median("step_time_s")
        ratio = shoal_s / c.torch.median_s
        ratios.append(ratio)
        plain = ["", ""]
        if c.plain is not None:
            if c.plain.ok:
                plain_s = c.plain.median("step_time_s")
                plain = [f"{plain_s:.3f}", f"{plain_s / c.torch.median_s:.3f}"]
            else:
                plain = [f"failed: {c.plain.error}", ""]
        cells = [
            f"{shoal_s:.3f}",
            f"{c.torch.median_s:.3f}",
            f"{ratio:.3f}",
            *plain,
            f"{c.job.first_loss:.5f} / {c.torch.first_loss:.5f}",
            " \\| ".join(layers_label(s) for s in c.job.partition or []),
        ]
        print(head + " " + " | ".join(cells) + " |")
    if ratios:
        within = sum(r <= 1.10 for r in ratios)
        print(
            f"\nshoal / torch: median {statistics.median(ratios):.3f}, range "
            f"{min(ratios):.3f}..{max(ratios):.3f}; within 10%: {within} of {len(ratios)}"
        )


# -- part 3: partition ------------------------------------------------------------


def partition_runs(args: argparse.Namespace, root: Path) -> list[JobRun]:
    runs = []
    order = ["even", "auto"]
    for rep in range(args.partition_repeats):
        for partition in order if rep % 2 == 0 else order[::-1]:
            overrides = [*common_overrides(args), *unequal_overrides(args)]
            overrides.append(f"strategy.partition={partition}")
            label = f"partition-{partition}-{rep}"
            log(label)
            run = run_job(args, root, label, overrides)
            if not run.ok:
                log(f"  failed: {run.state}: {run.error}")
            runs.append(run)
    if args.recut_every:
        # auto, then re-cut at run time to the measured speeds (strategy.rebalance_every).
        n = args.recut_every
        overrides = [*common_overrides(args), *unequal_overrides(args), *recut_overrides(args)]
        log(f"partition-recut{n}-0")
        run = run_job(args, root, f"partition-recut{n}-0", overrides, True, args.recut_cuts)
        if not run.ok:
            log(f"  failed: {run.state}: {run.error}")
        runs.append(run)
    return runs


def recut_overrides(args: argparse.Namespace) -> list[str]:
    n = args.recut_every
    return [
        "strategy.partition=auto",
        f"strategy.rebalance_every={n}",
        f"train.steps={4 * n + args.steps}",
    ]


def driver_plan(args: argparse.Namespace) -> list[str]:
    """The unequal model's layer costs as this (otherwise idle) driver measures them with one
    thread, and the cuts the planner makes from that table: what the workers' own profiles
    are expected to give when nothing disturbs them."""
    import torch

    from actors.stages import pipeline_layers, profile_layers
    from actors.task import build_model
    from orchestrator.stage_plan import LayerCost, StageWorker, plan_partition

    spec = JobSpec.from_overrides([*common_overrides(args), *unequal_overrides(args)])
    data = load_data(spec)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = build_model(spec.model, data.facts)
        rows = spec.train.global_batch // spec.train.micro_batches
        x = data.batch(spec.train.seed, 0, spec.train.global_batch, 0, rows)["x"]
        table = profile_layers(model, pipeline_layers(model), x, 16)
    finally:
        torch.set_num_threads(threads)
    worker = StageWorker(
        tuple(LayerCost(r["name"], r["compute_s"], r["state_bytes"], 0) for r in table), 1 << 50
    )
    lines = [
        "layer costs measured by the driver (1 thread, one micro-batch of "
        f"{rows} rows, fwd+bwd): "
        + ", ".join(f"{r['name']} {1000 * r['compute_s']:.1f} ms" for r in table)
    ]
    for even in (False, True):
        plan = plan_partition([[worker], [worker]], schedule="1f1b", micro_batches=4, even=even)
        cut = " | ".join(", ".join(r["name"] for r in table[a:b]) for a, b in plan.bounds)
        lines.append(
            f"planner on that table, partition={'even' if even else 'auto'}: {cut}; predicted "
            f"stage ms per micro-batch {fmt_list([1000 * t for t in plan.stage_s], 1)} "
            f"(max/min {max(plan.stage_s) / min(plan.stage_s):.2f})"
        )
    return lines


def unequal_overrides(args: argparse.Namespace) -> list[str]:
    slowed = [f"+model.ms_per_unit={args.slowed_ms:g}"] if args.slowed_ms else []
    return [
        "model=mlp",
        "data=digits",
        f"model._target_={SLOWED if args.slowed_ms else UNEQUAL}",
        f"+model.width={args.unequal_width}",
        f"+model.expansions=[{','.join(str(k) for k in args.expansions)}]",
        *slowed,
        f"train.global_batch={args.unequal_batch}",
        f"train.micro_batches={args.unequal_micro_batches}",
        "strategy.schedule=1f1b",
        "strategy.stages=2",
        "cluster.workers=2",
    ]


def print_partition_table(args: argparse.Namespace, runs: list[JobRun], notes: list[str]) -> None:
    print_header(
        args,
        "Speed-aware (auto) vs even partition, unequal layers",
        merged([*common_overrides(args), *unequal_overrides(args), "strategy.partition=auto|even"]),
    )
    if args.recut_every:
        print(
            f"recut{args.recut_every}: the same with `{shlex.join(recut_overrides(args))}`; "
            "medians over its last epoch but that epoch's first step; partitions seen while "
            f"it ran: {'; '.join(args.recut_cuts)}\n"
        )
    print(
        "| partition | run | layers per stage | stage busy (s) | max / min busy | step (s) "
        "| bubble |"
    )
    print("| --- | ---: | --- | --- | ---: | ---: | ---: |")
    summary: dict[str, list[tuple[float, float, float]]] = {}
    for run in runs:
        kind, rep = run.label.split("-")[1:]
        if not run.ok:
            why = "no step records" if run.state == JobState.SUCCEEDED.name else run.error
            print(f"| {kind} | {rep} | failed: {run.state}: {why} | | | | |")
            continue
        busy = run.medians("stage_busy_s")
        spread = max(busy) / min(busy) if min(busy) > 0 else math.inf
        step = run.median("step_time_s")
        summary.setdefault(kind, []).append((max(busy), spread, step))
        parts = " \\| ".join(", ".join(s) for s in run.partition or [])
        cells = [kind, rep, parts, fmt_list(busy), f"{spread:.2f}", f"{step:.3f}"]
        cells.append(f"{run.median('bubble'):.3f}")
        print("| " + " | ".join(cells) + " |")
    if "even" in summary and "auto" in summary:

        def med(kind: str, i: int) -> float:
            return statistics.median(row[i] for row in summary[kind])

        removed = med("even", 0) / med("auto", 0)
        speedup = med("even", 2) / med("auto", 2)
        balanced = med("auto", 1) <= 1.15 < med("even", 1)
        won = removed > 1.0 and speedup >= removed
        print(
            f"\nmedians over runs: max/min busy even {med('even', 1):.2f}, auto "
            f"{med('auto', 1):.2f}; slowest stage's busy time even / auto = {removed:.2f} (the "
            f"imbalance removed; < 1: auto's slowest stage is the slower); step time even / auto "
            f"= {speedup:.2f}.\ngoals: auto within 1.15 where even is not: "
            f"{'met' if balanced else 'not met'}; step-time win >= the imbalance removed (> 1): "
            f"{'met' if won else 'not met'}"
        )
    for line in notes:
        print(f"\n{line}")


# -- part 4: recovery --------------------------------------------------------------


@dataclass
class Kill:
    stage: int
    kill_at: int = 0
    next_step_s: float | None = None
    detected_s: float | None = None
    steps_lost: int | None = None
    recovery_s: float | None = None
    source: str = ""
    stages_after: int | None = None
    error: str | None = None
    events: list[str] = field(default_factory=list)


def recovery_overrides(args: argparse.Namespace) -> list[str]:
    return [
        "strategy=pipeline",
        *gpt_overrides(args),
        "cluster.workers=2",
        "strategy.stages=2",
        "strategy.schedule=1f1b",
        "train.micro_batches=4",
        "train.steps=1000",
        "train.sample_tokens=0",
        "checkpoint.every=10000",
    ]


def measure_kill(args: argparse.Namespace, root: Path, stage: int) -> Kill:
    out = Kill(stage)
    spec = JobSpec.from_overrides([*recovery_overrides(args), f"run_dir={root / f'kill-{stage}'}"])
    handle = submit(spec)
    try:
        wait_until(handle, lambda r: committed(r) >= args.kill_at, f"step {args.kill_at}", 300)
        before = time.time()
        elapsed = handle.status().elapsed_s
        start = (before + time.time()) / 2 - elapsed  # the controller's start, on our clock
        records = handle.metrics()
        out.kill_at, epoch = committed(records), records[-1]["epoch"]
        pid = handle.worker_pids()[stage]  # one replica: rank == stage
        os.kill(pid, signal.SIGKILL)
        t_kill = time.time()
        log(f"  killed stage {stage} (pid {pid}) after {out.kill_at} steps")
        try:
            records = wait_until(
                handle,
                lambda rs: any(r["epoch"] > epoch and r["step"] >= out.kill_at for r in rs),
                "step past the kill",
                args.recovery_timeout,
            )
        finally:
            status = handle.status()
            try:
                events = handle.events()
            except Exception:  # noqa: BLE001 - the controller may be gone
                events = []
            out.events = [f"{e['event']}@{e.get('time', 0) - t_kill:+.2f}s" for e in events]
            died = [e for e in events if e["event"] == "died"]
            if died:
                out.detected_s = died[0]["time"] - t_kill
        first_new = next(r for r in records if r["epoch"] > epoch and r["step"] >= out.kill_at)
        out.next_step_s = start + first_new["elapsed_s"] - t_kill
        out.steps_lost = status.steps_redone
        out.recovery_s = status.recovery_s
        out.stages_after = len(first_new["stage_busy_s"])
        restored = [e["event"] for e in events if e["event"].startswith("restored-from-")]
        out.source = restored[-1] if restored else "?"
        if status.error:
            out.error = status.error
    except (RuntimeError, TimeoutError) as e:
        status = handle.status()
        out.error = f"{e}; state {status.state.name}, error: {status.error}"
    finally:
        if not handle.done():
            handle.cancel()
        handle.wait(timeout=120)
        handle.close()
    return out


def print_recovery_table(args: argparse.Namespace, kills: list[Kill]) -> None:
    print_header(args, "Recovery after SIGKILL of one stage", recovery_overrides(args))
    print(
        "| killed stage | steps committed at kill | kill -> next step (s) | detected (s) "
        "| steps lost | recovery_s | state from | stages after |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    for k in kills:
        if k.next_step_s is None:
            print(f"| {k.stage} | {k.kill_at} | did not recover: {k.error} | | | | | |")
            continue
        cells = [
            str(k.stage),
            str(k.kill_at),
            f"{k.next_step_s:.2f}",
            "?" if k.detected_s is None else f"{k.detected_s:.2f}",
            str(k.steps_lost),
            f"{k.recovery_s:.2f}",
            k.source,
            str(k.stages_after),
        ]
        print("| " + " | ".join(cells) + " |")
    for k in kills:
        print(f"\nstage {k.stage} kill, events (time from the kill): {', '.join(k.events)}")
        if k.error and k.next_step_s is not None:
            print(f"  status error: {k.error}")


# -- output -----------------------------------------------------------------------


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text)


def layers_label(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}"


def load_average() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {load_average()}] {text}", flush=True)


def print_header(args: argparse.Namespace, title: str, overrides: list[str]) -> None:
    print(f"\n### {title}\n")
    print(f"command: `{args.command}`\n")
    print(f"jobs: `shoal run {shlex.join(overrides)}`\n")


# -- main -------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: a few steps per case")
    p.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3, 4], choices=[1, 2, 3, 4])
    p.add_argument("--stages", type=int, nargs="+", default=None, help="default: 2 4")
    p.add_argument("--schedules", nargs="+", default=["gpipe", "1f1b"])
    p.add_argument("--micro-batches", type=int, nargs="+", default=None, help="default: 2 4 8")
    p.add_argument(
        "--micro-batches-more-stages",
        type=int,
        nargs="+",
        default=None,
        help="with more than 2 stages; default: 4 8",
    )
    p.add_argument("--steps", type=int, default=None, help="measured steps per job")
    p.add_argument("--warmup", type=int, default=None, help="steps left out before measuring")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--unequal-width", type=int, default=384)
    p.add_argument("--expansions", type=int, nargs="+", default=[6, 4, 4, 2, 2, 2])
    p.add_argument("--unequal-batch", type=int, default=512)
    p.add_argument("--unequal-micro-batches", type=int, default=4)
    p.add_argument(
        "--slowed-ms",
        type=float,
        default=0.0,
        help="part 3 on SlowedMLP: ms of waiting per cost unit per forward (0: UnequalMLP)",
    )
    p.add_argument(
        "--elastic-off-m",
        type=int,
        nargs="*",
        default=[4],
        help="part 2, 2 stages: also run these m with elastic.enabled=false",
    )
    p.add_argument("--partition-repeats", type=int, default=None, help="default: 2 (quick: 1)")
    p.add_argument(
        "--recut-every",
        type=int,
        default=3,
        help="also run partition=auto with strategy.rebalance_every=N (0: don't)",
    )
    p.add_argument("--kill-stages", type=int, nargs="+", default=None, help="default: 1 0")
    p.add_argument("--kill-at", type=int, default=None, help="steps committed before the kill")
    p.add_argument("--recovery-timeout", type=float, default=240.0)
    p.add_argument("--job-timeout", type=float, default=600.0)
    p.add_argument("--keep-runs", action="store_true", help="keep the jobs' run folders")
    p.add_argument(
        "--extra",
        nargs="*",
        default=[],
        help="more overrides for every job, e.g. elastic.enabled=false",
    )
    args = p.parse_args()
    quick = args.quick

    def default(name: str, full: Any, fast: Any) -> None:
        if getattr(args, name) is None:
            setattr(args, name, fast if quick else full)

    default("stages", [2, 4], [2, 4])
    default("micro_batches", [2, 4, 8], [4])
    default("micro_batches_more_stages", [4, 8], [4])
    default("steps", 10, 2)
    default("warmup", 2, 1)
    default("partition_repeats", 2, 1)
    default("kill_stages", [1, 0], [1])
    default("kill_at", 5, 3)
    args.torch = 2 in args.parts
    args.recut_cuts = []
    args.command = shlex.join(["python", "bench/pipeline.py", *sys.argv[1:]])
    return args


def start_ray(args: argparse.Namespace) -> None:
    """Our own Ray, with the repository on the workers' path (for ``bench.pipeline_models``)
    and without the workers' logs on stdout (a killed stage's peer prints gloo errors)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    ray.init(
        address="local",
        namespace=NAMESPACE,
        num_cpus=max(os.cpu_count() or 1, *args.stages, 2),
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )


def main() -> None:
    args = parse_args()
    t0 = time.time()
    root = Path(tempfile.mkdtemp(prefix="shoal-pipeline-"))
    start_ray(args)
    log(f"{args.command}; runs under {root}")
    cases: list[BubbleCase] = []
    if 1 in args.parts or 2 in args.parts:
        cases = bubble_cases(args, root)
    notes = driver_plan(args) if 3 in args.parts else []
    runs = partition_runs(args, root) if 3 in args.parts else []
    kills = []
    if 4 in args.parts:
        for stage in args.kill_stages:
            log(f"recovery: kill stage {stage}")
            kills.append(measure_kill(args, root, stage))
    log(f"done in {time.time() - t0:.0f} s")
    if args.keep_runs:
        log(f"run folders kept under {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)  # checkpoints: hundreds of MB
    if 1 in args.parts:
        print_bubble_table(args, cases)
    if 2 in args.parts:
        print_torch_table(args, cases)
    if runs:
        print_partition_table(args, runs, notes)
    if kills:
        print_recovery_table(args, kills)


if __name__ == "__main__":
    main()
