"""The largest GPT that trains under a per-worker memory cap, without offload and with it.

The issue's goal: under a fixed per-worker memory cap, offloading (optimizer
state, then parameters and gradients, to NVMe) trains a model with at least
4x the parameters of the largest one that fits without offload.

What runs: ``--workers`` worker processes (default 2; spawned, gloo on
127.0.0.1), each confined to ``--cap-mb``:

* **cgroup v1** (the default where ``/sys/fs/cgroup/memory`` is writable,
  e.g. as root): the parent creates one memory cgroup per worker,
  ``/sys/fs/cgroup/memory/shoal-memcap-<parent pid>-<rank>``, with
  ``memory.limit_in_bytes`` = the cap, and the worker moves itself into it
  first thing, before it imports torch (so the workers are started with
  ``multiprocessing``'s spawn context directly: ``torch.multiprocessing``'s
  own wrapper would import torch before the worker's first line). Going over
  the cap wakes the kernel's OOM killer, which kills the worker. The
  cgroups are removed after every trial. Everything the worker maps counts
  (torch's libraries included, about 250 MB of the cap), page cache too,
  but that is reclaimed before anything is killed; the NVMe tier uses
  ``O_DIRECT`` where the filesystem takes it, so its files stay out of it.
* **RLIMIT_AS** otherwise (said so at the top): a limit on the worker's
  virtual address space, which allocations fail against (``MemoryError``,
  or torch's ``RuntimeError``). Address space is not memory (torch and its
  threads reserve much more than they touch), so the same cap admits less
  than under a cgroup, and only the ratios are comparable.

Each worker builds shoal's ``actors.models.gpt.GPT`` (vocab 256,
``--seq-len``, ``--d-model``, ``n_layer`` varied) from one seed, wraps it in
``collectives.zero.build_engine("zero3", model, OptimizerSpec("adamw"),
offload=...)`` and trains ``--steps`` steps on random tokens with the call
sequence of ``actors/dp_runtime.py`` (``zero_grad``, forward, ``backward(loss
/ world)`` so the sum over ranks is the global-batch gradient, ``step(lr)``).
A size *fits* when every worker finishes all steps with finite losses; a
worker killed by the OOM killer, or raising ``MemoryError`` or an
out-of-memory ``RuntimeError``, means it does not. Any other failure is
reported as an error and also ends the search upwards.

Arms (``ARMS``; adding one is one line):

==============  =======================================================================
``none``        ZeRO-3, everything in the worker's memory
``opt-nvme``    ZeRO-3, ``OffloadSpec(optimizer="nvme")``: Adam's moments in NVMe files
``opt-host``    ZeRO-3, ``OffloadSpec(optimizer="host")`` (not run by default: host
                memory is the capped memory, so it cannot help; a control)
``params-nvme`` ZeRO-3, ``OffloadSpec(optimizer="nvme", params="nvme")``, the model built
                on the meta device and initialised by the engine (``init_seed``); run
                only when shoal's ``OffloadSpec`` has a ``params`` field
==============  =======================================================================

For each arm, the largest ``n_layer`` that fits is found by doubling from
``--start-layers`` until a size does not fit (or ``--max-layers``), then by
bisection. Printed per trial: fits or not, where a failed worker was
(model build, engine build, step k), the peak cgroup usage
(``memory.max_usage_in_bytes``, max over workers), ``memory.failcnt`` and
peak RSS; at the end one row per arm: largest ``n_layer``, its parameters,
its peak usage, and its parameters relative to the ``none`` arm (the goal:
>= 4x). A ``>=`` marks an arm that still fit at ``--max-layers``.

Two knobs show where memory goes besides the engine's own tensors:
``--malloc-mmap-threshold`` sets glibc's ``MALLOC_MMAP_THRESHOLD_`` in the
workers (by default glibc raises its mmap threshold after freeing a large
block, so the per-unit buffers stage 3 allocates and frees every step come
from heaps that keep the freed memory; a fixed threshold gives it back, at
some cost in page faults), and ``--chunk-mb`` sets ``OffloadSpec.chunk_mb``
(the NVMe tier keeps the chunk-sized buffers it has used for reuse).
``--phases`` prints, per trial, rank 0's peak cgroup usage in each phase
(model build, engine build, each step's forward, backward and optimizer
step; the cgroup's peak is reset between phases). "after X" in a failed
trial names the last phase a worker completed.

    .venv/bin/python bench/offload_memcap.py --cap-mb 1500 --phases    # as root (cgroups)
    .venv/bin/python bench/offload_memcap.py --malloc-mmap-threshold 1048576 --chunk-mb 2
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import resource
import shlex
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# No torch here: spawned workers import this module before confining themselves.

REPO = Path(__file__).resolve().parent.parent
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
MB = 1 << 20


@dataclass(frozen=True)
class Arm:
    name: str
    offload: dict | None  # OffloadSpec(**offload) (nvme_path and job_id added); None: none
    meta_init: bool = False  # build the model on the meta device; the engine initialises it
    needs: str | None = None  # an OffloadSpec field the arm needs (skipped without it)


ARMS = [
    Arm("none", None),
    Arm("opt-nvme", {"optimizer": "nvme"}),
    Arm("opt-host", {"optimizer": "host"}),
    Arm("params-nvme", {"optimizer": "nvme", "params": "nvme"}, meta_init=True, needs="params"),
]
DEFAULT_ARMS = "none,opt-nvme,params-nvme"


# -- the worker (a spawned process) ---------------------------------------------------


def _confine(cgroup: str | None, cap_bytes: int) -> None:
    if cgroup is not None:
        (Path(cgroup) / "cgroup.procs").write_text(str(os.getpid()))
    else:
        resource.setrlimit(resource.RLIMIT_AS, (cap_bytes, cap_bytes))


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and any(
        s in msg for s in ("out of memory", "allocate memory", "not enough memory")
    )


def _worker(rank: int, world: int, port: int, cfg: dict, cgroup: str | None, log: str) -> None:
    """One rank: confine, build, train ``cfg['steps']`` steps; phases appended to ``log``."""
    _confine(cgroup, cfg["cap_bytes"])

    def usage_mb() -> float | None:
        if cgroup is None:
            return None
        return int((Path(cgroup) / "memory.usage_in_bytes").read_text()) / MB

    def phase_peak_mb() -> float | None:
        """The cgroup's peak usage since the last call (which reset it)."""
        if cgroup is None:
            return None
        path = Path(cgroup) / "memory.max_usage_in_bytes"
        peak = int(path.read_text()) / MB
        path.write_text("0")  # v1: the peak restarts from the current usage
        return peak

    def mark(phase: str, **extra) -> None:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rec = {"phase": phase, "peak_rss_mb": rss, "peak_mb": phase_peak_mb()}
        rec.update(usage_mb=usage_mb(), **extra)
        with open(log, "a") as f:
            f.write(json.dumps(rec) + "\n")

    try:
        os.nice(cfg["nice"])
        sys.path.insert(0, str(REPO))
        import torch
        import torch.distributed as dist
        import torch.nn.functional as F

        torch.set_num_threads(cfg["threads"])
        from datetime import timedelta

        from actors.models.gpt import GPT
        from collectives.offloaded_optim import OffloadSpec
        from collectives.optim import OptimizerSpec
        from collectives.zero import build_engine

        mark("import")
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=cfg["timeout_s"]),
        )
        kwargs = dict(
            vocab_size=cfg["vocab"],
            n_layer=cfg["n_layer"],
            n_head=cfg["n_head"],
            d_model=cfg["d_model"],
            seq_len=cfg["seq_len"],
        )
        extra = {}
        if cfg["meta_init"]:
            # As actors/dp_runtime.py does for offloaded parameters: a lazy build,
            # and glibc's mmap threshold fixed (a no-op if the bench already set it).
            from actors.memory import fix_mmap_threshold

            if not os.environ.get("MALLOC_MMAP_THRESHOLD_"):
                fix_mmap_threshold()
            with torch.device("meta"):
                model = GPT(**kwargs)
            extra["init_seed"] = cfg["seed"]
        else:
            torch.manual_seed(cfg["seed"])
            model = GPT(**kwargs)
        mark("model")
        offload = OffloadSpec(**cfg["offload"]) if cfg["offload"] is not None else None
        spec = OptimizerSpec(name="adamw", weight_decay=0.1)
        engine = build_engine("zero3", model, spec, offload=offload, **extra)
        mark("engine", memory_bytes=engine.memory_bytes())
        B, T, V = cfg["batch"], cfg["seq_len"], cfg["vocab"]
        for step in range(cfg["steps"]):
            g = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + step)
            rows = torch.randint(0, V, (world * B, T + 1), generator=g)[rank * B : (rank + 1) * B]
            k = step + 1
            t0 = time.perf_counter()
            engine.zero_grad()
            logits = engine.model(rows[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, V).float(), rows[:, 1:].reshape(-1))
            t1 = time.perf_counter()
            mark(f"forward {k}")
            # dp_runtime's scaling: summed over ranks, the gradients are the global mean's.
            engine.backward(loss / world)
            t2 = time.perf_counter()
            mark(f"backward {k}")
            engine.step(cfg["lr"])
            dt = time.perf_counter() - t2 + (t1 - t0) + (t2 - t1)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"loss is {value} at step {step}")
            mark(f"step {k}", loss=value, step_s=dt)
        engine.close()
        dist.destroy_process_group()
        mark("done")
    except BaseException as e:  # noqa: BLE001 - every failure is reported to the parent
        kind = "oom" if _is_oom(e) else "error"
        mark("failed", kind=kind, error=f"{type(e).__name__}: {str(e)[:2000]}")
        sys.exit(3)


# -- the parent ---------------------------------------------------------------------


@dataclass
class Trial:
    n_layer: int
    n_params: int
    fits: bool
    oom: bool  # did not fit for lack of memory (not another error)
    where: str  # the phase the worst worker reached / failed in
    peak_mb: float | None  # max over workers of memory.max_usage_in_bytes
    failcnt: int | None
    peak_rss_mb: float
    step_s: float | None  # median over steps of rank 0's step time
    error: str = ""
    phases: list[list[dict]] = field(default_factory=list)  # per rank


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cgroup_usable() -> tuple[bool, str]:
    probe = CGROUP_ROOT / f"shoal-memcap-{os.getpid()}-probe"
    try:
        probe.mkdir()
        (probe / "memory.limit_in_bytes").write_text(str(64 * MB))
        probe.rmdir()
        return True, f"cgroup v1 memory controller at {CGROUP_ROOT}"
    except OSError as e:
        if probe.exists():
            probe.rmdir()
        return False, f"cgroup v1 memory not writable ({e}); falling back to RLIMIT_AS"


def n_params_of(cfg: dict) -> int:
    import torch

    sys.path.insert(0, str(REPO))
    from actors.models.gpt import GPT

    with torch.device("meta"):
        m = GPT(
            vocab_size=cfg["vocab"],
            n_layer=cfg["n_layer"],
            n_head=cfg["n_head"],
            d_model=cfg["d_model"],
            seq_len=cfg["seq_len"],
        )
    return sum(p.numel() for p in m.parameters())


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError):
        return None


def _oom_kills(cg: Path) -> int:
    try:
        for line in (cg / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_trial(arm: Arm, n_layer: int, args: argparse.Namespace, use_cgroup: bool) -> Trial:
    """Train ``n_layer`` layers on ``args.workers`` capped workers; did it fit?"""
    run_trial.count = getattr(run_trial, "count", 0) + 1
    job_id = f"memcap-{os.getpid()}-{run_trial.count}"
    cap = int(args.cap_mb * MB)
    offload = None
    if arm.offload is not None:
        offload = dict(arm.offload, job_id=job_id)
        if args.chunk_mb:
            offload["chunk_mb"] = args.chunk_mb
        if "nvme" in arm.offload.values():
            offload["nvme_path"] = args.nvme_path
    cfg = {
        "cap_bytes": cap,
        "vocab": 256,
        "n_layer": n_layer,
        "n_head": args.n_head,
        "d_model": args.d_model,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "steps": args.steps,
        "lr": 1e-3,
        "seed": 0,
        "threads": args.threads,
        "nice": args.nice,
        "meta_init": arm.meta_init,
        "offload": offload,
        "timeout_s": args.trial_timeout,
    }
    n_params = n_params_of(cfg)
    ctx = mp.get_context("spawn")
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="shoal-memcap-"))
    cgroups: list[Path | None] = []
    procs = []
    try:
        for rank in range(args.workers):
            cg = None
            if use_cgroup:
                cg = CGROUP_ROOT / f"shoal-memcap-{os.getpid()}-{rank}"
                cg.mkdir()
                (cg / "memory.limit_in_bytes").write_text(str(cap))
            cgroups.append(cg)
            log = tmp / f"rank{rank}.jsonl"
            p = ctx.Process(
                target=_worker,
                args=(rank, args.workers, port, cfg, str(cg) if cg else None, str(log)),
                daemon=True,
            )
            p.start()
            procs.append(p)
        deadline = time.monotonic() + args.trial_timeout
        while any(p.is_alive() for p in procs):
            if any(p.exitcode not in (None, 0) for p in procs):
                # A rank died: its peers may wait in a collective until their timeout.
                grace = time.monotonic() + 10
                while any(p.is_alive() for p in procs) and time.monotonic() < grace:
                    time.sleep(0.2)
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        timed_out = False
        for p in procs:
            if p.is_alive():
                timed_out = timed_out or not any(q.exitcode not in (None, 0) for q in procs)
                p.kill()
            p.join()
        phases = []
        for rank in range(args.workers):
            log = tmp / f"rank{rank}.jsonl"
            recs = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
            phases.append(recs)
        peaks, fails, killed = [], [], []
        for cg in cgroups:
            if cg is None:
                continue
            peaks.append((_read_int(cg / "memory.max_usage_in_bytes") or 0) / MB)
            fails.append(_read_int(cg / "memory.failcnt") or 0)
            killed.append(_oom_kills(cg))
    finally:
        for cg in cgroups:
            if cg is not None:
                for _ in range(50):  # empty once its processes are reaped
                    try:
                        cg.rmdir()
                        break
                    except FileNotFoundError:
                        break
                    except OSError:
                        time.sleep(0.1)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(Path(args.nvme_path) / job_id, ignore_errors=True)

    fits = all(p.exitcode == 0 for p in procs) and all(
        r and r[-1]["phase"] == "done" for r in phases
    )
    oom, where, error = False, "done", ""
    if not fits:
        # A worker out of memory makes its peers fail too (a closed connection): the
        # out-of-memory worker, if any, is the cause; else the first error.
        causes = []
        for rank, (p, recs) in enumerate(zip(procs, phases, strict=True)):
            last = recs[-1] if recs else {"phase": "start"}
            if last["phase"] == "failed":
                before = recs[-2]["phase"] if len(recs) > 1 else "start"
                causes.append((last["kind"] == "oom", f"rank {rank} after {before}", last["error"]))
            elif p.exitcode == -9 and (not use_cgroup or (killed and killed[rank] > 0)):
                causes.append((True, f"rank {rank} after {last['phase']}", "OOM-killed"))
        causes.sort(key=lambda c: not c[0])
        if causes:
            oom, where, error = causes[0]
        else:
            where, error = "?", "timed out" if timed_out else "a worker exited without a record"
    steps = [r["step_s"] for r in (phases[0] if phases else []) if "step_s" in r]
    rss = max((r["peak_rss_mb"] for recs in phases for r in recs), default=0.0)
    peaks += [r["peak_mb"] for recs in phases for r in recs if r.get("peak_mb") is not None]
    return Trial(
        n_layer=n_layer,
        n_params=n_params,
        fits=fits,
        oom=oom,
        where=where,
        peak_mb=max(peaks) if peaks else None,
        failcnt=max(fails) if fails else None,
        peak_rss_mb=rss,
        step_s=sorted(steps)[len(steps) // 2] if steps else None,
        error=error,
        phases=phases,
    )


def describe(arm: Arm, t: Trial) -> str:
    peak = f"{t.peak_mb:.0f} MB" if t.peak_mb is not None else "-"
    head = f"  {arm.name:<12} n_layer={t.n_layer:<4} {t.n_params / 1e6:>8.1f}M params: "
    mem = f"peak cgroup {peak}, failcnt {t.failcnt}, peak RSS {t.peak_rss_mb:.0f} MB"
    if t.fits:
        return head + f"fits     ({mem}, step {t.step_s:.2f} s)"
    status = "OOM     " if t.oom else "ERROR   "
    return head + f"{status} ({t.where}; {mem}){'' if t.oom else ': ' + t.error}"


def phase_table(t: Trial) -> str:
    """Rank 0's cgroup peak during each phase (or, without a cgroup, its peak RSS so far)."""
    recs = t.phases[0] if t.phases else []
    parts = []
    for r in recs:
        if r["phase"] in ("failed", "done"):
            continue
        if r.get("peak_mb") is not None:
            parts.append(f"{r['phase']} {r['peak_mb']:.0f}")
        else:
            parts.append(f"{r['phase']} rss<={r['peak_rss_mb']:.0f}")
    return "    rank 0 peak MB per phase: " + ", ".join(parts)


def search(
    arm: Arm, args: argparse.Namespace, use_cgroup: bool
) -> tuple[Trial | None, bool, Trial | None]:
    """(largest fitting trial, whether --max-layers still fit, the smallest failing trial)."""
    best: Trial | None = None
    fail: Trial | None = None

    def trial(n: int) -> Trial:
        t = run_trial(arm, n, args, use_cgroup)
        print(describe(arm, t), flush=True)
        if args.phases:
            print(phase_table(t), flush=True)
        return t

    n = args.start_layers
    while True:  # doubling
        t = trial(n)
        if not t.fits:
            fail = t
            break
        best = t
        if n >= args.max_layers:
            return best, True, None
        n = min(2 * n, args.max_layers)
    if not fail.oom:
        return best, False, fail  # an error, not memory: do not search below it
    lo = best.n_layer if best else 0
    hi = fail.n_layer
    while hi - lo > 1:  # bisection: lo fits (or is 0), hi does not
        mid = (lo + hi) // 2
        t = trial(mid)
        if t.fits:
            lo, best = mid, t
        else:
            hi, fail = mid, t
            if not t.oom:
                break
    return best, False, fail


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cap-mb", type=float, default=1500, help="memory cap per worker")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=2, help="rows per worker per step")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--nvme-path", default=os.path.join(tempfile.gettempdir(), "shoal-nvme"))
    p.add_argument("--arms", default=DEFAULT_ARMS, help=f"of {[a.name for a in ARMS]}")
    p.add_argument(
        "--chunk-mb", type=float, default=0, help="OffloadSpec.chunk_mb (0: its default)"
    )
    p.add_argument("--start-layers", type=int, default=2)
    p.add_argument("--max-layers", type=int, default=128, help="the search stops here")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--nice", type=int, default=5, help="workers' niceness increment")
    p.add_argument("--trial-timeout", type=float, default=900, help="seconds per trial")
    p.add_argument("--phases", action="store_true", help="print rank 0's memory per phase")
    p.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=0,
        help="set glibc's MALLOC_MMAP_THRESHOLD_ in the workers (bytes; 0: glibc's default)",
    )
    args = p.parse_args()
    if args.malloc_mmap_threshold:
        # Inherited by the spawned workers; a fixed threshold also turns off glibc's
        # dynamic raising of it, so freed large buffers go back to the kernel.
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    sys.path.insert(0, str(REPO))

    by_name = {a.name: a for a in ARMS}
    arms = []
    for name in args.arms.split(","):
        if name not in by_name:
            p.error(f"unknown arm {name!r}; arms: {', '.join(by_name)}")
        arms.append(by_name[name])
    from collectives.offloaded_optim import OffloadSpec

    fields = OffloadSpec.__dataclass_fields__
    print("$", shlex.join([sys.executable, *sys.argv]))
    use_cgroup, how = cgroup_usable()
    print(f"cap: {args.cap_mb:g} MB per worker, {args.workers} workers; {how}")
    malloc = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    print(f"glibc MALLOC_MMAP_THRESHOLD_: {malloc or 'default (dynamic)'}")
    print(
        f"GPT vocab 256, d_model {args.d_model}, n_head {args.n_head}, seq_len {args.seq_len}, "
        f"{args.batch} rows per worker; ZeRO-3 AdamW, {args.steps} steps; "
        f"n_layer from {args.start_layers}, doubling then bisecting, at most {args.max_layers}"
    )
    results = []
    for arm in arms:
        if arm.needs and arm.needs not in fields:
            print(f"arm {arm.name}: skipped, OffloadSpec has no {arm.needs!r} field yet")
            continue
        print(f"arm {arm.name}:", flush=True)
        results.append((arm, *search(arm, args, use_cgroup)))

    base = next((b for a, b, _, _ in results if a.name == "none" and b is not None), None)
    print(f"\nlargest GPT that trains {args.steps} steps under {args.cap_mb:g} MB per worker:")
    print(
        f"{'arm':<12} {'n_layer':>8} {'params':>10} {'peak cg MB':>11} {'peak RSS':>9} "
        f"{'step s':>7} {'vs none':>8}  first failure"
    )
    for arm, best, at_max, fail in results:
        ge = ">=" if at_max else ""
        first = "-"
        if fail is not None:
            first = f"n_layer={fail.n_layer}: {'OOM' if fail.oom else 'error'} ({fail.where})"
        if best is None:
            print(
                f"{arm.name:<12} {'0':>8} {'-':>10} {'-':>11} {'-':>9} {'-':>7} {'-':>8}  {first}"
            )
            continue
        peak = f"{best.peak_mb:.0f}" if best.peak_mb is not None else "-"
        ratio = f"{ge}{best.n_params / base.n_params:.2f}x" if base else "-"
        print(
            f"{arm.name:<12} {ge + str(best.n_layer):>8} {best.n_params / 1e6:>9.1f}M {peak:>11} "
            f"{best.peak_rss_mb:>9.0f} {best.step_s:>7.2f} {ratio:>8}  {first}"
        )


if __name__ == "__main__":
    main()
