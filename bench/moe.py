"""strategy=moe: expert hosts killed, dispatch overhead vs a dense model, shoal vs hivemind.

    python bench/moe.py                          # everything, ~9 min on 2 cores
    python bench/moe.py --quick                  # a smoke run: few steps, 5 hosts
    python bench/moe.py --parts kill dispatch    # without hivemind

One local Ray instance (sized for the trunk workers and every expert host);
every shoal job is a fresh ``submit`` into its own run folder, all with the
same seed, data, batches and number of steps. Three measurements, printed as
markdown tables with the job overrides that produced them:

1. **Expert hosts killed**: ``model=gpt_moe`` (``--n-expert`` experts,
   top-``--top-k``, ``d_expert`` = ``--d-expert``) under ``strategy=moe`` with
   ``--hosts`` expert hosts and ``--workers`` trunk workers, run with 0%, 10%
   and 20% of the hosts SIGKILLed (``os.kill`` on the pids of
   ``status.workers``' ``expert_host`` rows) once ``--kill-at`` steps have
   committed: by default the hosts that have served most until then (their
   ``report``'s busy seconds, asked of the named actors
   ``shoal-<job>-expert_host<id>``), the worst case; ``--victims random``
   for seeded random ones. The controller replaces them; a replacement restores its
   experts from the newer of its buddy host's replica and the newest
   committed checkpoint (``checkpoint.every`` = ``--every``). Per
   scenario: tokens/s (all tokens over the summed step times, steps
   1..end; and from the kill on), final loss (mean of the last 10 steps),
   steps completed, peak fraction of routed slots masked, fewest hosts
   live, seconds from the kill until every slot was seated again, what the
   replacements restored from, and the job's state.
2. **Dispatch overhead**: the same trunk as a dense GPT (``model=gpt_tiny``,
   MLP width 4 x d_model) under ``strategy=ddp``; ``gpt_moe`` under
   ``strategy=ddp`` (every worker holds every expert: the routing math
   without dispatch); and ``gpt_moe`` under ``strategy=moe`` with
   ``--dispatch-hosts`` hosts and with ``--hosts`` (the 0% run of part 1):
   the same calls from fewer processes on the cores. With top-2 and
   ``d_expert = 2 x d_model`` a token's active parameters equal the dense
   model's (the biases aside). Median tokens/s and step time over steps
   1..end, and their ratios.
3. **hivemind**: the same small DMoE through hivemind's
   ``RemoteMixtureOfExperts``, installed into its own virtualenv
   (``--hivemind-venv``, made on first use with this venv's torch release
   pinned). ``--hosts`` ``hivemind.moe.Server`` processes on 127.0.0.1, one
   DHT; server ``i`` holds expert ``i`` of every layer (shoal's ``Expert``
   class: the same shapes); one trainer process runs the same trunk (same
   seed, so the same initial weights; hivemind's own gate) on the same
   global batches with the same learning rates, ``k_min``/grace/timeout as
   shoal's ``strategy.k_min`` / ``grace_s`` / ``timeout_s``. hivemind's
   gate routes *samples*: passing tokens as samples gives shoal's per-token
   routing at one RPC per (token, expert), measured for a few steps
   (throughput only); passing sequences (hivemind's own usage) routes whole
   sequences, trained for the same steps with the largest kill of part 1
   at the same step (of its busiest servers: most slots routed to them so
   far; no one replaces hivemind's servers). Its
   experts train with AdamW at the constant peak lr, one optimizer step per
   backward batch a server runs (hivemind's servers know nothing of the
   trainer's steps); no capacity factor, no auxiliary loss. A server whose
   start hangs for 60 s is started again (counted in the output). A run
   past ``--hivemind-budget`` seconds is stopped and reported as stalled.
   If hivemind cannot be installed or started, the part is skipped with the
   reason printed. Ray is shut down first: the cores are hivemind's.

No assertions: the tables go to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# -- shoal jobs -------------------------------------------------------------------


@dataclass
class Run:
    """One shoal job, ended (or stopped), and what it measured."""

    label: str
    overrides: list[str]
    state: str
    error: str | None
    records: list[dict[str, Any]]
    wall_s: float
    killed_slots: list[int] = field(default_factory=list)
    killed_share: float | None = None  # the killed hosts' share of all hosts' busy time
    kill_step: int | None = None  # steps committed when the hosts were killed
    hosts_back_s: float | None = None  # kill -> the last replacement host seated
    restored: list[str] = field(default_factory=list)  # the replacements' checkpoints
    steps_redone: int = 0

    @property
    def ok(self) -> bool:
        return self.state == "SUCCEEDED" and bool(self.records)

    def steady(self) -> list[dict[str, Any]]:
        """Records after step 0 (the first step pays for warm-up)."""
        return [r for r in self.records if r["step"] >= 1] or self.records

    def tokens_per_s(self, since: int = 1) -> float:
        rows = [r for r in self.records if r["step"] >= since]
        tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in rows)
        seconds = sum(r["step_time_s"] for r in rows)
        return tokens / seconds if seconds else float("nan")

    def median(self, key: str) -> float:
        return statistics.median(float(r[key]) for r in self.steady())

    def final_loss(self, last: int = 10) -> float:
        return statistics.fmean(r["loss"] for r in self.records[-last:])

    def peak(self, key: str) -> float:
        return max((float(r.get(key) or 0.0) for r in self.records), default=float("nan"))


def model_overrides(args: argparse.Namespace) -> list[str]:
    return [
        "model=gpt_moe",
        f"model.n_expert={args.n_expert}",
        f"model.top_k={args.top_k}",
        f"model.d_expert={args.d_expert}",
        "model.capacity_factor=0",  # no slot dropped over capacity (hivemind has no capacity)
    ]


def common_overrides(args: argparse.Namespace) -> list[str]:
    return [
        f"cluster.workers={args.workers}",
        f"train.steps={args.steps}",
        f"train.warmup_steps={args.warmup_steps}",
        f"train.global_batch={args.global_batch}",
        f"train.seed={args.seed}",
        "train.sample_tokens=0",
        "data.max_bytes=1000000",
    ]


def moe_overrides(args: argparse.Namespace) -> list[str]:
    return [
        *model_overrides(args),
        "strategy=moe",
        f"strategy.expert_hosts={args.hosts}",
        f"strategy.k_min={args.k_min}",
        f"strategy.grace_s={args.grace_s}",
        f"strategy.timeout_s={args.timeout_s}",
        f"checkpoint.every={args.every}",
        *common_overrides(args),
    ]


def random_victims(args: argparse.Namespace, n: int) -> list[int]:
    """``n`` slots of one seeded order (10%'s inside 20%'s)."""
    order = random.Random(args.seed).sample(range(args.hosts), args.hosts)
    return sorted(order[:n])


def host_load(handle: Any, rows: list[dict[str, Any]]) -> dict[int, float]:
    """Seconds each live expert host has spent serving calls, by slot (its ``report``)."""
    import ray

    from orchestrator.api import NAMESPACE

    refs = {}
    for w in rows:
        name = f"shoal-{handle.job_id}-expert_host{w['worker_id']}"
        refs[int(w["rank"])] = ray.get_actor(name, namespace=NAMESPACE).control.remote("report")
    return {slot: float(ray.get(ref, timeout=30)["busy_s"]) for slot, ref in refs.items()}


def run_job(
    args: argparse.Namespace, root: Path, label: str, overrides: list[str], kill: int
) -> Run:
    """Run a job to its end, SIGKILLing ``kill`` expert hosts at ``--kill-at`` (``--victims``)."""
    from bench.pipeline import log, merged, slug
    from bench.recovery import committed, wait_until
    from orchestrator import JobSpec, submit

    run_dir = root / slug(label)
    overrides = merged(overrides)
    spec = JobSpec.from_overrides([*overrides, f"run_dir={run_dir}"])
    start = time.time()
    handle = submit(spec)
    out = Run(label, overrides, "RUNNING", None, [], 0.0)
    t_kill = None
    try:
        if kill:
            wait_until(handle, lambda r: committed(r) >= args.kill_at, f"step {args.kill_at}", 600)
            rows = [w for w in handle.status().workers if w.get("role") == "expert_host"]
            pids = {int(w["rank"]): int(w["pid"]) for w in rows}
            busy = host_load(handle, rows)
            if args.victims == "busiest":
                slots = sorted(sorted(busy, key=lambda s: -busy[s])[:kill])
            else:
                slots = random_victims(args, kill)
            out.kill_step = committed(handle.metrics())
            for slot in slots:
                os.kill(pids[slot], signal.SIGKILL)
            t_kill = time.time()
            out.killed_slots = slots
            out.killed_share = sum(busy[s] for s in slots) / max(1e-9, sum(busy.values()))
            log(
                f"  killed expert hosts {slots} (pids {[pids[s] for s in slots]}; "
                f"{out.killed_share:.0%} of the hosts' busy time) at step {out.kill_step}"
            )
    except (RuntimeError, TimeoutError) as e:
        out.error = f"before the kill: {e}"
    status = handle.wait(timeout=args.job_timeout)
    if not handle.done():
        handle.cancel()
        status = handle.wait(timeout=120)
        status.error = f"timed out after {args.job_timeout} s; {status.error or ''}"
    out.records = handle.metrics()
    out.state, out.error = status.state.name, status.error or out.error
    out.steps_redone = status.steps_redone
    if t_kill is not None:
        try:
            events = handle.events()
        except Exception:  # noqa: BLE001 - the controller may be gone with a failed job
            events = []
        joins = [
            e["time"]
            for e in events
            if e["event"] == "joined" and e.get("role") == "expert_host" and e["time"] > t_kill
        ]
        if len(joins) >= kill:
            out.hosts_back_s = max(joins) - t_kill
        out.restored = sorted(
            {
                str(w["restored_from"]).rsplit("/", 1)[-1]
                for w in status.workers
                if w.get("role") == "expert_host" and w.get("restored_from")
            }
        )
    handle.close()
    out.wall_s = time.time() - start
    return out


def kill_runs(args: argparse.Namespace, root: Path) -> list[Run]:
    from bench.pipeline import log

    runs = []
    for share in args.kill_shares:
        n = round(args.hosts * share / 100)
        label = f"moe-kill{share}pct"
        log(f"{label}: {n} of {args.hosts} expert hosts killed at step {args.kill_at}")
        run = run_job(args, root, label, moe_overrides(args), n)
        log(f"  {run.state} in {run.wall_s:.0f} s{': ' + run.error if run.error else ''}")
        runs.append(run)
    return runs


def dispatch_runs(args: argparse.Namespace, root: Path) -> list[tuple[str, Run]]:
    from bench.pipeline import log

    cases = [
        (
            "gpt_tiny, strategy=ddp (dense MLP)",
            ["model=gpt_tiny", "strategy=ddp", "checkpoint.every=0", *common_overrides(args)],
        ),
        (
            "gpt_moe, strategy=ddp (experts local)",
            [*model_overrides(args), "strategy=ddp", "checkpoint.every=0", *common_overrides(args)],
        ),
    ]
    for hosts in args.dispatch_hosts:  # the same dispatch with fewer host processes
        cases.append(
            (
                f"gpt_moe, strategy=moe ({hosts} expert hosts)",
                [*moe_overrides(args), f"strategy.expert_hosts={hosts}", "checkpoint.every=0"],
            )
        )
    out = []
    for label, overrides in cases:
        log(label)
        run = run_job(args, root, label, overrides, 0)
        log(f"  {run.state} in {run.wall_s:.0f} s{': ' + run.error if run.error else ''}")
        out.append((label, run))
    return out


def active_params(overrides: list[str]) -> tuple[int, int]:
    """``(total, active per token)`` parameters of the job's model."""
    import torch

    from actors.task import build_model
    from orchestrator import JobSpec
    from orchestrator.api import load_data

    spec = JobSpec.from_overrides(overrides)
    with torch.device("meta"):
        model = build_model(spec.model, load_data(spec).facts)
    total = sum(p.numel() for p in model.parameters())
    slots = getattr(model, "expert_slots", None)
    if not callable(slots):
        return total, total
    experts = sum(p.numel() for _, _, m in slots() for p in m.parameters())
    return total, total - experts + experts * model.top_k // model.n_expert


# -- hivemind: the driver's side ----------------------------------------------------


def hivemind_python(args: argparse.Namespace) -> tuple[str | None, str]:
    """The hivemind venv's python (made if missing), or None and why not."""
    venv = Path(args.hivemind_venv)
    python = venv / "bin" / "python"
    probe = [
        str(python),
        "-c",
        "import hivemind, os, torch; d = os.path.dirname(hivemind.__file__); "
        "print(hivemind.__version__, torch.__version__, "
        "os.path.exists(os.path.join(d, 'hivemind_cli', 'p2pd')))",
    ]

    def check() -> tuple[str | None, str]:
        done = subprocess.run(probe, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            return None, "import hivemind failed: " + (done.stderr.strip().splitlines() or ["?"])[
                -1
            ]
        version, torch_version, has_p2pd = done.stdout.split()
        if has_p2pd != "True":
            return None, (
                f"hivemind {version} is installed without its p2pd binary (hivemind's setup "
                "downloads it; this machine reaches no host but the package registries)"
            )
        return str(python), f"hivemind {version}, torch {torch_version}"

    if python.exists():
        found, why = check()
        if found:
            return found, why
    import torch

    pinned = f"torch=={torch.__version__.split('+')[0]}"  # never another torch release
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "-q", pinned, "hivemind"],
    ]
    for cmd in steps:
        print(f"  $ {shlex.join(cmd)}", flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        if done.returncode != 0:
            tail = "\n".join(done.stderr.strip().splitlines()[-5:])
            return None, f"`{shlex.join(cmd)}` failed:\n{tail}"
    return check()


def write_batches(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    """The shoal jobs' global batches and learning rates, step by step, for the hivemind run."""
    import torch

    from actors.task import make_task
    from orchestrator import JobSpec
    from orchestrator.api import load_data
    from orchestrator.schedule import lr_at

    spec = JobSpec.from_overrides(moe_overrides(args))
    data = load_data(spec)
    task = make_task(spec.task, data, spec.seq_len)
    t = spec.train
    xs, ys = [], []
    for step in range(t.steps):
        batch = task.batch(data, t.seed, step, t.global_batch, 0, t.global_batch)
        xs.append(batch["x"])
        ys.append(batch["y"])
    lrs = [lr_at(step, t) for step in range(t.steps)]
    torch.save({"x": torch.stack(xs), "y": torch.stack(ys), "lr": torch.tensor(lrs)}, path)
    m = spec.model
    return {
        "vocab_size": int(data.facts.model_kwargs()["vocab_size"]),
        "n_layer": m.n_layer,
        "n_head": m.n_head,
        "d_model": m.d_model,
        "seq_len": m.seq_len,
        "n_expert": m.n_expert,
        "top_k": m.top_k,
        "d_expert": m.d_expert,
        "train": {
            "seed": t.seed,
            "lr": t.lr,
            "weight_decay": t.weight_decay,
            "betas": [t.beta1, t.beta2],
            "grad_clip": t.grad_clip,
        },
    }


def run_hivemind(args: argparse.Namespace, root: Path, kill: int) -> dict[str, Any]:
    from bench.pipeline import log

    log(f"hivemind: its venv at {args.hivemind_venv}")
    python, why = hivemind_python(args)
    if python is None:
        log(f"  hivemind skipped: {why}")
        return {"skipped": why}
    log(f"  {why}")
    folder = root / "hivemind"
    folder.mkdir(parents=True, exist_ok=True)
    config = write_batches(args, folder / "batches.pt")
    config.update(
        batches=str(folder / "batches.pt"),
        folder=str(folder),
        hosts=args.hosts,
        steps=args.steps,
        kill_at=args.kill_at,
        kill=kill,
        victims=random_victims(args, kill) if args.victims == "random" else None,
        k_min=args.k_min,
        grace_s=args.grace_s,
        timeout_s=args.timeout_s,
        token_batch=args.hivemind_token_batch,
        token_steps=args.hivemind_token_steps,
        budget_s=args.hivemind_budget,
        servers_timeout_s=args.hivemind_start_timeout,
    )
    (folder / "config.json").write_text(json.dumps(config))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [python, str(Path(__file__).resolve()), "--hivemind-trainer", str(folder)]
    log(f"  {shlex.join(cmd)} (servers' logs in {folder})")
    limit = args.hivemind_budget + args.hivemind_start_timeout + 300
    with open(folder / "trainer.log", "w") as out:
        try:
            done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=limit)
            rc = done.returncode
        except subprocess.TimeoutExpired:
            rc = None
    result_path = folder / "result.json"
    if not result_path.exists():
        tail = "\n".join((folder / "trainer.log").read_text().splitlines()[-8:])
        why = f"the hivemind trainer ended (rc {rc}) without a result:\n{tail}"
        log(f"  hivemind failed: {why}")
        return {"skipped": why}
    result = json.loads(result_path.read_text())
    result["why"] = why
    log(
        f"  hivemind: {len(result.get('records', []))} steps, "
        f"{result.get('error') or result.get('stalled') or 'completed'}"
    )
    return result


# -- hivemind: its venv's side (no shoal imports but actors.models.gpt_moe) --------------

SERVER_START_S = 30  # a hivemind server not up by then is started again
_COUNTS = [0, 0]  # expert calls sent, answered (forward and backward), since the last look
_ROUTED: dict[int, int] = {}  # (sample, expert) slots routed to each server, since the last look


def _count_calls() -> None:
    """Wrap hivemind's response collection to count the calls each step sent and got back."""
    from hivemind.moe.client import moe as hm_moe

    collect = hm_moe._RemoteCallMany._collect_responses

    def counted(task_to_indices, *rest, **kw):  # noqa: ANN001, ANN002, ANN003
        out = collect(task_to_indices, *rest, **kw)
        _COUNTS[0] += len(task_to_indices)
        _COUNTS[1] += len(out[0])
        return out

    hm_moe._RemoteCallMany._collect_responses = staticmethod(counted)

    from hivemind.moe.client.beam_search import MoEBeamSearcher

    find = MoEBeamSearcher.batch_find_best_experts

    def routed(self, *args, **kw):  # noqa: ANN001, ANN002, ANN003
        chosen = find(self, *args, **kw)
        for row in chosen:
            for expert in row:
                slot = int(expert.uid.rsplit(".", 1)[1])
                _ROUTED[slot] = _ROUTED.get(slot, 0) + 1
        return chosen

    MoEBeamSearcher.batch_find_best_experts = routed


def hivemind_server(folder: str, slot: int, peers: str) -> None:
    """One hivemind server: expert ``slot`` of every layer, per-token and per-sequence copies."""
    import functools

    import hivemind
    import torch
    from hivemind.moe.server import ModuleBackend, Server
    from hivemind.utils.tensor_descr import BatchTensorDescriptor

    from actors.models.gpt_moe import Expert

    torch.set_num_threads(1)
    c = json.loads((Path(folder) / "config.json").read_text())
    t = c["train"]
    torch.manual_seed(t["seed"] * 1000 + slot)
    optimizer = functools.partial(
        torch.optim.AdamW, lr=t["lr"], betas=tuple(t["betas"]), weight_decay=t["weight_decay"]
    )
    d, d_hidden = c["d_model"], c["d_expert"] or 4 * c["d_model"]
    backends = {}
    for layer in range(c["n_layer"]):
        for kind, shape in (("seq", (c["seq_len"], d)), ("tok", (d,))):
            module = Expert(d, d_hidden)
            sample = torch.empty((1, *shape))
            uid = f"{kind}{layer}.{slot}"
            backends[uid] = ModuleBackend(
                name=uid,
                module=module,
                optimizer=optimizer(module.parameters()),
                args_schema=(BatchTensorDescriptor.from_tensor(sample),),
                outputs_schema=BatchTensorDescriptor.from_tensor(sample),
                max_batch_size=65536,
            )
    dht = hivemind.DHT(
        initial_peers=peers.split(","), host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True
    )
    server = Server(dht, backends, num_connection_handlers=1, start=True)
    (Path(folder) / f"ready{slot}").touch()
    print(f"server {slot} ready", flush=True)
    server.join()


def hivemind_trainer(folder: str) -> None:
    """The trunk in one process over the servers; writes ``result.json`` in ``folder``."""
    import hivemind
    import torch
    import torch.nn.functional as F
    from hivemind.moe import RemoteMixtureOfExperts
    from hivemind.moe.server.dht_handler import get_experts
    from torch import nn

    from actors.models.gpt_moe import GPTMoE

    torch.set_num_threads(1)
    base = Path(folder)
    c = json.loads((base / "config.json").read_text())
    t = c["train"]
    data = torch.load(c["batches"])
    result: dict[str, Any] = {"records": [], "token_records": []}
    dht = hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    peers = ",".join(str(a) for a in dht.get_visible_maddrs())
    servers: list[subprocess.Popen] = []
    _count_calls()

    class HivemindFeedForward(nn.Module):
        """A block's MoE layer as hivemind's RemoteMixtureOfExperts (tokens or sequences)."""

        balance_loss = None

        def __init__(self, moe: nn.Module, per_token: bool):
            super().__init__()
            self.moe, self.per_token = moe, per_token

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.per_token:
                return self.moe(x)  # the gate sees the sequence's mean; experts get [1, T, C]
            B, T, C = x.shape
            return self.moe(x.reshape(B * T, C)).view(B, T, C)

    def trunk(kind: str) -> nn.Module:
        torch.manual_seed(t["seed"])  # as a shoal worker: the same initial trunk
        model = GPTMoE(
            c["vocab_size"],
            n_layer=c["n_layer"],
            n_head=c["n_head"],
            d_model=c["d_model"],
            seq_len=c["seq_len"],
            n_expert=c["n_expert"],
            top_k=c["top_k"],
            d_expert=c["d_expert"],
        )
        for layer, block in enumerate(model.blocks):
            block.moe = HivemindFeedForward(
                RemoteMixtureOfExperts(
                    in_features=c["d_model"],
                    grid_size=(c["n_expert"],),
                    dht=dht,
                    uid_prefix=f"{kind}{layer}.",
                    k_best=c["top_k"],
                    k_min=c["k_min"],
                    timeout_after_k_min=c["grace_s"],
                    forward_timeout=c["timeout_s"],
                    backward_k_min=c["k_min"],
                    backward_timeout=c["timeout_s"],
                ),
                per_token=kind == "tok",
            )
        return model

    def optimizer_of(model: nn.Module) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": t["weight_decay"]},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=t["lr"], betas=tuple(t["betas"]))

    def step(model: nn.Module, opt: torch.optim.Optimizer, i: int, rows: int) -> dict[str, Any]:
        x, y = data["x"][i, :rows], data["y"][i, :rows]
        for g in opt.param_groups:
            g["lr"] = float(data["lr"][i])
        _COUNTS[0] = _COUNTS[1] = 0
        _ROUTED.clear()
        start = time.perf_counter()
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
        opt.step()
        seconds = time.perf_counter() - start
        return {
            "step": i,
            "loss": float(loss),
            "step_time_s": seconds,
            "tokens_per_s": x.numel() / seconds,
            "calls": _COUNTS[0],
            "unanswered": (1 - _COUNTS[1] / _COUNTS[0]) if _COUNTS[0] else 0.0,
            "routed": dict(_ROUTED),
        }

    def save() -> None:
        (base / "result.json").write_text(json.dumps(result))

    def spawn(slot: int) -> subprocess.Popen:
        (base / f"ready{slot}").unlink(missing_ok=True)
        log_file = open(base / f"server{slot}.log", "a")  # noqa: SIM115 - the server's
        return subprocess.Popen(
            [sys.executable, __file__, "--hivemind-server", folder, str(slot), peers],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: p2pd and the task pools die with it
        )

    def kill_server(slot: int) -> None:
        try:
            os.killpg(servers[slot].pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    try:
        started = time.perf_counter()
        # One server at a time, each up once Server(start=True) has returned in it (its
        # ready file; its experts are in the DHT before its handlers and task pools run).
        # Started all at once on 2 cores, some hung in that start (after "Server started",
        # before their handlers ran); one that hangs is started again, as an operator would.
        result["restarted"] = []
        for slot in range(c["hosts"]):
            servers.append(spawn(slot))
            spawned = time.perf_counter()
            while not (base / f"ready{slot}").exists():
                now = time.perf_counter()
                if now - started > c["servers_timeout_s"]:
                    raise TimeoutError(
                        f"hivemind servers not up after {c['servers_timeout_s']:g} s "
                        f"({slot} of {c['hosts']} up; started again: {result['restarted']})"
                    )
                if now - spawned > SERVER_START_S:
                    kill_server(slot)
                    servers[slot] = spawn(slot)
                    spawned = now
                    result["restarted"].append(slot)
                    print(f"server {slot} not up after {SERVER_START_S} s: again", flush=True)
                time.sleep(0.2)
        want = [
            f"{k}{layer}.{s}"
            for k in ("seq", "tok")
            for layer in range(c["n_layer"])
            for s in range(c["hosts"])
        ]
        while True:
            found = get_experts(dht, want)
            if all(found):
                break
            if time.perf_counter() - started > c["servers_timeout_s"]:
                missing = [u for u, f in zip(want, found, strict=True) if f is None]
                raise TimeoutError(f"servers not found in the DHT: {missing[:5]}...")
            time.sleep(0.5)
        result["servers_up_s"] = time.perf_counter() - started
        print(f"servers up after {result['servers_up_s']:.1f} s", flush=True)

        # Per-token routing: a few steps, for the throughput (RPC per token and expert).
        model = trunk("tok")
        opt = optimizer_of(model)
        for i in range(c["token_steps"] + 1):
            record = step(model, opt, i, c["token_batch"])
            print("tok", record, flush=True)
            result["token_records"].append(record)
            save()

        # Per-sequence routing: the whole run, the largest kill at the same step and slots.
        model = trunk("seq")
        opt = optimizer_of(model)
        begin = time.perf_counter()
        for i in range(c["steps"]):
            if i == c["kill_at"] and c["kill"]:
                victims = c["victims"]
                if victims is None:  # the busiest: most (sequence, expert) slots so far
                    load = {s: 0 for s in range(c["hosts"])}
                    for x in result["records"]:
                        for s, n in x["routed"].items():
                            load[s] += n
                    victims = sorted(sorted(load, key=lambda s: -load[s])[: c["kill"]])
                for slot in victims:
                    kill_server(slot)
                result["killed"] = victims
                result["killed_at"] = i
                print(f"killed servers {victims} before step {i}", flush=True)
            if time.perf_counter() - begin > c["budget_s"]:
                result["stalled"] = f"stopped after {c['budget_s']:g} s at step {i}"
                break
            try:
                record = step(model, opt, i, len(data["x"][i]))
            except Exception as e:  # noqa: BLE001 - what hivemind raises ends a plain trainer
                result["error"] = f"step {i}: {type(e).__name__}: {e}"
                result["error_calls"] = {"calls": _COUNTS[0], "answered": _COUNTS[1]}
                break
            print("seq", record, flush=True)
            result["records"].append(record)
            save()
    except Exception as e:  # noqa: BLE001 - reported to the driver
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        save()
        for slot in range(len(servers)):
            kill_server(slot)
        dht.shutdown()


# -- tables -------------------------------------------------------------------------


def fmt(x: float | None, digits: int = 2) -> str:
    return "" if x is None else f"{x:,.{digits}f}"


def print_header(args: argparse.Namespace, title: str, overrides: list[str]) -> None:
    print(f"\n### {title}\n")
    print(f"command: `{args.command}`\n")
    if overrides:
        print(f"jobs: `shoal run {shlex.join(overrides)}`\n")


def print_kill_table(args: argparse.Namespace, runs: list[Run]) -> None:
    print_header(args, "Expert hosts killed", moe_overrides(args))
    print(
        "| hosts killed | slots (their share of serving) | tokens/s | tokens/s from the kill "
        "| final loss (last 10) | vs 0% | steps | peak masked | fewest live | hosts back (s) "
        "| restored from | state |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    base = runs[0].final_loss() if runs and runs[0].records else None
    for share, r in zip(args.kill_shares, runs, strict=True):
        if not r.records:
            print(f"| {share}% | {r.killed_slots} | failed: {r.state}: {r.error} |")
            continue
        since = r.kill_step if r.kill_step is not None else None
        loss = r.final_loss()
        cells = [
            f"{share}% ({len(r.killed_slots)} of {args.hosts})",
            (", ".join(map(str, r.killed_slots)) + f" ({r.killed_share:.0%})")
            if r.killed_slots
            else "-",
            fmt(r.tokens_per_s(), 0),
            fmt(r.tokens_per_s(since), 0) if since is not None else "",
            f"{loss:.3f}",
            f"{loss - base:+.3f}" if base is not None else "",
            f"{len(r.records)}/{args.steps}",
            f"{r.peak('expert_slots_masked'):.3f}",
            str(min(int(x.get("expert_hosts_live", args.hosts)) for x in r.records)),
            fmt(r.hosts_back_s, 1),
            ", ".join(r.restored) or "-",
            r.state + (f" ({r.error})" if r.error else ""),
        ]
        print("| " + " | ".join(cells) + " |")
    print(
        f"\n(tokens/s: all tokens of steps 1..{args.steps - 1} over their summed step times; "
        f"kill once {args.kill_at} steps had committed, of the {args.victims} hosts (share of "
        "serving: their part of all hosts' busy seconds until then); final loss: mean of the "
        "last 10 steps)"
    )
    for r in runs:
        if r.records:
            masked = [
                (x["step"], x["expert_slots_masked"])
                for x in r.records
                if x.get("expert_slots_masked")
            ]
            print(f"  {r.label}: steps with masked slots {masked}; steps redone {r.steps_redone}")


def print_dispatch_table(
    args: argparse.Namespace, runs: list[tuple[str, Run]], moe: Run | None
) -> None:
    print_header(args, "Dispatch overhead vs a dense model of equal active parameters", [])
    rows = [*runs, (f"gpt_moe, strategy=moe ({args.hosts} expert hosts)", moe)] if moe else runs
    print(
        "| model, strategy | params (total / active per token) | tokens/s (median) "
        "| step (s, median) | vs dense | vs experts local | final loss (last 10) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    tps: dict[str, float] = {}
    for label, r in rows:
        if r is None or not r.records:
            print(f"| {label} | failed: {r.state if r else '?'}: {r.error if r else ''} |")
            continue
        total, active = active_params(r.overrides)
        tps[label] = r.median("tokens_per_s")
        dense = next(iter(tps.values()))
        local = next((v for k, v in tps.items() if "local" in k), None)
        cells = [
            label,
            f"{total / 1e6:.2f}M / {active / 1e6:.2f}M",
            fmt(tps[label], 0),
            f"{r.median('step_time_s'):.3f}",
            f"{tps[label] / dense:.2f}",
            f"{tps[label] / local:.2f}" if local else "",
            f"{r.final_loss():.3f}",
        ]
        print("| " + " | ".join(cells) + " |")
    print("\n(medians over steps 1..end; `vs`: tokens/s ratios)\n")
    for label, r in rows:
        if r is not None:
            overrides = " ".join(o for o in r.overrides if not o.startswith("run_dir"))
            print(f"- {label}: `{overrides}`")


def print_hivemind_table(args: argparse.Namespace, result: dict[str, Any], runs: list[Run]) -> None:
    print_header(args, "shoal vs hivemind's RemoteMixtureOfExperts (same model, data, steps)", [])
    if "skipped" in result:
        print(f"hivemind not measured: {result['skipped']}")
        return
    again = result.get("restarted") or []
    print(
        f"({result.get('why', '')}; servers up after {fmt(result.get('servers_up_s'), 1)} s"
        + (f"; servers {again} hung at start-up and were started again" if again else "")
        + ")\n"
    )
    kill_share = args.kill_shares[-1]
    n_kill = round(args.hosts * kill_share / 100)
    shoal = {share: r for share, r in zip(args.kill_shares, runs, strict=True)}
    print(
        "| system, routing | hosts killed | tokens/s before the kill | tokens/s after "
        f"| loss at step {args.kill_at - 1} | final loss (last 10) | steps "
        "| unanswered / masked peak | state |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")

    def loss_at(records: list[dict[str, Any]], step: int) -> str:
        hit = [r["loss"] for r in records if r["step"] == step]
        return f"{hit[0]:.3f}" if hit else ""

    for share in (0, kill_share):
        r = shoal.get(share)
        if r is None or not r.records:
            continue
        k = r.kill_step
        before = (
            r.tokens_per_s() if k is None else _tps([x for x in r.records if 1 <= x["step"] < k])
        )
        after = "" if k is None else fmt(r.tokens_per_s(k), 0)
        cells = [
            "shoal, per token",
            f"{share}%",
            fmt(before, 0),
            after,
            loss_at(r.records, args.kill_at - 1),
            f"{r.final_loss():.3f}",
            f"{len(r.records)}/{args.steps}",
            f"{r.peak('expert_slots_masked'):.3f}",
            r.state,
        ]
        print("| " + " | ".join(cells) + " |")
    tok = result.get("token_records", [])[1:]
    if tok:
        cells = [
            f"hivemind, per token (batch {args.hivemind_token_batch})",
            "0%",
            fmt(_tps(tok), 0),
            "",
            "",
            "",
            f"{len(tok)} timed",
            f"{max(x['unanswered'] for x in tok):.3f}",
            "throughput only",
        ]
        print("| " + " | ".join(cells) + " |")
    recs = result.get("records", [])
    if recs:
        k = result.get("killed_at")
        pre = [x for x in recs if x["step"] >= 1 and (k is None or x["step"] < k)]
        post = [x for x in recs if k is not None and x["step"] >= k]
        nan = [x["step"] for x in recs if x["loss"] != x["loss"]]
        state = (
            result.get("error")
            or result.get("stalled")
            or (f"completed, loss NaN from step {nan[0]}" if nan else "completed")
        )
        cells = [
            "hivemind, per sequence",
            f"{kill_share}% ({n_kill} of {args.hosts}, not replaced)",
            fmt(_tps(pre), 0),
            fmt(_tps(post), 0) if post else "",
            loss_at(recs, args.kill_at - 1),
            f"{statistics.fmean(x['loss'] for x in recs[-10:]):.3f}"
            if len(recs) == args.steps
            else "- (stopped)",
            f"{len(recs)}/{args.steps}",
            f"{max(x['unanswered'] for x in recs):.3f}",
            state,
        ]
        print("| " + " | ".join(cells) + " |")
        killed = [str(v) for v in result.get("killed", [])]

        def on_killed(x: dict[str, Any]) -> float:
            routed = {str(k): v for k, v in x["routed"].items()}
            return sum(routed.get(v, 0) for v in killed) / max(1, sum(routed.values()))

        if post:
            share = statistics.fmean(on_killed(x) for x in pre) if pre else float("nan")
            print(
                f"\nhivemind, per sequence: killed servers {result.get('killed')} (the "
                f"{args.victims}); their share of the routed (sequence, expert) slots, steps "
                f"1..{k - 1}: {share:.3f}; after the kill, per step: routed there / calls "
                "unanswered (forward and backward) / step time (s): "
                + ", ".join(
                    f"{on_killed(x):.2f} / {x['unanswered']:.2f} / {x['step_time_s']:.1f}"
                    for x in post
                )
            )
    if result.get("error"):
        calls = result.get("error_calls") or {}
        print(
            f"\nhivemind run failed: {result['error']} (that step: {calls.get('answered')} of "
            f"{calls.get('calls')} expert calls answered; killed servers {result.get('killed')}, "
            f"the {args.victims})"
        )
    r0 = shoal.get(0)
    if r0 and r0.records and recs:
        pre = [x for x in recs if x["step"] >= 1 and x["step"] < (result.get("killed_at") or 10**9)]
        print(
            f"\nshoal (0%) / hivemind per sequence, tokens/s before the kill: "
            f"{r0.tokens_per_s() / _tps(pre):.2f}x"
            + (f"; / hivemind per token: {r0.tokens_per_s() / _tps(tok):.1f}x" if tok else "")
        )


def _tps(records: list[dict[str, Any]]) -> float:
    seconds = sum(r["step_time_s"] for r in records)
    tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in records)
    return tokens / seconds if seconds else float("nan")


# -- main ---------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: few steps, 5 hosts")
    p.add_argument(
        "--parts",
        nargs="+",
        default=["kill", "dispatch", "hivemind"],
        choices=["kill", "dispatch", "hivemind"],
    )
    p.add_argument("--workers", type=int, default=2, help="trunk workers (cluster.workers)")
    p.add_argument("--hosts", type=int, default=None, help="expert hosts (default 10)")
    p.add_argument("--n-expert", type=int, default=None, help="model.n_expert (default 10)")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--d-expert", type=int, default=256, help="2 x d_model: the dense active size")
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument(
        "--dispatch-hosts",
        type=int,
        nargs="*",
        default=[2],
        help="part 2: also gpt_moe under strategy=moe with this many hosts",
    )
    p.add_argument("--steps", type=int, default=None, help="default 30")
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--kill-at", type=int, default=None, help="steps committed at the kill")
    p.add_argument(
        "--kill-shares", type=int, nargs="+", default=None, help="percent (default 0 10 20)"
    )
    p.add_argument("--every", type=int, default=None, help="checkpoint.every (default 5)")
    p.add_argument(
        "--victims",
        choices=["busiest", "random"],
        default="busiest",
        help="which hosts to kill: those that served most until then, or seeded random ones",
    )
    p.add_argument("--k-min", type=int, default=1)
    p.add_argument("--grace-s", type=float, default=1.0)
    p.add_argument("--timeout-s", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--job-timeout", type=float, default=600.0)
    p.add_argument("--hivemind-venv", default="/tmp/hm-venv")
    p.add_argument("--hivemind-token-batch", type=int, default=2, help="sequences per step")
    p.add_argument("--hivemind-token-steps", type=int, default=2, help="timed per-token steps")
    p.add_argument("--hivemind-budget", type=float, default=240.0, help="seconds for its run")
    p.add_argument("--hivemind-start-timeout", type=float, default=300.0)
    p.add_argument("--keep-runs", action="store_true", help="keep the jobs' run folders")
    args = p.parse_args()
    quick = args.quick

    def default(name: str, full: Any, fast: Any) -> None:
        if getattr(args, name) is None:
            setattr(args, name, fast if quick else full)

    default("hosts", 10, 5)
    default("n_expert", 10, 5)
    default("steps", 30, 12)
    default("kill_at", 12, 5)  # between checkpoints (every 5 / 2): not while one is taken
    default("every", 5, 2)
    default("kill_shares", [0, 10, 20], [0, 20])
    if quick:
        args.hivemind_token_steps = 1
    args.command = shlex.join(["python", "bench/moe.py", *sys.argv[1:]])
    return args


def start_ray(args: argparse.Namespace) -> None:
    """Our own Ray, with a logical CPU for every trunk worker and expert host (oversubscribed
    on 2 cores, as ``submit`` would size it), without the workers' logs on stdout."""
    import logging

    import ray

    from orchestrator.api import NAMESPACE

    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    ray.init(
        address="local",
        namespace=NAMESPACE,
        num_cpus=max(os.cpu_count() or 1, args.workers + args.hosts),
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--hivemind-trainer":
        hivemind_trainer(sys.argv[2])
        return
    if len(sys.argv) > 4 and sys.argv[1] == "--hivemind-server":
        hivemind_server(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return
    sys.path.insert(0, str(ROOT))
    from bench.pipeline import log

    args = parse_args()
    t0 = time.time()
    root = Path(tempfile.mkdtemp(prefix="shoal-moe-"))
    start_ray(args)
    log(f"{args.command}; runs under {root}; {os.cpu_count()} cores")
    runs = kill_runs(args, root) if {"kill", "hivemind"} & set(args.parts) else []
    dense = dispatch_runs(args, root) if "dispatch" in args.parts else []
    hm: dict[str, Any] = {}
    if "hivemind" in args.parts:
        import ray

        ray.shutdown()  # its actors' cores go to the hivemind servers
        n = round(args.hosts * args.kill_shares[-1] / 100)
        hm = run_hivemind(args, root, n)
    log(f"done in {time.time() - t0:.0f} s")
    if args.keep_runs:
        log(f"run folders kept under {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    if runs:
        print_kill_table(args, runs)
    if dense:
        print_dispatch_table(args, dense, runs[0] if runs and args.kill_shares[0] == 0 else None)
    if "hivemind" in args.parts:
        print_hivemind_table(args, hm, runs)


if __name__ == "__main__":
    main()
