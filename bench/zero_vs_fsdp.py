"""shoal's DDP and ZeRO 1/2/3 engines against PyTorch FSDP2, ZeroRedundancyOptimizer and DDP.

For every world size in ``--world-sizes``, each variant below trains the same
GPT (same config and seed) on the same global batches (``actors.data``,
rows split by ``orchestrator.shard_plan.batch_shares``) with the same AdamW
hyper-parameters, learning-rate schedule and gradient clipping (the job
defaults of ``orchestrator.schema.TrainConfig``):

========================  ============================================================
variant                   what runs on each rank
========================  ============================================================
``ddp`` (shoal)           ``collectives.zero.build_engine("ddp", ...)``
``zero1/2/3`` (shoal)     ``build_engine("zero1" | "zero2" | "zero3", ...)``, even shards
``torch-ddp``             ``DistributedDataParallel(gradient_as_bucket_view=True)``
``torch-zero1``           the same DDP + ``ZeroRedundancyOptimizer(AdamW)``
``fsdp2-reshard``         ``fully_shard`` per block, then root, ``reshard_after_forward=True``
``fsdp2-noreshard``       the same with ``reshard_after_forward=False``
========================  ============================================================

Peers compared in the ``ratio`` column: zero3 / fsdp2-reshard (both free the
parameters after forward and gather them again for backward), zero2 /
fsdp2-noreshard (parameters kept from forward to backward, gradients sharded),
zero1 / torch-zero1 (only optimizer state sharded), ddp / torch-ddp.

Every variant runs in its own freshly spawned process group (one process per
rank, gloo on 127.0.0.1, ``torch.set_num_threads(1)``), one after another, so
neither timings nor memory leak from one into the next. World sizes above the
number of cores oversubscribe them (4 ranks on 2 cores: every rank gets half
a core at best), which slows compute and every collective.

Measured per variant:

* **step time**: per rank, the wall time between consecutive completed steps
  (data, forward, backward, clip, optimizer step); per step the slowest rank;
  the median after ``--warmup`` steps. Also the median forward, backward and
  optimizer (clip + step) time, averaged over ranks.
* **CPU time** per step: user + system time of all threads of a rank's
  process (compute and gloo's threads; gloo blocks rather than spins while
  waiting), median over steps, mean over ranks. On a machine shared with
  other work, wall times swing with the neighbours' load; CPU time measures
  the work a variant does and moves much less, but it cannot show overlap.
* **state bytes** per rank, counted from tensors right after the optimizer
  step (gradients still present): parameters, gradients and optimizer state.
  shoal: ``engine.memory_bytes()``. Torch variants: the distinct storages of
  the parameters (``DTensor.to_local()`` for FSDP2, which include its
  padding), of their ``.grad`` and of the optimizer's state tensors. FSDP2
  frees unsharded parameters after backward whatever ``reshard_after_forward``
  says, so at that point it holds only shards; shoal's stages 1-2 always hold
  the full parameters.
* **peak RSS** per rank (``ru_maxrss``), and its growth over the RSS measured
  after imports and data loading, before the model is built. Children run
  with ``MALLOC_MMAP_THRESHOLD_=65536`` so glibc returns freed large buffers
  to the OS instead of keeping them in its heap, which would otherwise make
  peak RSS reflect allocator history more than what a variant holds. The
  peak includes activations, which are the same for all variants.
* **loss** at every step: the global-batch mean token loss (every rank's
  token-sum loss summed, divided by the global token count). All variants are
  fp32 and should agree with ``torch-ddp`` to about 1e-5; the largest
  difference over all steps is printed, with the step where it occurs. With
  clipping on, the variants differ in how they round the global gradient
  norm (per-tensor fp32 norms in torch, per-shard DTensor norms in FSDP2, a
  float64 sum of squares in shoal's ZeRO, one fp32 norm over the flat
  gradient in shoal's DDP, which is off by ~1e-4 relative for millions of
  elements); AdamW turns a clip coefficient that differs in the last digits
  into parameter differences that a loss spike amplifies. ``--grad-clip 0``
  takes the norm out of the comparison.

Loss scaling: shoal sums gradients over ranks (its loss is divided by the
global token count); torch's DDP and FSDP2 average them, so their loss is
multiplied by the world size before backward (exact for powers of two).

    python bench/zero_vs_fsdp.py --world-sizes 2,4 --steps 15 --warmup 5 --repeats 2

``--device cuda`` runs the same comparison on NVIDIA GPUs: rank ``r`` uses
``cuda:r`` (every world size must be at most the GPU count), the process
groups are NCCL, FSDP2's mesh is a CUDA mesh, and the step end and every phase
timer wait for the GPU (``torch.cuda.synchronize``), so times are GPU times.
Memory is each rank's peak GPU memory (``torch.cuda.max_memory_allocated``,
activations included) instead of RSS; state bytes are counted as on CPU. Still
fp32; CPU time then mostly counts the host waiting for the GPU.

    python3 bench/zero_vs_fsdp.py --device cuda --world-sizes 1 --steps 30 --warmup 10 \\
        --repeats 2 --model gpt_small
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import socket
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from actors.data import VOCAB_SIZE, stdlib_text
from actors.datasets import windows
from actors.models.gpt import GPT
from collectives.optim import decay_groups

# Set before any child starts: glibc reads it once, at process start.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}

SHOAL = ("ddp", "zero1", "zero2", "zero3")
TORCH = ("torch-ddp", "torch-zero1", "fsdp2-noreshard", "fsdp2-reshard")
ALL_VARIANTS = SHOAL + TORCH
DEVICES = ("cpu", "cuda")
PEER = {
    "ddp": "torch-ddp",
    "zero1": "torch-zero1",
    "zero2": "fsdp2-noreshard",
    "zero3": "fsdp2-reshard",
}


# -- what every rank runs --------------------------------------------------------


@dataclass(frozen=True)
class BenchJob:
    """The resolved job: plain values only, so the children need no Hydra or Ray."""

    model_kwargs: dict
    max_bytes: int
    seed: int
    steps: int
    global_batch: int
    seq_len: int
    lrs: tuple[float, ...]
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    grad_clip: float
    bucket_mb: float


def resolve_job(args: argparse.Namespace) -> BenchJob:
    """The shoal job's defaults for ``--model`` and ``--global-batch``, as plain values."""
    from plain_job import gpt_job_values

    from orchestrator import JobSpec

    spec = JobSpec.from_overrides(
        [
            f"model={args.model}",
            f"train.steps={args.steps}",
            f"train.global_batch={args.global_batch}",
        ]
    )
    values = gpt_job_values(spec)
    if args.grad_clip is not None:
        values["grad_clip"] = args.grad_clip
    return BenchJob(**values, eps=1e-8, bucket_mb=spec.strategy.bucket_mb)


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one buffer count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        if hasattr(t, "to_local"):  # DTensor: this rank's shard
            t = t.to_local()
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


class ShoalRunner:
    """A shoal engine: sums gradients over ranks, so the loss is not rescaled."""

    loss_scale = 1.0

    def __init__(self, strategy: str, model: torch.nn.Module, job: BenchJob):
        from collectives.optim import OptimizerSpec
        from collectives.zero import build_engine

        spec = OptimizerSpec(
            "adamw", weight_decay=job.weight_decay, beta1=job.betas[0], beta2=job.betas[1]
        )
        self.engine = build_engine(
            strategy, model, spec, grad_clip=job.grad_clip, bucket_mb=job.bucket_mb
        )
        self.module = model

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self, lr: float) -> None:
        self.engine.step(lr)

    def state_bytes(self) -> dict[str, int]:
        return self.engine.memory_bytes()


class TorchRunner:
    """A torch wrapper (DDP, DDP + ZeroRedundancyOptimizer, FSDP2): averages over ranks."""

    def __init__(
        self,
        variant: str,
        model: torch.nn.Module,
        job: BenchJob,
        world: int,
        device: torch.device,
    ):
        self.loss_scale = float(world)
        self.params = list(model.parameters())
        opt_kwargs = dict(betas=job.betas, eps=job.eps)
        # On CPU foreach=False is torch's default and the code path shoal's
        # FlatOptimizer uses. On a GPU torch's default (foreach: a few fused
        # launches, not one per parameter) is what its users get, and what
        # shoal's flat update (one launch per state tensor) must be measured against.
        if device.type == "cpu":
            opt_kwargs["foreach"] = False
        self.grad_clip = job.grad_clip
        if variant.startswith("fsdp2"):
            self.module = _fully_shard(
                model, world, device.type, reshard=variant == "fsdp2-reshard"
            )
            self.params = list(model.parameters())  # now DTensors
        else:
            # A module on one GPU names it; on CPU, device_ids must be None.
            device_ids = [device.index] if device.type == "cuda" else None
            self.module = torch.nn.parallel.DistributedDataParallel(
                model,
                device_ids=device_ids,
                bucket_cap_mb=job.bucket_mb,
                gradient_as_bucket_view=True,
            )
        # nanoGPT's two groups, as shoal's optimizer: weight decay on matrices only.
        groups = decay_groups(self.params, job.weight_decay)
        if variant == "torch-zero1":
            from torch.distributed.optim import ZeroRedundancyOptimizer

            self.opt = ZeroRedundancyOptimizer(
                groups, optimizer_class=torch.optim.AdamW, lr=job.lrs[0], **opt_kwargs
            )
            self._local_opt = self.opt.optim
        else:
            self.opt = torch.optim.AdamW(groups, lr=job.lrs[0], **opt_kwargs)
            self._local_opt = self.opt

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, lr: float) -> None:
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()

    def state_bytes(self) -> dict[str, int]:
        state = [t for s in self._local_opt.state.values() for t in s.values()]
        return {
            "params": _storage_bytes(self.params),
            "grads": _storage_bytes(p.grad for p in self.params),
            "optimizer": _storage_bytes(t for t in state if isinstance(t, torch.Tensor)),
        }


def _fully_shard(model: GPT, world: int, device_type: str, *, reshard: bool) -> GPT:
    """FSDP2 on a ``device_type`` mesh over the default group: each block, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device_type, (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
    return model


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return r.ru_utime + r.ru_stime


def _no_sync() -> None:
    """On CPU every op has finished when it returns: nothing to wait for."""


def rank_main(
    rank: int, world: int, port: int, job: BenchJob, variant: str, queue, device_type: str
) -> None:
    """Train ``job.steps`` steps of ``variant`` on this rank; put its measurements on ``queue``."""
    torch.set_num_threads(1)
    init_method = f"tcp://127.0.0.1:{port}"
    cuda = device_type == "cuda"
    if cuda:
        # Rank r owns cuda:r. Binding the group to it (device_id) tells NCCL and barrier()
        # which GPU is this rank's, instead of every rank defaulting to cuda:0.
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        dist.init_process_group(
            "nccl", init_method=init_method, rank=rank, world_size=world, device_id=device
        )
        # Kernels run asynchronously: wait for them before reading a clock.
        sync = torch.cuda.synchronize
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
        sync = _no_sync
    from orchestrator.shard_plan import batch_shares

    corpus = stdlib_text(job.max_bytes)
    tokens = corpus.tokens
    shares = batch_shares(job.global_batch, [1.0] * world)
    lo, hi = sum(shares[:rank]), sum(shares[: rank + 1])
    global_tokens = job.global_batch * job.seq_len
    base_rss = _rss_bytes()

    torch.manual_seed(job.seed)
    # Built on CPU, then moved: the same initial weights on every device.
    model = GPT(vocab_size=VOCAB_SIZE, **job.model_kwargs).to(device)
    if variant in SHOAL:
        runner = ShoalRunner(variant, model, job)
    else:
        runner = TorchRunner(variant, model, job, world, device)

    losses, step_s, fwd_s, bwd_s, opt_s, cpu_s = [], [], [], [], [], []
    state = {}
    sync()  # the model's copy to the GPU is not part of step 0
    last, last_cpu = time.perf_counter(), _cpu_s()
    for step in range(job.steps):
        # The windows a shoal job trains on (the held-out tail excluded).
        offsets = corpus.offsets(job.seed, step, job.global_batch, job.seq_len)
        x, y = windows(tokens, offsets[lo:hi], job.seq_len)
        x, y = x.to(device), y.to(device)  # the same tensors on CPU
        runner.zero_grad()
        sync()
        t0 = time.perf_counter()
        logits = runner.module(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
        sync()
        t1 = time.perf_counter()
        runner.backward(loss * (runner.loss_scale / global_tokens))
        sync()
        t2 = time.perf_counter()
        runner.step(job.lrs[step])
        sync()
        now = time.perf_counter()
        if step == job.steps - 1:
            state = runner.state_bytes()  # after the step, before the next zero_grad
        losses.append(float(loss.detach()))
        fwd_s.append(t1 - t0)
        bwd_s.append(t2 - t1)
        opt_s.append(now - t2)
        step_s.append(now - last)
        cpu = _cpu_s()
        cpu_s.append(cpu - last_cpu)
        last, last_cpu = now, cpu
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    # GPU state lives outside RSS: on CUDA the caching allocator's peak is the measure.
    peak_gpu = torch.cuda.max_memory_allocated(device) if cuda else 0
    queue.put(
        {
            "rank": rank,
            "losses": losses,
            "step_s": step_s,
            "fwd_s": fwd_s,
            "bwd_s": bwd_s,
            "opt_s": opt_s,
            "cpu_s": cpu_s,
            "state": state,
            "peak_rss": peak_rss,
            "base_rss": base_rss,
            "peak_gpu": peak_gpu,
        }
    )
    # NCCL's barrier runs on a GPU; name this rank's (gloo takes no device_ids).
    dist.barrier(device_ids=[rank] if cuda else None)
    del runner, model
    dist.destroy_process_group()


# -- the parent: one process group per variant ------------------------------------


@dataclass
class VariantResult:
    """One variant at one world size, combined over its ranks."""

    variant: str
    world: int
    losses: list[float]  # global mean token loss per step
    step_s: list[float]  # per step, the slowest rank
    fwd_s: float  # medians after warm-up, mean over ranks
    bwd_s: float
    opt_s: float
    cpu_s: float  # CPU time per step (all threads), median after warm-up, mean over ranks
    state_bytes: int  # params + grads + optimizer, the largest rank
    state_detail: dict[str, int]  # of that rank
    peak_rss: int  # the largest rank
    rss_growth: int  # peak - RSS before the model was built, the largest rank
    wall_s: float  # spawn to join
    repeat: int = 0
    peak_gpu: int = 0  # torch.cuda.max_memory_allocated, the largest rank (0 on CPU)


def pooled(runs: list[VariantResult], warmup: int) -> VariantResult:
    """The repeats of one variant as one result: steady-state steps pooled, the rest the worst."""
    first = runs[0]
    steady = [t for r in runs for t in r.step_s[warmup:]]
    return VariantResult(
        variant=first.variant,
        world=first.world,
        losses=first.losses,
        step_s=first.step_s[:warmup] + steady,
        fwd_s=statistics.median(r.fwd_s for r in runs),
        bwd_s=statistics.median(r.bwd_s for r in runs),
        opt_s=statistics.median(r.opt_s for r in runs),
        cpu_s=statistics.median(r.cpu_s for r in runs),
        state_bytes=max(r.state_bytes for r in runs),
        state_detail=max(runs, key=lambda r: r.state_bytes).state_detail,
        peak_rss=max(r.peak_rss for r in runs),
        rss_growth=max(r.rss_growth for r in runs),
        wall_s=sum(r.wall_s for r in runs),
        peak_gpu=max(r.peak_gpu for r in runs),
    )


def median_step(r: VariantResult, warmup: int) -> float:
    return statistics.median(r.step_s[warmup:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_variant(
    job: BenchJob, variant: str, world: int, warmup: int, device_type: str = "cpu"
) -> VariantResult:
    os.environ.update(MALLOC_ENV)  # inherited by the spawned children
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    t0 = time.perf_counter()
    procs = mp.start_processes(
        rank_main,
        args=(world, free_port(), job, variant, queue, device_type),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    ranks = sorted((queue.get() for _ in range(world)), key=lambda r: r["rank"])
    try:
        while not procs.join():
            pass
    except mp.ProcessExitedException as e:
        # Every rank has reported; a crash while tearing down does not change the numbers.
        print(f"warning: {variant} (world {world}) after reporting: {e}", file=sys.stderr)
    wall = time.perf_counter() - t0
    return combine(variant, world, job, ranks, warmup, wall)


def combine(
    variant: str, world: int, job: BenchJob, ranks: list[dict], warmup: int, wall: float
) -> VariantResult:
    total_tokens = job.global_batch * job.seq_len
    steps = range(job.steps)

    def phase(key: str) -> float:
        per_step = [statistics.fmean(r[key][s] for r in ranks) for s in steps]
        return statistics.median(per_step[warmup:])

    biggest = max(ranks, key=lambda r: sum(r["state"].values()))
    return VariantResult(
        variant=variant,
        world=world,
        losses=[sum(r["losses"][s] for r in ranks) / total_tokens for s in steps],
        step_s=[max(r["step_s"][s] for r in ranks) for s in steps],
        fwd_s=phase("fwd_s"),
        bwd_s=phase("bwd_s"),
        opt_s=phase("opt_s"),
        cpu_s=phase("cpu_s"),
        state_bytes=sum(biggest["state"].values()),
        state_detail=dict(biggest["state"]),
        peak_rss=max(r["peak_rss"] for r in ranks),
        rss_growth=max(r["peak_rss"] - r["base_rss"] for r in ranks),
        wall_s=wall,
        peak_gpu=max(r["peak_gpu"] for r in ranks),
    )


# -- report ----------------------------------------------------------------------


def max_loss_diff(result: VariantResult, ref: VariantResult) -> tuple[float, int]:
    """The largest per-step loss difference and the step where it occurs."""
    diffs = [abs(a - b) for a, b in zip(result.losses, ref.losses, strict=True)]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    return diffs[worst], worst


def mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def print_table(results: list[VariantResult], warmup: int, device_type: str = "cpu") -> None:
    """One markdown table for one world size; ratios are against the variant's peer."""
    by_name = {r.variant: r for r in results}
    ref = by_name.get("torch-ddp", results[0])
    cuda = device_type == "cuda"
    memory = "peak GPU MiB/rank (max_memory_allocated)" if cuda else "peak RSS MiB (growth)"
    print(
        "| variant | step ms (median) | vs peer | CPU ms/step | CPU vs peer | fwd / bwd / opt ms "
        f"| state MiB/rank (params+grads+optim) | {memory} | max loss diff |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        step = median_step(r, warmup)
        peer = by_name.get(PEER.get(r.variant, ""))
        ratio = cpu_ratio = ""
        if peer:
            ratio = f"{step / median_step(peer, warmup):.2f} ({peer.variant})"
            cpu_ratio = f"{r.cpu_s / peer.cpu_s:.2f}"
        d = r.state_detail
        state = f"{mib(r.state_bytes)} ({mib(d['params'])}+{mib(d['grads'])}+{mib(d['optimizer'])})"
        diff, at = max_loss_diff(r, ref)
        phases = f"{r.fwd_s * 1e3:.0f} / {r.bwd_s * 1e3:.0f} / {r.opt_s * 1e3:.0f}"
        peak = mib(r.peak_gpu) if cuda else f"{mib(r.peak_rss)} ({mib(r.rss_growth)})"
        print(
            f"| {r.variant} | {step * 1e3:.0f} | {ratio} | {r.cpu_s * 1e3:.0f} | {cpu_ratio} "
            f"| {phases} | {state} | {peak} | {diff:.2g} (step {at}) |"
        )


def machine(device_type: str = "cpu") -> str:
    try:
        import ray

        ray_version = ray.__version__
    except ImportError:
        ray_version = "not installed"
    backend, gpus = "gloo", ""
    if device_type == "cuda":
        names = Counter(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        backend = "nccl"
        gpus = "".join(f", {n} x {name}" for name, n in names.items())
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores{gpus}, "
        f"Python {platform.python_version()}, torch {torch.__version__} ({backend}), "
        f"ray {ray_version}"
    )


# -- main ------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-sizes", default="2,4", help="comma-separated, e.g. 2,4")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10, help="leading steps left out of step times")
    p.add_argument("--model", choices=("gpt_small", "gpt_tiny"), default="gpt_small")
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument(
        "--grad-clip", type=float, default=None, help="override the job's (1.0); 0 disables"
    )
    p.add_argument("--repeats", type=int, default=2, help="runs of every variant, order rotated")
    p.add_argument(
        "--device", choices=DEVICES, default="cpu", help="cuda: rank r on cuda:r, NCCL groups"
    )
    p.add_argument(
        "--variants", default=",".join(ALL_VARIANTS), help=f"subset of {','.join(ALL_VARIANTS)}"
    )
    args = p.parse_args(argv)
    args.world_sizes = [int(w) for w in args.world_sizes.split(",")]
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = set(args.variants) - set(ALL_VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {list(ALL_VARIANTS)}")
    if not 0 <= args.warmup < args.steps:
        p.error("--warmup must be in [0, --steps)")
    if any(w < 1 for w in args.world_sizes):
        p.error("--world-sizes must be positive")
    if args.device == "cuda":
        check_cuda(p.prog, args.world_sizes)
    return args


def check_cuda(prog: str, world_sizes: list[int]) -> None:
    """Exit with one line (no usage, no traceback) if these GPUs cannot run ``world_sizes``."""
    if not torch.cuda.is_available():
        sys.exit(
            f"{prog}: error: --device cuda: CUDA is not available "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False)"
        )
    if not dist.is_nccl_available():
        sys.exit(f"{prog}: error: --device cuda: this torch ({torch.__version__}) has no NCCL")
    gpus = torch.cuda.device_count()
    if max(world_sizes) > gpus:
        sys.exit(
            f"{prog}: error: --world-sizes {','.join(map(str, world_sizes))}: rank r uses "
            f"cuda:r, so every world size must be <= the GPU count ({gpus} here)"
        )


def run_world(
    job: BenchJob, args: argparse.Namespace, world: int
) -> tuple[list[VariantResult], dict[str, list[VariantResult]]]:
    """Every variant ``args.repeats`` times; each repeat starts one variant later in the list."""
    runs: dict[str, list[VariantResult]] = {v: [] for v in args.variants}
    for repeat in range(args.repeats):
        k = repeat % len(args.variants)
        for variant in args.variants[k:] + args.variants[:k]:
            r = run_variant(job, variant, world, args.warmup, args.device)
            r.repeat = repeat
            runs[variant].append(r)
            print(
                f"[world {world}, repeat {repeat}] {variant}: "
                f"{median_step(r, args.warmup) * 1e3:.0f} ms/step, {r.wall_s:.1f}s wall",
                file=sys.stderr,
                flush=True,
            )
    return [pooled(runs[v], args.warmup) for v in args.variants], runs


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    job = resolve_job(args)
    n_params = sum(p.numel() for p in GPT(VOCAB_SIZE, **job.model_kwargs).parameters())
    print(f"machine: {machine(args.device)}")
    print(
        f"model={args.model} ({n_params / 1e6:.2f}M params), global_batch={args.global_batch}, "
        f"steps={args.steps} (first {args.warmup} excluded), repeats={args.repeats}, "
        f"grad_clip={job.grad_clip}, bucket_mb={job.bucket_mb}, children with {MALLOC_ENV}",
        flush=True,
    )
    cores = os.cpu_count() or 1
    for world in args.world_sizes:
        results, runs = run_world(job, args, world)
        over = f" (oversubscribed: {world} ranks on {cores} cores)" if world > cores else ""
        print(f"\n### world size {world}{over}\n")
        print_table(results, args.warmup, args.device)
        print("\nmedian step ms of each repeat (the spread is the machine's noise):")
        for variant, rs in runs.items():
            print(
                f"  {variant}: " + ", ".join(f"{median_step(r, args.warmup) * 1e3:.0f}" for r in rs)
            )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
