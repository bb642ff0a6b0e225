"""The stage engine and schedule executor without Ray: ranks in plain processes.

Each rank builds the same GPT, keeps one stage's layers (``StageEngine``) and
runs its GPipe or 1F1B actions (``StageExecutor``) with activations sent
point to point, for a few AdamW steps with clipping; the concatenated stage
ranges must equal one-process training. The GPT's head is tied to its
embedding, so the first and last stages share a parameter. gloo on CPU
always; NCCL on GPUs where a machine has one per stage.

Tolerance: as in tests/test_jobs.py (gradients summed in another order).
"""

from __future__ import annotations

import datetime
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from actors.models.gpt import GPT
from actors.stages import pipeline_layers
from collectives.flat import FlatLayout
from collectives.optim import OptimizerSpec
from collectives.pipeline import StageExecutor
from collectives.pipeline_schedule import stage_actions
from collectives.stage_engine import StageEngine, layer_slots, owned_ranges, tied_slots
from orchestrator.stage_plan import even_bounds
from tests.reference import flat_params

ATOL = 2e-5
STEPS = 3
BATCH, SEQ, VOCAB = 6, 8, 40
LR, CLIP = 3e-3, 0.5
OPT = OptimizerSpec(name="adamw", weight_decay=0.1, beta1=0.9, beta2=0.95)


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(vocab_size=VOCAB, n_layer=3, n_head=2, d_model=16, seq_len=SEQ)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1), reduction="sum") / y.numel()


def _reference() -> torch.Tensor:
    model = _model()
    opt = OPT.build(list(model.parameters()), lr=LR)
    for step in range(STEPS):
        x, y = _batch(step)
        opt.zero_grad()
        _loss(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
    return flat_params(model)


def _stage_child(
    rank: int, ws: int, backend: str, schedule: str, micro: int, store: str, out: str
) -> None:
    torch.set_num_threads(1)
    device = torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    dist.init_process_group(
        backend,
        store=dist.FileStore(store, ws),
        rank=rank,
        world_size=ws,
        timeout=datetime.timedelta(seconds=120),
    )
    model = _model().to(device)
    named = pipeline_layers(model)
    layout = FlatLayout.of(model)
    uses = layer_slots(layout, model, [m for _, m in named])
    ranges = owned_ranges(layout, uses, [n for n, _ in named])
    bounds = even_bounds(len(named), ws)
    a, b = bounds[rank]
    owned = (ranges[a][0], ranges[b - 1][1])
    engine = StageEngine(
        model,
        [m for _, m in named[a:b]],
        layout,
        owned,
        owned,
        tied_slots(layout, uses, bounds),
        OPT,
        grad_clip=CLIP,
        pp_group=dist.group.WORLD,
    )
    executor = StageExecutor(
        engine.module,
        prev=rank - 1 if rank > 0 else None,
        next=rank + 1 if rank < ws - 1 else None,
        device=device,
        is_parameter=engine.is_parameter,
    )
    for step in range(STEPS):
        x, y = _batch(step)
        xs, ys = x.tensor_split(micro), y.tensor_split(micro)
        engine.zero_grad()
        executor.run(
            stage_actions(schedule, rank, ws, micro),
            list(xs) if rank == 0 else None,
            # Each micro-batch's summed loss over the whole batch's token count.
            lambda out, i, ys=ys, n=y.numel(): _loss(out, ys[i].to(device)) * ys[i].numel() / n,
        )
        engine.step(LR)
    torch.save(engine.slice(*owned)["param"].cpu(), os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _run_pipeline(backend: str, ws: int, schedule: str, micro: int) -> torch.Tensor:
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _stage_child,
            args=(ws, backend, schedule, micro, os.path.join(tmp, "store"), tmp),
            nprocs=ws,
            join=True,
            start_method="spawn",
        )
        return torch.cat([torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(ws)])


def _gpus(n: int) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.device_count() < n,
        reason=f"needs {n} CUDA devices",
    )


@pytest.mark.parametrize(
    ("backend", "ws", "schedule", "micro"),
    [
        pytest.param("gloo", 3, "1f1b", 5, id="gloo-3-stages-1f1b-m5"),
        pytest.param("gloo", 2, "gpipe", 3, id="gloo-2-stages-gpipe-m3"),
        pytest.param("nccl", 2, "1f1b", 4, marks=_gpus(2), id="nccl-2-stages-1f1b-m4"),
    ],
)
def test_stages_in_processes_match_one_process(backend, ws, schedule, micro):
    torch.testing.assert_close(
        _run_pipeline(backend, ws, schedule, micro), _reference(), atol=ATOL, rtol=0
    )
