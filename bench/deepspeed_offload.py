"""DeepSpeed's ZeRO-Offload beside shoal's offloaded ZeRO-3, same GPT, same batches, on CPU.

The issue's point (d): where DeepSpeed's ZeRO-Offload runs on this machine,
the same model side by side. DeepSpeed is **not** a shoal dependency: this
script makes its own virtualenv (``--venv``, default
``/tmp/shoal-bench-deepspeed``) with ``pip install torch==<shoal's torch>
deepspeed`` (the CPU torch wheel this machine has; any other torch version
would pull a multi-GB CUDA wheel) and runs DeepSpeed there, in child
processes, with ``DS_ACCELERATOR=cpu`` (gloo collectives when oneCCL is not
installed). shoal runs in shoal's own interpreter, in the same kind of child
processes.

Both sides train ``actors.models.gpt.GPT`` (imported from this checkout via
``PYTHONPATH``: it needs only torch) built from the same seed, on the same
random token batches (``--batch`` rows per worker, ``--workers`` workers,
one process each, gloo on 127.0.0.1), with AdamW (no weight decay, no
clipping, constant learning rate), for ``--steps`` steps:

====================  ==================================================================
side                  what runs on each rank
====================  ==================================================================
``deepspeed``         ``deepspeed.initialize`` with ZeRO stage 3,
                      ``offload_optimizer`` and ``offload_param`` on ``--offload``
                      (``cpu``, or ``nvme`` under ``--nvme-path``); AdamW as
                      DeepSpeedCPUAdam (a C++ op DeepSpeed builds on first use), or
                      ``torch.optim.AdamW`` with ``--ds-optimizer torch``
``shoal``             ``collectives.zero.build_engine("zero3", ...)`` with
                      ``OffloadSpec(optimizer="host")`` (``--offload cpu``) or
                      ``"nvme"``; parameters also offloaded (``params="nvme"``, model
                      built on the meta device) when ``--offload nvme`` and shoal's
                      ``OffloadSpec`` has a ``params`` field
====================  ==================================================================

Printed: per side the median step time after ``--warmup`` steps (per step
the slowest rank; a barrier before each step), the ratio shoal / DeepSpeed,
each side's peak RSS per worker, and the losses of the first and last step
(the same model, data and optimizer, so they should agree closely; ZeRO-3
reduces in a different order, so not to the bit; with shoal's parameters
offloaded the model is initialised by the engine, unit by unit, so its
initial weights and losses differ). A side that cannot run prints the exact
error its workers raised instead of numbers.

On a CPU-only machine DeepSpeed 0.19.8 runs with its CPU accelerator and gloo
(no oneCCL or intel_extension_for_pytorch needed); the first run JIT-builds
DeepSpeedCPUAdam and its shared-memory collectives with the system's g++
(into ``<venv>/torch_extensions``, a few minutes). ``--offload nvme`` also
builds its ``async_io`` op, which needs libaio's headers (Debian:
``apt-get install libaio-dev``); without them DeepSpeed stops with "Unable
to JIT load the async_io op due to it not being compatible".

    python bench/deepspeed_offload.py                       # cpu offload, 2 workers
    python bench/deepspeed_offload.py --offload nvme --nvme-path /tmp/shoal-nvme
    python bench/deepspeed_offload.py --n-layer 8 --d-model 512 --steps 12
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The worker, run once per rank by the interpreter of its side (shoal's venv or
# DeepSpeed's). Reads a JSON config (argv[1]); rank 0 writes its results to
# cfg["out"]. RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT come from the env.
CHILD = r"""
import json, os, resource, statistics, sys, time

cfg = json.load(open(sys.argv[1]))
import torch
import torch.distributed as dist
import torch.nn.functional as F

torch.set_num_threads(cfg["threads"])
from actors.models.gpt import GPT

rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
B, T, V = cfg["batch"], cfg["seq_len"], cfg["vocab"]


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_kwargs():
    return dict(vocab_size=V, n_layer=cfg["n_layer"], n_head=cfg["n_head"],
                d_model=cfg["d_model"], seq_len=T, dropout=0.0)


def batch(step):
    g = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + step)
    rows = torch.randint(0, V, (world * B, T + 1), generator=g)[rank * B:(rank + 1) * B]
    return rows[:, :-1], rows[:, 1:]


def loss_of(model, step):
    x, y = batch(step)
    return F.cross_entropy(model(x).reshape(-1, V).float(), y.reshape(-1))


marks = {}
if cfg["side"] == "deepspeed":
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    torch.manual_seed(cfg["seed"])
    model = GPT(**model_kwargs())
    marks["model_built_mb"] = rss_mb()
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=cfg["ds_config"]
    )
    marks["engine_built_mb"] = rss_mb()
    marks["optimizer"] = type(optimizer).__name__ + "/" + type(
        getattr(optimizer, "optimizer", optimizer)).__name__

    def train_step(step):
        loss = loss_of(engine, step)  # the engine's forward gathers the parameters
        engine.backward(loss)  # DeepSpeed averages the gradients over ranks
        engine.step()
        return loss.detach()
else:
    from collectives.offloaded_optim import OffloadSpec
    from collectives.optim import OptimizerSpec
    from collectives.zero import build_engine

    dist.init_process_group("gloo", rank=rank, world_size=world)
    kw = dict(cfg["offload"])
    extra = {}
    if kw.get("params", "none") != "none":
        with torch.device("meta"):
            model = GPT(**model_kwargs())
        extra["init_seed"] = cfg["seed"]
    else:
        torch.manual_seed(cfg["seed"])
        model = GPT(**model_kwargs())
    marks["model_built_mb"] = rss_mb()
    spec = OptimizerSpec(name="adamw", weight_decay=0.0, beta1=0.9, beta2=0.95, eps=1e-8)
    engine = build_engine("zero3", model, spec, offload=OffloadSpec(**kw), **extra)
    marks["engine_built_mb"] = rss_mb()
    marks["optimizer"] = type(engine.optimizer).__name__ + "".join(
        f" {k}={v}" for k, v in kw.items() if k in ("optimizer", "params")
    )

    def train_step(step):
        engine.zero_grad()
        loss = loss_of(engine.model, step)
        # shoal's contract: the SUM over ranks of the gradients is the global-batch
        # gradient (dp_runtime scales by the global batch), so each rank's mean / world.
        engine.backward(loss / world)
        engine.step(cfg["lr"])
        return loss.detach()

times, losses = [], []
for step in range(cfg["steps"]):
    dist.barrier()
    t0 = time.perf_counter()
    loss = train_step(step)
    dt = torch.tensor([time.perf_counter() - t0])
    dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # the slowest rank's step
    dist.all_reduce(loss, op=dist.ReduceOp.SUM)
    times.append(float(dt))
    losses.append(float(loss) / world)
peak = torch.tensor([rss_mb()])
dist.all_reduce(peak, op=dist.ReduceOp.MAX)
if rank == 0:
    with torch.device("meta"):
        n_params = sum(p.numel() for p in GPT(**model_kwargs()).parameters())
    with open(cfg["out"], "w") as f:
        json.dump({"times": times, "losses": losses, "peak_rss_mb": float(peak),
                   "n_params": n_params, **marks}, f)
if cfg["side"] == "shoal":
    engine.close()
dist.destroy_process_group()
"""


@dataclass
class Side:
    name: str
    ok: bool
    result: dict | None = None
    error: str = ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shoal_torch_version() -> str:
    import torch

    return torch.__version__.split("+")[0]


def ensure_venv(venv: Path, ds_version: str) -> tuple[Path | None, str]:
    """DeepSpeed's own interpreter (made and filled on first use), or None and why not."""
    py = venv / "bin" / "python"
    probe = [
        str(py),
        "-c",
        "import deepspeed, torch; print(deepspeed.__version__, torch.__version__)",
    ]
    if py.exists():
        r = subprocess.run(probe, capture_output=True, text=True)
        if r.returncode == 0:
            return py, r.stdout.strip().splitlines()[-1]
    torch_req = f"torch=={shoal_torch_version()}"
    ds_req = f"deepspeed=={ds_version}" if ds_version else "deepspeed"
    cmds = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(py), "-m", "pip", "install", "--quiet", torch_req, ds_req],
    ]
    for cmd in cmds:
        print("$", shlex.join(cmd), flush=True)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            return None, f"{shlex.join(cmd)} failed:\n{(r.stdout + r.stderr)[-3000:]}"
    r = subprocess.run(probe, capture_output=True, text=True)
    if r.returncode != 0:
        return None, f"deepspeed does not import in {venv}:\n{r.stderr[-3000:]}"
    return py, r.stdout.strip().splitlines()[-1]


def run_nvme_dir(args: argparse.Namespace) -> Path:
    """This run's files under --nvme-path (removed at the end: DeepSpeed leaves its swap files)."""
    return Path(args.nvme_path) / f"ds-bench-{os.getpid()}"


def ds_config(args: argparse.Namespace) -> dict:
    def place(kind: str) -> dict:
        out = {"device": args.offload}
        if args.offload == "nvme":
            out["nvme_path"] = str(run_nvme_dir(args) / f"deepspeed-{kind}")
        if kind == "optimizer":
            out["pin_memory"] = False
        return out

    return {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_accumulation_steps": 1,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": args.lr, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0},
        },
        "gradient_clipping": 0.0,
        "zero_force_ds_cpu_optimizer": args.ds_optimizer == "cpu_adam",
        "zero_optimization": {
            "stage": 3,
            "offload_optimizer": place("optimizer"),
            "offload_param": place("param"),
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def shoal_offload(args: argparse.Namespace) -> dict:
    from collectives.offloaded_optim import OffloadSpec

    kw: dict = {"optimizer": "host" if args.offload == "cpu" else "nvme", "job_id": "ds-bench"}
    if args.offload == "nvme":
        kw["nvme_path"] = str(run_nvme_dir(args) / "shoal")
        if "params" in OffloadSpec.__dataclass_fields__:
            kw["params"] = "nvme"
    return kw


def launch(side: str, python: Path, cfg: dict, args: argparse.Namespace, work: Path) -> Side:
    """Run CHILD on ``--workers`` ranks with ``python``; rank 0's results or the first error."""
    script = work / "child.py"
    script.write_text(CHILD)
    cfg = dict(cfg, side=side, out=str(work / f"{side}.json"))
    cfg_path = work / f"{side}.cfg.json"
    cfg_path.write_text(json.dumps(cfg))
    port = free_port()
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(REPO),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(args.workers),
        OMP_NUM_THREADS=str(args.threads),
    )
    if side == "deepspeed":
        env.update(
            DS_ACCELERATOR="cpu",
            TORCH_EXTENSIONS_DIR=str(Path(args.venv) / "torch_extensions"),
            MAX_JOBS="1",  # building DeepSpeedCPUAdam: one compiler at a time
        )
    procs, logs = [], []
    for rank in range(args.workers):
        log = open(work / f"{side}.rank{rank}.log", "w+")
        renv = dict(env, RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_SIZE=str(args.workers))
        procs.append(
            subprocess.Popen(
                [str(python), str(script), str(cfg_path)],
                env=renv,
                cwd=work,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        logs.append(log)
    deadline = time.monotonic() + args.timeout
    failed: int | None = None
    while any(p.poll() is None for p in procs):
        bad = [r for r, p in enumerate(procs) if p.returncode not in (None, 0)]
        if bad or time.monotonic() > deadline:
            failed = bad[0] if bad else -1
            break
        time.sleep(0.5)
    for p in procs:  # a failed rank leaves its peers waiting in a collective
        if p.poll() is None:
            p.kill()
            p.wait()
    if failed is None:
        bad = [r for r, p in enumerate(procs) if p.returncode != 0]
        failed = bad[0] if bad else None
    for log in logs:
        log.close()
    if failed is None and Path(cfg["out"]).exists():
        return Side(side, True, json.loads(Path(cfg["out"]).read_text()))
    if failed == -1:
        msg = f"timed out after {args.timeout} s"
        rank = 0
    else:
        rank = failed if failed is not None else 0
        msg = f"rank {rank} exited with {procs[rank].returncode}"
    tail = (work / f"{side}.rank{rank}.log").read_text()[-args.error_chars :]
    hint = ""
    if "async_io" in tail:
        hint = (
            "\n(DeepSpeed's NVMe offload builds its async_io op against libaio: "
            "`apt-get install libaio-dev`, then run again)"
        )
    return Side(side, False, error=f"{msg}; its output ends with:\n{tail}{hint}")


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--batch", type=int, default=4, help="rows per worker per step")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the medians")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--offload", choices=["cpu", "nvme"], default="cpu")
    p.add_argument("--nvme-path", default=os.path.join(tempfile.gettempdir(), "shoal-nvme"))
    p.add_argument(
        "--ds-optimizer",
        choices=["cpu_adam", "torch"],
        default="cpu_adam",
        help="DeepSpeedCPUAdam (ZeRO-Offload's own, a C++ op) or torch.optim.AdamW",
    )
    p.add_argument("--venv", default="/tmp/shoal-bench-deepspeed")
    p.add_argument("--deepspeed-version", default="0.19.8", help="'' for the newest")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per side")
    p.add_argument("--error-chars", type=int, default=4000)
    p.add_argument("--sides", default="deepspeed,shoal")
    args = p.parse_args()
    sys.path.insert(0, str(REPO))

    print("$", shlex.join([sys.executable, *sys.argv]))
    cfg = {
        k: getattr(args, k)
        for k in (
            "threads",
            "n_layer",
            "n_head",
            "d_model",
            "seq_len",
            "vocab",
            "batch",
            "steps",
            "lr",
            "seed",
        )
    }
    sides: dict[str, Side] = {}
    with tempfile.TemporaryDirectory(prefix="shoal-ds-bench-") as tmp:
        work = Path(tmp)
        if "deepspeed" in args.sides:
            py, info = ensure_venv(Path(args.venv), args.deepspeed_version)
            if py is None:
                sides["deepspeed"] = Side("deepspeed", False, error=info)
            else:
                print(f"deepspeed venv {args.venv}: deepspeed, torch = {info}", flush=True)
                c = dict(cfg, ds_config=ds_config(args))
                sides["deepspeed"] = launch("deepspeed", py, c, args, work)
        if "shoal" in args.sides:
            c = dict(cfg, offload=shoal_offload(args))
            sides["shoal"] = launch("shoal", Path(sys.executable), c, args, work)
    shutil.rmtree(run_nvme_dir(args), ignore_errors=True)

    print(
        f"\nGPT n_layer={args.n_layer} d_model={args.d_model} n_head={args.n_head} "
        f"seq_len={args.seq_len} vocab={args.vocab}; {args.workers} workers x {args.batch} rows, "
        f"{args.threads} thread(s) each; {args.steps} steps (medians after {args.warmup}); "
        f"ZeRO-3, offload to {args.offload}"
    )
    for s in sides.values():
        if not s.ok:
            print(f"\n{s.name}: DID NOT RUN. {s.error}")
    ok = [s for s in sides.values() if s.ok]
    if not ok:
        return
    n_params = ok[0].result["n_params"]
    print(f"parameters: {n_params:,}\n")
    print(
        f"{'side':<10} {'optimizer':<46} {'step (s)':>9} {'model MB':>9} {'engine MB':>10} "
        f"{'peak MB':>8} {'loss[0]':>9} {'loss[-1]':>9}"
    )
    med = {}
    for s in ok:
        r = s.result
        med[s.name] = median(r["times"][args.warmup :] or r["times"])
        print(
            f"{s.name:<10} {r['optimizer']:<46} {med[s.name]:>9.3f} {r['model_built_mb']:>9.0f} "
            f"{r['engine_built_mb']:>10.0f} {r['peak_rss_mb']:>8.0f} {r['losses'][0]:>9.5f} "
            f"{r['losses'][-1]:>9.5f}"
        )
    if len(med) == 2:
        print(f"\nshoal / deepspeed step time: {med['shoal'] / med['deepspeed']:.2f}x")
    print("(MB: peak RSS of rank 0 after building the model / the engine; peak: max over ranks)")


if __name__ == "__main__":
    main()
