"""shoal's data-parallel overhead against plain PyTorch DDP, side by side on one machine.

What it measures, for the same model, data, optimizer and global batches:

* **plain DDP**: ``torch.multiprocessing`` spawns N processes that join a gloo
  process group on 127.0.0.1 and train ``torch.nn.parallel.DistributedDataParallel``
  around the same GPT (same config and seed), with ``torch.optim.AdamW`` and
  ``clip_grad_norm_`` using shoal's hyper-parameters and learning-rate schedule.
  Each rank takes exactly the rows of each global batch that shoal gives it
  (``orchestrator.shard_plan.batch_shares``) and one intra-op thread.
* **shoal**: the same job through the job API (``submit`` / ``handle.metrics()``),
  ``strategy=ddp``, one CPU per worker, no intermediate checkpoints, no sample.

For each: the wall time of every step (time between consecutive completed
steps, the definition shoal's ``step_time_s`` uses), reported as median and
mean after ``--warmup`` steps; and the start-up time from launch (before
``spawn``, or before ``submit`` including Ray's start) to the first completed
step. For shoal, also the time from "Ray is ready" to the first step. On a
shared machine wall times follow the other users' load, so it also reports
CPU seconds per steady-state step: of the training ranks (both systems) and
of everything else shoal runs (Ray's daemons, the controller, the driver),
read from /proc for this process's tree.

The per-step losses of both must agree (max abs difference printed): that is
what makes the comparison apples to apples. Torch's DDP *averages* gradients
over ranks while shoal *sums* them (its loss is divided by the global token
count), so the DDP loss here is multiplied by the world size before backward;
with a power-of-two world size that scaling is exact. DDP's gradients are
clipped by one norm over the concatenated gradient, as shoal does, so the
losses are bitwise equal; ``--torch-clip`` uses ``clip_grad_norm_`` instead
(per-parameter norms: same math, different rounding, which Adam amplifies).

Runs alternate (DDP first in even repeats, shoal first in odd ones) and Ray
is shut down after every shoal run, so neither side pays for the other's
background processes.

    python bench/ddp_overhead.py --model gpt_small --steps 40 --warmup 10 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from actors.data import VOCAB_SIZE, stdlib_text
from actors.datasets import windows
from actors.models.gpt import GPT
from collectives.optim import decay_groups

# -- results ------------------------------------------------------------------


@dataclass
class RunResult:
    """One training run of one system."""

    system: str  # "ddp" or "shoal"
    repeat: int
    losses: list[float]
    step_times: list[float]  # seconds between consecutive completed steps
    startup_s: float  # launch -> first completed step
    compute_s: list[float] = field(default_factory=list)  # forward+backward, mean over ranks
    comm_wait_s: list[float] = field(default_factory=list)  # all-reduce wait after backward
    ray_start_s: float | None = None  # shoal only: ray.init
    ready_to_first_s: float | None = None  # shoal only: Ray ready -> first completed step
    # CPU seconds per steady-state step, by process group ("ranks"; for shoal also "ray+control")
    cpu_per_step: dict[str, float] = field(default_factory=dict)
    load_before: float = 0.0  # 1-minute load average when the run started (other users' work)


@dataclass
class Summary:
    """Per-step statistics after warm-up, pooled over repeats."""

    system: str
    median_s: float
    mean_s: float
    startup_s: float  # median over repeats
    ready_to_first_s: float | None
    compute_s: float
    comm_wait_s: float

    @property
    def steps_per_s(self) -> float:
        return 1.0 / self.median_s


# -- the job both systems run -----------------------------------------------------


@dataclass(frozen=True)
class PlainJob:
    """Everything a plain DDP rank needs: no Ray, Hydra or shoal control plane in the children."""

    model_kwargs: dict
    max_bytes: int
    seed: int
    steps: int
    global_batch: int
    seq_len: int
    shares: tuple[int, ...]
    lrs: tuple[float, ...]
    weight_decay: float
    betas: tuple[float, float]
    grad_clip: float
    warmup: int = 0
    flat_norm: bool = False  # clip by the norm of the concatenated gradient, as shoal does


def clip_like_shoal(model: torch.nn.Module, max_norm: float) -> None:
    """``clip_grad_norm_`` with shoal's rounding: one norm over the flat gradient vector."""
    grads = [p.grad for p in model.parameters()]
    flat = torch.cat([g.reshape(-1) for g in grads])
    norm = torch.linalg.vector_norm(flat, 2, dtype=torch.float64).float()  # as DDPEngine.step
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef)


def shoal_overrides(args: argparse.Namespace, run_dir: str) -> list[str]:
    return [
        f"model={args.model}",
        f"cluster.workers={args.workers}",
        "cluster.cpus_per_worker=1",
        f"train.steps={args.steps}",
        f"train.global_batch={args.global_batch}",
        "train.sample_tokens=0",
        f"train.log_every={args.steps}",
        "checkpoint.every=0",
        "checkpoint.keep=1",
        f"run_dir={run_dir}",
    ]


def plain_job(args: argparse.Namespace) -> PlainJob:
    """The shoal job's configuration, resolved into the plain values a DDP script would use."""
    from plain_job import gpt_job_values

    from orchestrator import JobSpec
    from orchestrator.shard_plan import batch_shares

    spec = JobSpec.from_overrides(shoal_overrides(args, tempfile.gettempdir()))
    assert spec.train.micro_batches == 1
    return PlainJob(
        **gpt_job_values(spec),
        shares=tuple(batch_shares(spec.train.global_batch, [1.0] * args.workers)),
        warmup=args.warmup,
        flat_norm=not args.torch_clip,
    )


# -- plain PyTorch DDP ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_rank(rank: int, world: int, port: int, job: PlainJob, queue) -> None:
    """One plain DDP rank (the body of an ordinary ``torchrun``-style training script)."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    corpus = stdlib_text(job.max_bytes)
    tokens = corpus.tokens
    torch.manual_seed(job.seed)
    model = GPT(vocab_size=VOCAB_SIZE, **job.model_kwargs)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    # nanoGPT's two groups, as shoal's optimizer: weight decay on matrices only.
    opt = torch.optim.AdamW(
        decay_groups(list(model.parameters()), job.weight_decay),
        lr=job.lrs[0],
        betas=job.betas,
        foreach=False,
    )
    lo, hi = sum(job.shares[:rank]), sum(job.shares[: rank + 1])
    global_tokens = job.global_batch * job.seq_len

    losses, times, compute = [], [], []
    cpu_at_warmup = time.process_time()
    first_step_t = None
    last = time.perf_counter()
    for step in range(job.steps):
        # The windows a shoal job trains on (the held-out tail excluded).
        offsets = corpus.offsets(job.seed, step, job.global_batch, job.seq_len)
        x, y = windows(tokens, offsets[lo:hi], job.seq_len)
        for group in opt.param_groups:
            group["lr"] = job.lrs[step]
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        logits = ddp(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
        # DDP averages over ranks; shoal sums. Scale so both apply the global-batch gradient.
        (loss * (world / global_tokens)).backward()
        t1 = time.perf_counter()
        if job.flat_norm:
            clip_like_shoal(model, job.grad_clip)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), job.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
        now = time.perf_counter()
        times.append(now - last)
        compute.append(t1 - t0)  # includes the all-reduce DDP could not overlap
        last = now
        if first_step_t is None:
            first_step_t = time.time()
        if step + 1 == job.warmup:
            cpu_at_warmup = time.process_time()
    cpu_steady = time.process_time() - cpu_at_warmup
    queue.put({"rank": rank, "losses": losses, "times": times, "compute": compute,
               "cpu_steady": cpu_steady, "first_step_t": first_step_t})  # fmt: skip
    dist.destroy_process_group()


def run_ddp(job: PlainJob, workers: int, repeat: int) -> RunResult:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    launch_t = time.time()
    procs = mp.start_processes(
        ddp_rank,
        args=(workers, free_port(), job, queue),
        nprocs=workers,
        join=False,
        start_method="spawn",
    )
    ranks = sorted((queue.get() for _ in range(workers)), key=lambda r: r["rank"])
    while not procs.join():
        pass
    total_tokens = job.global_batch * job.seq_len
    losses = [sum(r["losses"][s] for r in ranks) / total_tokens for s in range(job.steps)]
    return RunResult(
        system="ddp",
        repeat=repeat,
        losses=losses,
        # The slowest rank finishes the step: take the per-step maximum.
        step_times=[max(r["times"][s] for r in ranks) for s in range(job.steps)],
        startup_s=max(r["first_step_t"] for r in ranks) - launch_t,
        compute_s=[statistics.fmean(r["compute"][s] for r in ranks) for s in range(job.steps)],
        comm_wait_s=[0.0] * job.steps,
        cpu_per_step={"ranks": sum(r["cpu_steady"] for r in ranks) / (job.steps - job.warmup)},
    )


# -- shoal ---------------------------------------------------------------------------------


def process_tree_cpu(root: int) -> dict[int, float]:
    """CPU seconds (user + system) of ``root`` and all its descendants, by pid (from /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    parent, cpu = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # fields after "pid (comm) "
        parent[int(entry)] = int(fields[1])
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    tree = {root}
    grew = True
    while grew:
        new = {pid for pid, ppid in parent.items() if ppid in tree} - tree
        tree |= new
        grew = bool(new)
    return {pid: cpu[pid] for pid in tree}


def cpu_split(before: dict[int, float], after: dict[int, float], workers: set[int]) -> dict:
    """CPU seconds between two snapshots: the worker ranks, and everything else (Ray, control)."""
    delta = {pid: t - before.get(pid, 0.0) for pid, t in after.items()}
    ranks = sum(t for pid, t in delta.items() if pid in workers)
    return {"ranks": ranks, "ray+control": sum(delta.values()) - ranks}


def wait_for_steps(handle, n: int, poll_s: float) -> int:
    """Poll until at least ``n`` steps are recorded (or the job ends); returns how many are."""
    while True:
        done = len(handle.metrics())
        if done >= n or handle.done():
            return done
        time.sleep(poll_s)


def run_shoal(args: argparse.Namespace, repeat: int, poll_s: float = 0.02) -> RunResult:
    import ray

    from orchestrator import JobSpec, JobState, submit
    from orchestrator.api import ensure_ray

    run_dir = tempfile.mkdtemp(prefix="shoal-bench-")
    try:
        spec = JobSpec.from_overrides(shoal_overrides(args, run_dir))
        t0 = time.perf_counter()
        ensure_ray(spec)  # what submit() does first; split out to time it
        t_ray = time.perf_counter()
        handle = submit(spec)
        wait_for_steps(handle, 1, poll_s)
        t_first = time.perf_counter()
        # CPU time of every process of the job over the steady-state steps (slow polling).
        workers = set(handle.worker_pids())
        n_a = wait_for_steps(handle, args.warmup, 0.2)
        cpu_a = process_tree_cpu(os.getpid())
        n_b = wait_for_steps(handle, args.steps - 1, 0.2)
        cpu_b = process_tree_cpu(os.getpid())
        status = handle.wait()
        if status.state != JobState.SUCCEEDED:
            raise RuntimeError(f"shoal job {status.state}: {status.error}")
        records = handle.metrics()
        handle.close()
    finally:
        ray.shutdown()
        shutil.rmtree(run_dir, ignore_errors=True)
    return RunResult(
        system="shoal",
        repeat=repeat,
        losses=[r["loss"] for r in records],
        step_times=[r["step_time_s"] for r in records],
        startup_s=t_first - t0,
        compute_s=[statistics.fmean(r["compute_s"]) for r in records],
        comm_wait_s=[statistics.fmean(r["comm_wait_s"]) for r in records],
        ray_start_s=t_ray - t0,
        ready_to_first_s=t_first - t_ray,
        cpu_per_step={
            k: v / max(1, n_b - n_a) for k, v in cpu_split(cpu_a, cpu_b, workers).items()
        },
    )


# -- report --------------------------------------------------------------------------------


def summarize(results: list[RunResult], warmup: int) -> Summary:
    steady = [t for r in results for t in r.step_times[warmup:]]
    ready = [r.ready_to_first_s for r in results if r.ready_to_first_s is not None]
    return Summary(
        system=results[0].system,
        median_s=statistics.median(steady),
        mean_s=statistics.fmean(steady),
        startup_s=statistics.median(r.startup_s for r in results),
        ready_to_first_s=statistics.median(ready) if ready else None,
        compute_s=statistics.median(c for r in results for c in r.compute_s[warmup:]),
        comm_wait_s=statistics.median(c for r in results for c in r.comm_wait_s[warmup:]),
    )


def max_loss_diff(results: list[RunResult]) -> float:
    """Largest per-step loss difference between any run and the first DDP run."""
    ref = next(r for r in results if r.system == "ddp").losses
    worst = 0.0
    for r in results:
        if len(r.losses) != len(ref):
            raise RuntimeError(
                f"{r.system} run {r.repeat}: {len(r.losses)} steps, expected {len(ref)}"
            )
        worst = max(worst, max(abs(a - b) for a, b in zip(r.losses, ref, strict=True)))
    return worst


def print_report(args: argparse.Namespace, results: list[RunResult]) -> None:
    ddp = summarize([r for r in results if r.system == "ddp"], args.warmup)
    shoal = summarize([r for r in results if r.system == "shoal"], args.warmup)
    diff = max_loss_diff(results)
    n_params = sum(p.numel() for p in GPT(VOCAB_SIZE, **plain_job(args).model_kwargs).parameters())

    print(f"\nmachine: {machine()}")
    print(
        f"model={args.model} ({n_params / 1e6:.2f}M params), workers={args.workers}, "
        f"global_batch={args.global_batch}, steps={args.steps} (first {args.warmup} excluded), "
        f"repeats={args.repeats}"
    )
    print(f"max |loss_shoal - loss_ddp| over all steps and runs: {diff:.3g}\n")
    for r in results:
        median = statistics.median(r.step_times[args.warmup :])
        print(
            f"  run {r.repeat} {r.system:5s}: median step {median:.4f}s"
            f", start-up {r.startup_s:.1f}s, load average before {r.load_before:.1f}"
        )
    print()
    print("| | plain DDP | shoal | shoal / DDP |")
    print("| --- | ---: | ---: | ---: |")
    row("steps/s (1 / median step)", ddp.steps_per_s, shoal.steps_per_s, "{:.3f}")
    row("median step time (s)", ddp.median_s, shoal.median_s, "{:.4f}")
    row("mean step time (s)", ddp.mean_s, shoal.mean_s, "{:.4f}")
    row("forward+backward per rank (s, median)", ddp.compute_s, shoal.compute_s, "{:.4f}")
    print(
        f"| all-reduce wait after backward (s, median) | in fwd+bwd | {shoal.comm_wait_s:.4f} | |"
    )
    cpu_d, cpu_s = cpu_medians(results, "ddp"), cpu_medians(results, "shoal")
    row("CPU s per step, training ranks (all ranks)", cpu_d["ranks"], cpu_s["ranks"], "{:.4f}")
    print(f"| CPU s per step, Ray + controller + driver | - | {cpu_s['ray+control']:.4f} | |")
    row("start-up: launch to first step (s)", ddp.startup_s, shoal.startup_s, "{:.1f}")
    ray_start = statistics.median(r.ray_start_s for r in results if r.ray_start_s is not None)
    print(f"| of which Ray start (s) | - | {ray_start:.1f} | |")
    print(f"| Ray ready to first step (s) | - | {shoal.ready_to_first_s:.1f} | |")


def cpu_medians(results: list[RunResult], system: str) -> dict[str, float]:
    runs = [r.cpu_per_step for r in results if r.system == system]
    return {k: statistics.median(run[k] for run in runs) for k in runs[0]}


def row(label: str, ddp: float, shoal: float, fmt: str) -> None:
    ratio = shoal / ddp
    print(f"| {label} | {fmt.format(ddp)} | {fmt.format(shoal)} | {ratio:.3f} |")


def machine() -> str:
    import ray

    cpu = platform.machine()
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    cpu = names[0] if names else cpu
    return (
        f"{cpu}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
        f"torch {torch.__version__} (gloo), ray {ray.__version__}"
    )


# -- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10, help="leading steps left out of step times")
    p.add_argument("--model", choices=("gpt_small", "gpt_tiny"), default="gpt_small")
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2, help="runs of each system, order alternated")
    p.add_argument(
        "--torch-clip",
        action="store_true",
        help="clip DDP gradients with clip_grad_norm_ (per-parameter norms: same math, different "
        "rounding, so losses drift apart by Adam-amplified 1-ulp differences) instead of one "
        "flat norm as shoal does (bitwise-equal losses)",
    )
    args = p.parse_args(argv)
    if not 0 <= args.warmup < args.steps:
        p.error("--warmup must be in [0, --steps)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    job = plain_job(args)
    results: list[RunResult] = []
    for repeat in range(args.repeats):
        order = ("ddp", "shoal") if repeat % 2 == 0 else ("shoal", "ddp")
        for system in order:
            print(f"[repeat {repeat}] {system} ...", file=sys.stderr, flush=True)
            t, load = time.perf_counter(), os.getloadavg()[0]
            if system == "ddp":
                results.append(run_ddp(job, args.workers, repeat))
            else:
                results.append(run_shoal(args, repeat))
            r = results[-1]
            r.load_before = load
            median = statistics.median(r.step_times[args.warmup :])
            print(
                f"[repeat {repeat}] {system}: {time.perf_counter() - t:.1f}s in all, median step "
                f"{median:.4f}s, CPU/step {r.cpu_per_step}, "
                f"start-up {r.startup_s:.1f}s, load average before {load:.1f}",
                file=sys.stderr,
                flush=True,
            )
    print_report(args, results)


if __name__ == "__main__":
    main()
