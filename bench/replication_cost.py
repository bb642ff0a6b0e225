"""What buddy replication costs a step: none vs. synchronous vs. asynchronous.

    python bench/replication_cost.py                       # this machine's CPU compute
    python bench/replication_cost.py --device-ms 60        # + 60 ms of idle-host "device" time

The job of ``bench/recovery.py`` (zero2, 3 workers, a 1.8M-parameter GPT)
runs without failures three ways, in one process on one local Ray instance,
in rotating order, ``--repeats`` times:

* ``elastic.enabled=false``: no replication (a failure fails the job);
* ``elastic.replication=sync``: each step waits for its copy to reach the buddy;
* ``elastic.replication=async`` (the default): the copy travels while the
  next step computes.

It prints the median step time of each (after ``--warmup`` steps) and what
each mode adds over no replication. ``--device-ms W`` makes every forward
pass also wait W ms with the CPU idle (``bench/sim_models.py``), standing in
for an accelerator that computes while the host's cores are free; without
it, the model's math keeps this machine's cores busy and any copying,
background or not, competes with it. No assertions: the table goes to
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recovery import job_spec, load_average, slug, start_ray  # noqa: E402

from orchestrator import JobState, submit  # noqa: E402


@dataclass
class Steady:
    """Median step time of one run without failures."""

    label: str
    median_step_s: float
    steps: int


MODES = [
    ("no replication", "elastic.enabled=false"),
    ("sync", "elastic.replication=sync"),
    ("async", "elastic.replication=async"),
]


def measure(args: argparse.Namespace, run_dir: Path, label: str, override: str) -> Steady:
    extra = [override, "checkpoint.every=0"]
    if args.device_ms:
        extra.append("model._target_=bench.sim_models.AcceleratorTimeGPT")
    spec = job_spec(args, "zero2", run_dir, *extra, steps=args.steps)
    handle = submit(spec)
    status = handle.wait(timeout=900)
    if status.state != JobState.SUCCEEDED:
        raise RuntimeError(f"{label}: {status.state}: {status.error}")
    times = [r["step_time_s"] for r in handle.metrics() if r["step"] >= args.warmup]
    handle.close()
    return Steady(label, statistics.median(times), len(times))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--d-model", type=int, default=192)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--global-batch", type=int, default=12)
    p.add_argument("--steps", type=int, default=45)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--device-ms", type=float, default=0.0, help="idle-host wait per forward pass, ms"
    )
    args = p.parse_args()
    args.every = 0  # job_spec's checkpoint.every; overridden to 0 (only the final one)
    return args


def main() -> None:
    args = parse_args()
    # Workers inherit the driver's environment (bench/sim_models.py reads it).
    os.environ["SHOAL_BENCH_DEVICE_MS"] = str(args.device_ms)
    start_ray(args)
    root = Path(tempfile.mkdtemp(prefix="shoal-replication-"))
    print(f"load average at start: {load_average()}; device_ms={args.device_ms}; runs in {root}")
    runs: list[Steady] = []
    for rep in range(args.repeats):
        shift = rep % len(MODES)
        for label, override in MODES[shift:] + MODES[:shift]:
            run = measure(args, root / f"{slug(label)}-{rep}", label, override)
            print(f"[{rep}] {label}: {run.median_step_s:.4f} s (load {load_average()})", flush=True)
            runs.append(run)
    print(f"\nload average at end: {load_average()}")
    print(
        f"\n| zero2, {args.workers} workers, device_ms={args.device_ms:g} | median step (s) [runs] "
        "| vs no replication |"
    )
    print("| --- | ---: | ---: |")
    medians = {}
    for label, _ in MODES:
        rows = [r.median_step_s for r in runs if r.label == label]
        medians[label] = statistics.median(rows)
        base = medians[MODES[0][0]]
        cells = ", ".join(f"{t:.4f}" for t in rows)
        print(f"| {label} | {medians[label]:.4f} [{cells}] | {medians[label] / base - 1:+.1%} |")
    sync, async_ = medians["sync"], medians["async"]
    print(f"\nasync / sync step time: {async_ / sync:.3f}")


if __name__ == "__main__":
    main()
