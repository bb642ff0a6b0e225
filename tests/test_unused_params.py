"""Steps in which some parameters get no gradient on some ranks, on real gloo groups.

A model with two expert branches routes each sample to one of them; an
expert no sample of a rank was routed to is not run there at all, so its
parameters get no gradient on that rank (and, on one step, on any rank).
Every engine must then reduce the same buckets in the same order on every
rank, with the missing gradients as zeros (PyTorch DDP's
``find_unused_parameters`` semantics), instead of hanging or pairing one
rank's bucket with another's.

The buckets are small (~260 floats: six, one shared by expert 1 and the
output layers, two for each expert, two for the input layers), so a rank
that left an expert unused had buckets that never filled: before the fix it
reduced them after the backward while its peers reduced them during it, the
reductions paired up wrongly and gloo aborted. For stage 3 the experts are
one unit (gathered on every rank), with two units before it, so its
reduce-scatter must also keep its place among the backward's gathers.

The reference is one process on the global batch with ``OptimizerSpec.build``
(AdamW, decay on matrices only) and ``clip_grad_norm_``; an unused
parameter's gradient there is zeros, not None, which is what the engines
apply (AdamW still decays its moments and, for a matrix, its weights).
Tolerance: ``atol=rtol=1e-5`` after 5 steps, as in ``test_zero_engine.py``
(largest difference measured: 3.1e-7). The collectives time out after 30 s
and the test after 240 s, so a hang fails instead of stalling the suite.
"""

from __future__ import annotations

import datetime
import os
import tempfile
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from collectives.flat import FlatLayout
from collectives.optim import OptimizerSpec
from collectives.zero import build_engine
from orchestrator.shard_plan import shard_bounds
from tests.test_zero_engine import _START_METHOD

WS = 2
LR = 1e-2
CLIP = 0.5
BUCKET_MB = 0.001  # ~260 floats: six buckets
ATOL, RTOL = 1e-5, 1e-5
SPEC = OptimizerSpec("adamw", weight_decay=0.1)
COLLECTIVE_TIMEOUT_S = 30  # a mismatched collective fails here instead of hanging
# Routes of the 8 samples of each step; ranks 0 and 1 get samples 0-3 and 4-7.
# -1: the sample skips both experts (a token an MoE layer dropped).
ROUTES = (
    (0, 0, 0, 0, 1, 1, 1, 1),  # each rank uses only "its" expert
    (0, 1, 1, 0, 1, 0, 0, 1),  # both experts on both ranks
    (0, 0, 0, 0, 0, 0, 0, 0),  # expert 1 unused on every rank
    (0, 1, -1, 1, -1, -1, -1, -1),  # rank 1 uses no expert parameter at all
    (1, 1, 1, 1, 0, 1, 0, -1),  # the other way round; rank 1 mixed
)
STEPS = len(ROUTES)
GLOBAL_BATCH = len(ROUTES[0])


class Experts(nn.Module):
    """Two branches; a branch no sample is routed to is not run (no gradient at all).

    A sample routed to neither passes through unchanged, so on a rank whose
    samples all skip them the module runs but none of its parameters is used.
    """

    def __init__(self, d: int):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d)) for _ in range(2)
        )

    def forward(self, h: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        out = h
        for e, branch in enumerate(self.branches):
            idx = (route == e).nonzero().squeeze(1)
            if idx.numel():
                out = out.index_add(0, idx, branch(h[idx]))
        return out


class Routed(nn.Module):
    """Dense layers around the experts; for stage 3, two units come before the experts'
    (gathered in backward after it), so its reduce-scatter must keep its place among them.
    """

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.inp = nn.Linear(16, 16)
        self.experts = Experts(16)  # one stage-3 unit: gathered on every rank
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.inp(F.gelu(self.embed(x))))
        return self.out(self.norm(self.experts(h, route)))


def make_model() -> Routed:
    torch.manual_seed(4321)
    return Routed()


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(500 + step)
    x = torch.randn(GLOBAL_BATCH, 6, generator=g)
    y = torch.randn(GLOBAL_BATCH, 3, generator=g)
    return x, y, torch.tensor(ROUTES[step])


def summed_loss(model: nn.Module, x, y, route) -> torch.Tensor:
    """Per-sample losses summed over the global batch's size: the SUM over ranks is the mean."""
    return (model(x, route) - y).pow(2).mean(dim=1).sum() / GLOBAL_BATCH


@dataclass(frozen=True)
class Case:
    strategy: str
    uneven: bool = False  # shards 2:1 (ZeRO)
    micro: int = 1  # micro-batches per step (gradient accumulation when > 1)

    @property
    def name(self) -> str:
        return f"{self.strategy}{'-uneven' if self.uneven else ''}-micro{self.micro}"


CASES = [
    *(Case(s) for s in ("ddp", "zero1", "zero2", "zero3")),
    *(Case(s, uneven=True) for s in ("zero1", "zero2", "zero3")),
    *(Case(s, micro=2) for s in ("ddp", "zero1", "zero2", "zero3")),
]


def _run_case(rank: int, case: Case) -> dict:
    model = make_model()
    numel = FlatLayout.of(model).numel
    engine = build_engine(
        case.strategy,
        model,
        SPEC,
        grad_clip=CLIP,
        bucket_mb=BUCKET_MB,
        shard_bounds=shard_bounds(numel, [2.0, 1.0]) if case.uneven else None,
    )
    lo, hi = rank * GLOBAL_BATCH // WS, (rank + 1) * GLOBAL_BATCH // WS
    norms = []
    for step in range(STEPS):
        x, y, route = (t[lo:hi] for t in global_batch(step))
        engine.zero_grad()
        cuts = torch.linspace(0, hi - lo, case.micro + 1).round().long().tolist()
        for m in range(case.micro):
            part = slice(cuts[m], cuts[m + 1])
            loss = summed_loss(model, x[part], y[part], route[part])
            engine.backward(loss, sync=m == case.micro - 1)
        norms.append(engine.step(LR).grad_norm)
    return {"state": engine.full_state_dict(), "norms": norms}


def _child(rank: int, store_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        store=dist.FileStore(store_path, WS),
        rank=rank,
        world_size=WS,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    results = {case.name: _run_case(rank, case) for case in CASES}
    dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def results() -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _child,
            args=(os.path.join(tmp, "store"), tmp),
            nprocs=WS,
            join=True,
            start_method=_START_METHOD,
        )
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WS)]


def reference() -> dict:
    model = make_model()
    params = list(model.parameters())
    opt = SPEC.build(params, lr=LR)
    norms = []
    for step in range(STEPS):
        opt.zero_grad()
        summed_loss(model, *global_batch(step)).backward()
        for p in params:  # unused on every rank (step 2): a zero gradient, as the engines apply
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, CLIP)))
        opt.step()
    return {"state": model.state_dict(), "norms": norms}


def test_the_routes_leave_parameters_unused():
    """The premise: on some steps a rank (or every rank) leaves an expert's parameters unused."""
    for step, route in enumerate(ROUTES):
        per_rank = [set(route[:4]), set(route[4:])]
        if step == 0:
            assert per_rank == [{0}, {1}]
        if step == 2:
            assert per_rank == [{0}, {0}]
        if step == 3:
            assert per_rank[1] == {-1}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_unused_parameters_match_reference(results, case):
    ref = reference()
    for r in range(WS):
        res = results[r][case.name]
        assert res["norms"] == pytest.approx(ref["norms"], rel=1e-4), f"rank {r}"
        for name, want in ref["state"].items():
            torch.testing.assert_close(
                res["state"][name], want, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"{n}: {m}"
            )
            assert torch.equal(res["state"][name], results[0][case.name]["state"][name])
