"""The baseline of ``bench/pipeline.py``: ``torch.distributed.pipelining`` driven directly.

A pool of plain processes (``torch.multiprocessing`` spawn, one per stage,
gloo, one thread each as shoal's workers have with ``cpus_per_worker=1``)
that stays up between runs, so the driver can run a shoal job and then the
same pipeline here, config after config, without paying the start-up each
time. For every config each process:

* builds the whole model from the job's seed (as every shoal stage does),
  keeps the layers ``[a, b)`` of ``pipeline_layers()`` that the partition
  gives its stage, as an ``nn.Sequential``, and wraps it in a
  ``PipelineStage`` with example input and output tensors (the
  activations of one micro-batch, ``requires_grad=True`` past the first
  stage);
* runs ``ScheduleGPipe`` or ``Schedule1F1B`` on the job's own batches
  (``task.batch``, the same rows shoal trains on), with the loss as shoal
  scales it (summed cross-entropy over ``global_batch * seq_len``, so
  ``scale_grads=False``);
* does what a shoal step also does after the schedule: sums the gradients of
  tied parameters (GPT's embedding and LM head) over the stages that use
  them, clips by the global gradient norm (an all-reduce over the stages),
  and steps ``torch.optim.AdamW``.

Each step is timed from before the schedule to after the optimizer step; a
step's time is the slowest rank's.
"""

from __future__ import annotations

import os
import queue
import socket
import statistics
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TorchConfig:
    """One run of the baseline."""

    schedule: str  # "gpipe" or "1f1b"
    micro_batches: int
    bounds: tuple[tuple[int, int], ...]  # per stage, [first, last) of pipeline_layers()
    steps: int
    warmup: int


@dataclass(frozen=True)
class TorchResult:
    config: TorchConfig
    step_s: list[float]  # per step, the slowest rank's
    median_s: float  # over the steps after the warm-up
    first_loss: float  # step 0's mean loss per token (before any update)
    error: str | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TorchPipelines:
    """``stages`` spawned processes that run ``TorchConfig``s on one job's model and data."""

    def __init__(self, stages: int, spec: Any, data: Any, timeout_s: float = 900):
        self.stages, self.timeout_s = stages, timeout_s
        ctx = mp.get_context("spawn")
        self._inbox = [ctx.Queue() for _ in range(stages)]
        self._outbox = ctx.Queue()
        port = _free_port()
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(rank, stages, port, spec, data, self._inbox[rank], self._outbox),
                daemon=True,
            )
            for rank in range(stages)
        ]
        for p in self._procs:
            p.start()

    def run(self, config: TorchConfig) -> TorchResult:
        if not all(p.is_alive() for p in self._procs):
            return TorchResult(config, [], float("nan"), float("nan"), "the pool is gone")
        for box in self._inbox:
            box.put(config)
        rows: dict[int, dict[str, Any]] = {}
        deadline = time.time() + self.timeout_s
        while len(rows) < self.stages:
            try:
                row = self._outbox.get(timeout=5)
            except queue.Empty:
                dead = [p.pid for p in self._procs if not p.is_alive()]
                if dead or time.time() > deadline:
                    raise RuntimeError(
                        f"torch baseline: no result (dead processes {dead}, "
                        f"{len(rows)}/{self.stages} answered)"
                    ) from None
                continue
            if row.get("error"):  # the other ranks are stuck in the schedule: give up the pool
                self.kill()
                return TorchResult(config, [], float("nan"), float("nan"), row["error"])
            rows[row["rank"]] = row
        step_s = [max(r["times"][i] for r in rows.values()) for i in range(config.steps)]
        return TorchResult(
            config,
            step_s,
            statistics.median(step_s[config.warmup :]),
            rows[self.stages - 1]["first_loss"],
        )

    def close(self) -> None:
        for box in self._inbox:
            box.put(None)
        for p in self._procs:
            p.join(timeout=30)
        self.kill()

    def kill(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)

    def __enter__(self) -> TorchPipelines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _worker(rank: int, world: int, port: int, spec: Any, data: Any, inbox, outbox) -> None:
    import traceback

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        while (config := inbox.get()) is not None:
            try:
                times, loss = _run(rank, world, spec, data, config)
                outbox.put({"rank": rank, "times": times, "first_loss": loss})
            except Exception:  # noqa: BLE001 - reported to the driver, which prints it
                outbox.put({"rank": rank, "error": f"rank {rank}: {traceback.format_exc(limit=6)}"})
    finally:
        dist.destroy_process_group()


def _run(
    rank: int, world: int, spec: Any, data: Any, config: TorchConfig
) -> tuple[list[float], float]:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    from actors.stages import pipeline_layers
    from actors.task import build_model, make_task

    t = spec.train
    task = make_task(spec.task, data, spec.seq_len)
    if task.type != "lm":
        raise ValueError("the torch baseline runs language models only")
    gb, m, seq_len = t.global_batch, config.micro_batches, task.seq_len
    if gb % m:
        raise ValueError(f"train.global_batch {gb} must be a multiple of micro-batches {m}")

    torch.manual_seed(t.seed)
    model = build_model(spec.model, data.facts)
    named = pipeline_layers(model)
    canonical = {id(p): name for name, p in model.named_parameters()}
    users: dict[str, list[int]] = {}  # parameter -> the stages whose layers use it
    for s, (a, b) in enumerate(config.bounds):
        for _, layer in named[a:b]:
            for p in layer.parameters():
                stages = users.setdefault(canonical[id(p)], [])
                if s not in stages:
                    stages.append(s)
    a, b = config.bounds[rank]
    module = nn.Sequential(OrderedDict((str(i), layer) for i, (_, layer) in enumerate(named[a:b])))
    mine = {canonical[id(p)]: p for p in module.parameters()}
    # Every rank creates every group, in the same order (new_group is collective).
    tied = []
    for name, stages in sorted(users.items()):
        if len(stages) > 1:
            group = dist.new_group(sorted(stages))
            if rank in stages:
                tied.append((mine[name], group))
    own = [p for name, p in mine.items() if users[name][0] == rank]

    # Example tensors: one micro-batch's activations at this stage's input and output; both
    # must say requires_grad, or the stages neither send nor expect gradients.
    example = task.batch(data, t.seed, 0, gb, 0, gb // m)["x"]
    with torch.no_grad():
        for _, layer in named[:a]:
            example = layer(example)
        out = module(example).requires_grad_(True)
    if rank > 0:
        example = example.requires_grad_(True)
    del model, named
    stage = PipelineStage(
        module, rank, world, torch.device("cpu"), input_args=example, output_args=out
    )

    def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(output.flatten(0, 1).float(), target.flatten(), reduction="sum")
        return loss / (gb * seq_len)

    kind = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[config.schedule]
    # Every rank passes the loss: a schedule without one runs forwards only.
    schedule = kind(stage, m, loss_fn=loss_fn, scale_grads=False)
    optimizer = torch.optim.AdamW(
        module.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay
    )
    times, first_loss = [], float("nan")
    dist.barrier()
    for step in range(config.steps):
        batch = task.batch(data, t.seed, step, gb, 0, gb)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        losses: list[torch.Tensor] = []
        if rank == 0:
            schedule.step(batch["x"])
        elif rank == world - 1:
            schedule.step(target=batch["y"], losses=losses)
        else:
            schedule.step()
        for p, group in tied:
            dist.all_reduce(p.grad, group=group)
        sq = torch.zeros(1, dtype=torch.float64)
        for p in own:
            if p.grad is not None:
                sq += torch.linalg.vector_norm(p.grad, 2, dtype=torch.float64).square()
        dist.all_reduce(sq)
        if t.grad_clip > 0:
            coef = torch.clamp(t.grad_clip / (sq.sqrt().float() + 1e-6), max=1.0)
            for p in module.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
        optimizer.step()
        times.append(time.perf_counter() - start)
        if step == 0 and losses:
            first_loss = float(sum(float(x.detach()) for x in losses))
    dist.barrier()
    return times, first_loss
