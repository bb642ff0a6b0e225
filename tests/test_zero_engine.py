"""DDP and ZeRO 1/2/3 engines against a one-process reference, on real gloo process groups.

No Ray: each world size (2, 3, 1, then 4 with fewer cases) is one
``torch.multiprocessing`` process group that runs every case for that size in
sequence (starting processes costs seconds, so cases are batched, not started
one by one). Children write their results to files;
the parent compares them with a plain one-process run: the same model,
``OptimizerSpec.build(model.parameters())`` (torch's optimizer with nanoGPT's
two parameter groups: weight decay on matrices only), ``clip_grad_norm_`` and
the mean loss over the whole global batch of 7 samples.

Cases cover: both tiny models (an MLP, and a GPT with a root-level parameter
and tied embedding / head weights, which exercise stage 3's gathering), even
and uneven shards, uneven per-rank batches (7 = 3+2+2, 4+3, ...), gradient
clipping that binds on every step, AdamW and SGD with momentum, gradient
accumulation, and checkpoints moved between stages and world sizes:
``zero2`` on 2 ranks -> ``zero3`` / ``zero1`` on 3 ranks and ``ddp`` on 1;
``zero3`` on 3 ranks -> ``zero2`` on 1. In-process unit tests pin the weight
decay rule (2-D parameters decayed, 1-D not, bitwise as torch rounds it).

Tolerance: parameters within ``atol=1e-5, rtol=1e-5`` of the reference after
4 AdamW steps (lr 1e-2); the engines differ from the reference only in the
order of fp32 summations (per-rank partial sums, a flat norm), and the largest
difference measured was 1.4e-6.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from collectives.flat import FlatLayout, flatten_into
from collectives.offloaded_optim import OffloadSpec
from collectives.optim import FlatOptimizer, OptimizerSpec, decay_ranges
from collectives.zero import ZeroEngine, build_engine
from orchestrator.shard_plan import batch_shares, shard_bounds

GLOBAL_BATCH = 7
STEPS = 4
LR = 1e-2
CLIP = 0.05  # well under the gradient norms of these models: clipping binds every step
BUCKET_MB = 0.002  # ~500 floats: several buckets even for the tiny models
ATOL, RTOL = 1e-5, 1e-5
ADAMW = OptimizerSpec("adamw", weight_decay=0.1)
SGD = OptimizerSpec("sgd", momentum=0.9, weight_decay=0.01)
UNEVEN = {2: [2.0, 1.0], 3: [2.0, 1.0, 1.0]}

# -- tiny models ---------------------------------------------------------------


class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 24)
        self.act = nn.GELU()  # no parameters: not a stage-3 unit
        self.fc2 = nn.Linear(24, 24)
        self.out = nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.fc2(self.act(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln1 = nn.LayerNorm(d)
        # No qkv bias: the key bias has an exactly-zero gradient (softmax is shift
        # invariant), so Adam would turn summation-order noise into lr-sized steps.
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.fc_out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """Two blocks; ``wpe`` lives on the root and ``lm_head`` shares ``wte``'s weight."""

    vocab, seq_len, d, n_head = 16, 8, 16, 2

    def __init__(self):
        super().__init__()
        self.wpe = nn.Parameter(torch.randn(self.seq_len, self.d) * 0.1)
        self.wte = nn.Embedding(self.vocab, self.d)
        self.blocks = nn.ModuleList([Block(self.d, self.n_head) for _ in range(2)])
        self.ln_f = nn.LayerNorm(self.d)
        self.lm_head = nn.Linear(self.d, self.vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def make_model(kind: str) -> nn.Module:
    torch.manual_seed(1234)  # every rank and the reference start from the same weights
    return TinyMLP() if kind == "mlp" else TinyGPT()


def global_batch(kind: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    if kind == "mlp":
        return torch.randn(GLOBAL_BATCH, 8, generator=g), torch.randn(GLOBAL_BATCH, 4, generator=g)
    shape = (GLOBAL_BATCH, TinyGPT.seq_len)
    return (
        torch.randint(0, TinyGPT.vocab, shape, generator=g),
        torch.randint(0, TinyGPT.vocab, shape, generator=g),
    )


def summed_loss(kind: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum of per-sample losses divided by the global batch: the SUM over ranks is the mean."""
    out = model(x)
    if kind == "mlp":
        per_sample = (out - y).pow(2).mean(dim=1)
    else:
        per_sample = F.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(dim=1)
    return per_sample.sum() / GLOBAL_BATCH


# -- cases ---------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # mlp | gpt
    strategy: str  # ddp | zero1 | zero2 | zero3
    shard_weights: tuple[float, ...] | None = None
    batch_weights: tuple[float, ...] | None = None  # None: equal
    opt: str = "adamw"
    micro: int = 1  # micro-batches per step (gradient accumulation when > 1)
    start: int = 0  # first step (> 0 when resuming from load_from)
    load_from: str | None = None
    save_as: str | None = None
    # zero3 with offload.params: parameters, gradients and optimizer state in this tier.
    offload: str = "none"


def cases_for(ws: int) -> list[Case]:
    if ws == 4:
        # Four processes on two cores: only the stage-3 paths, uneven, and a resume.
        sw, bw = (3.0, 1.0, 1.0, 2.0), (1.0, 1.0, 2.0, 1.0)
        return [
            Case("gpt-zero3-uneven", "gpt", "zero3", sw, bw),
            Case("mlp-zero2-uneven", "mlp", "zero2", sw, bw),
            Case("ckpt-load-zero3", "gpt", "zero3", sw, start=STEPS, load_from="z2w2"),
        ]
    out = []
    for model in ("mlp", "gpt"):
        for strategy in ("ddp", "zero1", "zero2", "zero3"):
            out.append(Case(f"{model}-{strategy}-even", model, strategy))
            if ws > 1 and strategy != "ddp":
                sw = tuple(UNEVEN[ws])
                bw = (1.0, 2.0, 1.0)[:ws]  # a different split of the batch than of the model
                out.append(Case(f"{model}-{strategy}-uneven", model, strategy, sw, bw))
    # SGD with momentum, and gradient accumulation over 2 micro-batches.
    out.append(Case("mlp-zero1-sgd", "mlp", "zero1", opt="sgd"))
    out.append(Case("gpt-zero3-sgd", "gpt", "zero3", opt="sgd"))
    for strategy in ("ddp", "zero1", "zero2", "zero3"):
        out.append(Case(f"gpt-{strategy}-accum", "gpt", strategy, micro=2))
    # Checkpoints across stages and world sizes; groups run in the order 2, 3, 1.
    if ws == 2:
        out.append(Case("ckpt-save-zero2", "gpt", "zero2", (2.0, 1.0), save_as="z2w2"))
        # Parameters, gradients and optimizer state on NVMe: uneven, accumulating,
        # clipped, and its checkpoint loaded by a plain engine (ws 1).
        sw, bw = tuple(UNEVEN[2]), (1.0, 2.0)
        out.append(Case("gpt-zero3-offload", "gpt", "zero3", sw, bw, micro=2, offload="nvme"))
        out.append(Case("ckpt-save-zero3-offload", "gpt", "zero3", save_as="z3off", offload="host"))
    if ws == 3:
        out.append(
            Case("ckpt-load-zero3", "gpt", "zero3", (2.0, 1.0, 1.0), start=STEPS, load_from="z2w2")
        )
        out.append(Case("ckpt-load-zero1", "gpt", "zero1", start=STEPS, load_from="z2w2"))
        out.append(
            Case(
                "ckpt-load-zero3-offload",
                "gpt",
                "zero3",
                (1.0, 2.0, 1.0),
                start=STEPS,
                load_from="z2w2",
                offload="nvme",
            )
        )
        out.append(Case("ckpt-save-zero3", "gpt", "zero3", (1.0, 1.0, 3.0), save_as="z3w3"))
    if ws == 1:
        out.append(Case("ckpt-load-ddp", "gpt", "ddp", start=STEPS, load_from="z2w2"))
        out.append(Case("ckpt-load-zero2", "gpt", "zero2", start=STEPS, load_from="z3w3"))
        out.append(Case("ckpt-load-offloaded", "gpt", "zero2", start=STEPS, load_from="z3off"))
    return out


GROUP_ORDER = (2, 3, 1, 4)  # the checkpoint a case loads is saved by an earlier group
ALL_CASES = [(ws, c) for ws in GROUP_ORDER for c in cases_for(ws)]


def rank_samples(ws: int, case: Case) -> list[tuple[int, int]]:
    shares = batch_shares(GLOBAL_BATCH, list(case.batch_weights or [1.0] * ws))
    bounds, lo = [], 0
    for s in shares:
        bounds.append((lo, lo + s))
        lo += s
    return bounds


# -- the child processes ---------------------------------------------------------

COLLECTIVES = ("all_reduce", "reduce_scatter", "all_to_all_single", "broadcast", "all_gather")


def _count_comm(counts: dict[str, int]) -> None:
    """Wrap torch.distributed's collectives to count the elements each rank receives."""
    for name in COLLECTIVES:
        real = getattr(dist, name)

        def wrapped(*args, _real=real, _name=name, **kwargs):
            out = args[0] if args else kwargs.get("tensor", kwargs.get("output"))
            counts[_name] = counts.get(_name, 0) + out.numel()
            return _real(*args, **kwargs)

        setattr(dist, name, wrapped)


def _run_case(ws: int, rank: int, case: Case, ckpts: dict, device: str = "cpu") -> dict:
    """One rank's run of ``case`` (model and data on ``device``); tensors come back on it."""
    model = make_model(case.model).to(device)
    spec = ADAMW if case.opt == "adamw" else SGD
    offload = None
    if case.offload != "none":
        nvme = os.path.join(_SCRATCH["dir"], "nvme")
        offload = OffloadSpec("nvme", nvme_path=nvme, chunk_mb=0.004, params=case.offload)
    engine = build_engine(
        case.strategy,
        model,
        spec,
        grad_clip=CLIP,
        bucket_mb=BUCKET_MB,
        shard_bounds=(
            shard_bounds(FlatLayout.of(model).numel, list(case.shard_weights))
            if case.shard_weights
            else None
        ),
        offload=offload,
    )
    if case.load_from:
        ck = ckpts[case.load_from]
        engine.load_state(lambda key, lo, hi: ck["tensors"][key][lo:hi].clone(), ck["step"])
    lo, hi = rank_samples(ws, case)[rank]
    norms: list[float] = []
    counts: dict[str, int] = {}
    _count_comm(counts)  # the caller restores the real collectives after the case
    for step in range(case.start, case.start + STEPS):
        x, y = global_batch(case.model, step)
        x, y = x[lo:hi].to(device), y[lo:hi].to(device)
        counts.clear()  # keep the last step's counts only
        engine.zero_grad()
        # Micro-batches of this rank's samples; each loss is still over the global batch.
        cuts = torch.linspace(0, hi - lo, case.micro + 1).round().long().tolist()
        for m in range(case.micro):
            loss = summed_loss(
                case.model, model, x[cuts[m] : cuts[m + 1]], y[cuts[m] : cuts[m + 1]]
            )
            engine.backward(loss, sync=m == case.micro - 1)
        norms.append(engine.step(LR).grad_norm)
    comm = dict(counts)
    param_storage = sum(p.untyped_storage().nbytes() for p in model.parameters())
    with torch.no_grad():  # a forward without backward (stage 3: gather, free, no hooks left)
        x, y = global_batch(case.model, 99)
        eval_loss = float(summed_loss(case.model, model, x.to(device), y.to(device)))
    result = {
        "state": {k: v.cpu() for k, v in engine.full_state_dict().items()},
        "norms": norms,
        "memory": engine.memory_bytes(),
        "comm": comm,
        "param_storage": param_storage,
        "eval_loss": eval_loss,
    }
    if case.save_as:
        s_lo, s_hi, tensors = engine.checkpoint_slice()
        copies = {k: v.detach().clone().cpu() for k, v in tensors.items()}  # TierFlat: read
        result["slice"] = (s_lo, s_hi, copies)
    engine.close()
    return result


_SCRATCH = {"dir": tempfile.gettempdir()}  # a child's: its group's temporary directory


def _child(rank: int, ws: int, store_path: str, out_dir: str, cases: list[Case], ckpts: dict):
    torch.set_num_threads(1)
    _SCRATCH["dir"] = out_dir
    dist.init_process_group("gloo", store=dist.FileStore(store_path, ws), rank=rank, world_size=ws)
    real = {name: getattr(dist, name) for name in COLLECTIVES}
    results = {}
    for case in cases:
        results[case.name] = _run_case(ws, rank, case, ckpts)
        for name, fn in real.items():  # drop this case's counting wrappers
            setattr(dist, name, fn)
    dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def _assemble(slices: list[tuple[int, int, dict]], step: int) -> dict:
    """Flat checkpoint tensors from every rank's ``checkpoint_slice`` (they must tile [0, n))."""
    slices = sorted(slices, key=lambda s: s[0])
    tensors = {}
    for key in slices[0][2]:
        expect = 0
        for lo, hi, t in slices:
            assert lo == expect and t[key].numel() == hi - lo
            expect = hi
        tensors[key] = torch.cat([t[key] for _, _, t in slices])
    return {"tensors": tensors, "step": step}


# A forkserver imports torch and this module once, then forks every child from that
# clean single-threaded process: ~0.1 s per child instead of ~5 s for a spawn that
# re-imports torch, and none of fork's hazards (the pytest process may hold threads).
if "forkserver" in mp.get_all_start_methods():
    _START_METHOD = "forkserver"
    mp.get_context("forkserver").set_forkserver_preload(["torch", __name__])
else:
    _START_METHOD = "spawn"


@pytest.fixture(scope="module")
def results() -> dict[int, dict[str, list[dict]]]:
    """``results[ws][case][rank]``: every group's outputs, spawned once per world size."""
    out: dict[int, dict[str, list[dict]]] = {}
    ckpts: dict = {}
    for ws in GROUP_ORDER:
        with tempfile.TemporaryDirectory() as tmp:
            store = os.path.join(tmp, "store")
            cases = cases_for(ws)
            mp.start_processes(
                _child,
                args=(ws, store, tmp, cases, ckpts),
                nprocs=ws,
                join=True,
                start_method=_START_METHOD,
            )
            per_rank = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(ws)]
        out[ws] = {c.name: [per_rank[r][c.name] for r in range(ws)] for c in cases}
        for c in cases:
            if c.save_as:
                slices = [res["slice"] for res in out[ws][c.name]]
                ckpts[c.save_as] = _assemble(slices, c.start + STEPS)
    return out


# -- the one-process reference -------------------------------------------------

_REFERENCE_CACHE: dict[tuple, dict] = {}


def reference(case: Case, device: str = "cpu") -> dict:
    """Plain training from step 0 to the case's last step: state, per-step norms, eval loss.

    Trained on ``device``; the state comes back on the CPU.
    """
    key = (case.model, case.opt, case.start + STEPS, device)
    if key in _REFERENCE_CACHE:
        return _REFERENCE_CACHE[key]
    model = make_model(case.model).to(device)
    spec = ADAMW if case.opt == "adamw" else SGD
    opt = spec.build(list(model.parameters()), lr=LR)
    norms = []
    for step in range(case.start + STEPS):
        x, y = global_batch(case.model, step)
        opt.zero_grad()
        (summed_loss(case.model, model, x.to(device), y.to(device))).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
    with torch.no_grad():
        x, y = global_batch(case.model, 99)
        eval_loss = float(summed_loss(case.model, model, x.to(device), y.to(device)))
    state = {name: t.detach().cpu() for name, t in model.state_dict().items()}
    ref = {"state": state, "norms": norms, "eval_loss": eval_loss}
    _REFERENCE_CACHE[key] = ref
    return ref


def case_id(item: tuple[int, Case]) -> str:
    return f"ws{item[0]}-{item[1].name}"


# -- tests ---------------------------------------------------------------------


@pytest.mark.parametrize("ws_case", ALL_CASES, ids=[case_id(i) for i in ALL_CASES])
def test_matches_reference(results, ws_case):
    ws, case = ws_case
    ref = reference(case)
    ranks = results[ws][case.name]
    # Clipping must bind (else the clip path is untested) and use the global norm.
    assert min(ref["norms"][case.start :]) > 2 * CLIP
    for r, res in enumerate(ranks):
        assert res["norms"] == pytest.approx(ref["norms"][case.start :], rel=1e-4), f"rank {r}"
        assert set(res["state"]) == set(ref["state"])
        for name, want in ref["state"].items():
            torch.testing.assert_close(
                res["state"][name], want, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"{n}: {m}"
            )
            # Replicas agree bit for bit: everyone received the same gathered bytes.
            assert torch.equal(res["state"][name], ranks[0]["state"][name])
        assert res["eval_loss"] == pytest.approx(ref["eval_loss"], abs=1e-5)


@pytest.mark.parametrize("ws_case", ALL_CASES, ids=[case_id(i) for i in ALL_CASES])
def test_memory_follows_zero_formulas(results, ws_case):
    """Persistent bytes per rank: Ψ or the rank's shard Ψ_r, by stage (within 5%)."""
    ws, case = ws_case
    numel = sum(p.numel() for p in make_model(case.model).parameters())
    weights = list(case.shard_weights or [1.0] * ws)
    n_state = len((ADAMW if case.opt == "adamw" else SGD).state_keys())
    for r, res in enumerate(results[ws][case.name]):
        lo, hi = shard_bounds(numel, weights)[r]
        full, shard = 4 * numel, 4 * (hi - lo)
        want = {
            "ddp": (full, full, n_state * full),
            "zero1": (full, full, n_state * shard),
            "zero2": (full, shard, n_state * shard),
            "zero3": (shard, shard, n_state * shard),
        }[case.strategy]
        got = res["memory"]
        keys = ("params", "grads", "optimizer")
        if case.offload != "none":  # nothing of it in memory between steps
            assert (got["params"], got["grads"], got["optimizer"]) == (0, 0, 0)
            keys = (f"params_{case.offload}", f"grads_{case.offload}", "optimizer_nvme")
        for key, w in zip(keys, want, strict=True):
            assert got[key] == pytest.approx(w, rel=0.05), f"rank {r} {key}"
        # Stage 3 keeps no full parameter storage between steps.
        if case.strategy == "zero3":
            assert res["param_storage"] == 0


@pytest.mark.parametrize("ws", [2, 3])
@pytest.mark.parametrize("strategy", ["ddp", "zero1", "zero2", "zero3"])
def test_comm_volume(results, ws, strategy):
    """Elements received per rank per step: ZeRO 1-2 never all-reduce gradients; 3 gathers twice.

    The MLP has no tied weights, so stage 3 gathers every parameter exactly
    once for forward and once for backward.
    """
    numel = sum(p.numel() for p in make_model("mlp").parameters())
    for r, res in enumerate(
        results[ws][f"mlp-{strategy}-uneven" if strategy != "ddp" else "mlp-ddp-even"]
    ):
        comm = res["comm"]
        lo, hi = shard_bounds(numel, UNEVEN[ws] if strategy != "ddp" else [1.0] * ws)[r]
        if strategy == "ddp":
            assert comm == {"all_reduce": numel}
            continue
        gathers = 2 * numel if strategy == "zero3" else numel
        # reduce_scatter output is this rank's shard; the all-reduce is the norm only.
        assert comm == {"reduce_scatter": hi - lo, "all_to_all_single": gathers, "all_reduce": 1}


def test_bad_arguments():
    model = make_model("mlp")
    with pytest.raises(ValueError, match="stage"):
        ZeroEngine(model, ADAMW, stage=4)
    with pytest.raises(ValueError, match="cover"):
        ZeroEngine(make_model("mlp"), ADAMW, stage=1, shard_bounds=[(0, 10)])
    with pytest.raises(ValueError, match="strategy"):
        build_engine("zero4", make_model("mlp"), ADAMW)
    with pytest.raises(ValueError, match="world size"):
        build_engine("zero2", make_model("mlp"), ADAMW, shard_bounds=[(0, 1), (1, 2)])


# -- stage-3 prefetch ------------------------------------------------------------

PREFETCH_WS = 2


def _prefetch_run(rank: int, prefetch: bool) -> dict:
    """GPT, zero3, uneven shards and batches; per-step gather counts and in-flight gathers."""
    model = make_model("gpt")
    numel = FlatLayout.of(model).numel
    engine = ZeroEngine(
        model,
        ADAMW,
        stage=3,
        grad_clip=CLIP,
        shard_bounds=shard_bounds(numel, UNEVEN[PREFETCH_WS]),
        prefetch=prefetch,
    )
    # Registered after the engine's hooks: sees the state right after a unit's pre-hook.
    inflight: list[int] = []
    for m in engine._hook_modules:
        m.register_forward_pre_hook(
            lambda mod, args: inflight.append(sum(u.work is not None for u in engine.units))
        )
    case = Case("prefetch", "gpt", "zero3", batch_weights=(1.0, 2.0))
    lo, hi = rank_samples(PREFETCH_WS, case)[rank]
    counts: dict[str, int] = {}
    _count_comm(counts)
    steps = []
    for step in range(STEPS):
        x, y = global_batch("gpt", step)
        before = dict(engine.prefetch_stats)
        counts.clear()
        inflight.clear()
        engine.zero_grad()
        engine.backward(summed_loss("gpt", model, x[lo:hi], y[lo:hi]))
        norm = engine.step(LR).grad_norm
        stats = {k: v - before[k] for k, v in engine.prefetch_stats.items()}
        steps.append(
            {"norm": norm, "stats": stats, "comm": dict(counts), "inflight": list(inflight)}
        )
    unit_name = {}
    for i, slot in enumerate(engine.layout.slots):
        unit_name.setdefault(engine._unit_of_slot[i], slot.name)
    order = {
        phase: None if o is None else [unit_name[u] for u in o]
        for phase, o in engine._order.items()
    }
    return {
        "steps": steps,
        "order": order,
        "state": engine.full_state_dict(),
        "param_storage": sum(p.untyped_storage().nbytes() for p in model.parameters()),
        "memory": engine.memory_bytes(),
    }


def _prefetch_child(rank: int, store_path: str, out_dir: str):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", store=dist.FileStore(store_path, PREFETCH_WS), rank=rank, world_size=PREFETCH_WS
    )
    real = {name: getattr(dist, name) for name in COLLECTIVES}
    results = {}
    for prefetch in (True, False):
        results[prefetch] = _prefetch_run(rank, prefetch)
        for name, fn in real.items():
            setattr(dist, name, fn)
    dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def test_zero3_prefetch_overlaps_and_is_exact():
    """After step 1 records the order, every gather but each pass's first is issued one unit
    ahead (one in flight at the unit hooks), with the same elements moved and identical results.
    """
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _prefetch_child,
            args=(os.path.join(tmp, "store"), tmp),
            nprocs=PREFETCH_WS,
            join=True,
            start_method=_START_METHOD,
        )
        per_rank = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(PREFETCH_WS)]
    forward = ["wpe", "wte.weight", "blocks.0.ln1.weight", "blocks.1.ln1.weight"]
    forward += ["ln_f.weight", "wte.weight"]  # lm_head re-gathers the tied weight
    backward = ["wte.weight", "wpe", "ln_f.weight", "blocks.1.ln1.weight", "blocks.0.ln1.weight"]
    n_gathers = len(forward) + len(backward)
    ref = reference(Case("prefetch", "gpt", "zero3"))
    for r, res in enumerate(per_rank):
        on, off = res[True], res[False]
        assert on["order"] == {"forward": forward, "backward": backward}, f"rank {r}"
        assert off["order"] == {"forward": None, "backward": None}
        # Step 1 records the order with synchronous gathers; then only each pass's first is.
        first, *later = on["steps"]
        assert first["stats"] == {"sync": n_gathers, "prefetched": 0, "hits": 0}
        assert max(first["inflight"]) == 0
        for s in later:
            assert s["stats"] == {"sync": 2, "prefetched": n_gathers - 2, "hits": n_gathers - 2}
            # Right after a unit hook the next unit's gather is in flight, never more than one.
            assert max(s["inflight"]) == 1
        for s in off["steps"]:
            assert s["stats"] == {"sync": n_gathers, "prefetched": 0, "hits": 0}
            assert max(s["inflight"]) == 0
        # Same collectives, same elements, same numbers (bit for bit) with and without prefetch.
        for s_on, s_off in zip(on["steps"], off["steps"], strict=True):
            assert s_on["comm"] == s_off["comm"]
            assert s_on["norm"] == s_off["norm"]
        assert on["memory"] == off["memory"]
        assert on["param_storage"] == off["param_storage"] == 0
        for name, want in off["state"].items():
            assert torch.equal(on["state"][name], want), name
            torch.testing.assert_close(on["state"][name], ref["state"][name], atol=ATOL, rtol=RTOL)


# -- weight decay: matrices only -------------------------------------------------


def test_decay_ranges_cover_exactly_the_matrices():
    """Every shard's decayed ranges are the >= 2-D parameters' elements, as maximal runs."""
    layout = FlatLayout.of(make_model("gpt"))
    n = layout.numel
    want = torch.zeros(n, dtype=torch.bool)
    for s in layout.slots:
        want[s.offset : s.end] = len(s.shape) >= 2
    assert want.any() and not want.all()
    for lo, hi in [(0, n), (5, 700), (n - 37, n), (100, 100), *shard_bounds(n, UNEVEN[3])]:
        ranges = decay_ranges(layout, lo, hi)
        got = torch.zeros(hi - lo, dtype=torch.bool)
        for a, b in ranges:
            got[a:b] = True
        assert torch.equal(got, want[lo:hi]), (lo, hi)
        gaps = [a2 - b1 for (_, b1), (a2, _) in zip(ranges[:-1], ranges[1:], strict=True)]
        assert all(g > 0 for g in gaps), "runs are maximal: no two touch"


def test_reference_optimizer_decays_matrices_only():
    """``OptimizerSpec.build`` (every reference's optimizer) has nanoGPT's two groups."""
    model = make_model("gpt")
    for spec in (ADAMW, SGD):
        groups = spec.build(list(model.parameters()), lr=LR).param_groups
        decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
        assert len(decay) == len(list(model.parameters()))
        for name, p in model.named_parameters():
            assert decay[id(p)] == (spec.weight_decay if p.dim() >= 2 else 0.0), name


@pytest.mark.parametrize("strategy", ["ddp", "zero1", "zero2", "zero3"])
def test_weight_decay_applies_to_matrices_only(strategy):
    """With zero gradients a step only decays: 2-D parameters (linear weights, embeddings)
    shrink by exactly ``1 - lr * weight_decay``; 1-D ones (biases, LayerNorm) do not change.
    """
    model = make_model("gpt")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    engine = build_engine(strategy, model, OptimizerSpec("adamw", weight_decay=0.5))
    engine.zero_grad()
    engine.step(0.1)  # no backward: every gradient is zero, so Adam's update is zero
    after = engine.full_state_dict()
    kinds = set()
    for name, p in before.items():
        kinds.add(p.dim())
        want = p * (1 - 0.1 * 0.5) if p.dim() >= 2 else p
        assert torch.equal(after[name], want), name
    assert kinds == {1, 2}


@pytest.mark.parametrize("opt", ["adamw", "sgd"])
def test_flat_optimizer_is_torch_bitwise(opt):
    """The flat update with its decay ranges rounds exactly as torch's two-group optimizer."""
    spec = ADAMW if opt == "adamw" else SGD
    model, ref = make_model("gpt"), make_model("gpt")
    layout = FlatLayout.of(model)
    flat = flatten_into(model, layout, torch.float32)
    grad = torch.zeros_like(flat)
    flat_opt = FlatOptimizer(spec, flat, grad, decayed=decay_ranges(layout))
    ref_params = [dict(ref.named_parameters())[s.name] for s in layout.slots]
    ref_opt = spec.build(ref_params, lr=LR)
    g = torch.Generator().manual_seed(7)
    for _ in range(3):
        grad.copy_(torch.randn(layout.numel, generator=g))
        for s, p in zip(layout.slots, ref_params, strict=True):
            p.grad = grad[s.offset : s.end].view(s.shape).clone()
        flat_opt.step(LR)
        ref_opt.step()
    assert torch.equal(flat, torch.cat([p.detach().reshape(-1) for p in ref_params]))


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_a_backward_holds_few_groups_gradients(strategy):
    """Reductions are folded into the shard as the backward goes: gradient buffers of at most
    MAX_REDUCTIONS_IN_FLIGHT groups are alive at once, however many groups the model has."""
    from collectives.zero import MAX_REDUCTIONS_IN_FLIGHT

    model = make_model("gpt")
    engine = build_engine(strategy, model, ADAMW, bucket_mb=0.001)  # a group per parameter
    assert len(engine.groups) > 2 * MAX_REDUCTIONS_IN_FLIGHT
    peak = 0
    launch = engine._launch

    def counted(g_idx):
        nonlocal peak
        launch(g_idx)
        peak = max(peak, len(engine._inflight))

    engine._launch = counted
    x, y = global_batch("gpt", 0)
    engine.zero_grad()
    engine.backward(summed_loss("gpt", model, x, y))
    assert peak == MAX_REDUCTIONS_IN_FLIGHT
