"""One-process reference training: what N-worker training must reproduce.

Its optimizer is ``OptimizerSpec.build``: torch's AdamW (or SGD) with
nanoGPT's two parameter groups, weight decay on the parameters with ``>= 2``
dims (linear weights, embeddings) and none on the rest (biases, LayerNorm
weights), which is what the engines' flat optimizer applies.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch

from actors.dp_runtime import optimizer_spec
from actors.task import build_model, make_task
from collectives.flat import FlatLayout
from orchestrator.api import JobHandle, submit
from orchestrator.schedule import lr_at
from orchestrator.spec import JobSpec
from orchestrator.status import JobState, JobStatus
from storage.checkpoint import CheckpointReader, latest_manifest
from storage.object_store import open_store


def train_reference(spec: JobSpec, data, steps: int) -> torch.Tensor:
    """Plain single-process training on the same global batches; returns flat parameters.

    ``data`` is the job's dataset (``actors/datasets.py``); the loss is the
    task's, scaled as the workers scale it (by the global batch's units).
    """
    t = spec.train
    task = make_task(spec.task, data, spec.seq_len)
    torch.manual_seed(t.seed)
    model = build_model(spec.model, data.facts)
    opt = optimizer_spec(spec).build(list(model.parameters()), lr=t.lr)  # two param groups
    for step in range(steps):
        batch = task.batch(data, t.seed, step, t.global_batch, 0, t.global_batch)
        opt.zero_grad()
        loss, _ = task.loss(model, batch)
        (loss / (t.global_batch * task.units_per_sample)).backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, t)
        opt.step()
    return flat_params(model)


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    params = dict(model.named_parameters())
    return torch.cat([params[s.name].detach().reshape(-1) for s in FlatLayout.of(model).slots])


def final_params(spec: JobSpec) -> torch.Tensor:
    """The flat parameters of a finished job's last checkpoint (which must be its last step)."""
    store = open_store(spec.checkpoint.uri)
    manifest = latest_manifest(store)
    assert manifest is not None and manifest.step == spec.train.steps
    return CheckpointReader(store, manifest).read("param", 0, manifest.numel)


def run_job(spec: JobSpec):
    """Submit ``spec``, wait for it, and require success; returns (handle, status)."""
    handle = submit(spec)
    status = handle.wait(timeout=240)
    assert status.state == JobState.SUCCEEDED, status.error
    return handle, status


# run_jobs runs this many jobs at a time: a job's start-up is mostly one process at a
# time (its controller, then its workers), so a second job uses the core the first
# leaves idle.
AT_ONCE = 2


class JobRun(NamedTuple):
    """A finished job: its spec, final status and per-step records (``handle.metrics()``)."""

    spec: JobSpec
    status: JobStatus
    metrics: list[dict]


def run_jobs(*specs: JobSpec, check: bool = True, timeout: float = 240) -> list[JobRun]:
    """Run independent jobs, ``AT_ONCE`` at a time; returns their runs in order.

    ``check``: require that each succeeds (else each caller checks, see ``succeeded``).
    ``timeout``: for each job, from its submission. The handles are not kept, so each
    controller ends once its job has (as when a test that ran one job returns).
    """
    queue = list(enumerate(specs))
    running: list[tuple[int, JobHandle, float]] = []
    runs: dict[int, JobRun] = {}
    try:
        while queue or running:
            while queue and len(running) < AT_ONCE:
                i, spec = queue.pop(0)
                running.append((i, submit(spec), time.monotonic()))
            time.sleep(0.1)
            for entry in list(running):
                i, handle, submitted = entry
                if handle.done() or time.monotonic() - submitted > timeout:
                    running.remove(entry)
                    status = handle.wait(timeout=0)
                    if not handle.done():  # timed out
                        handle.cancel()
                    runs[i] = JobRun(specs[i], status, handle.metrics())
                    if check:
                        succeeded(runs[i])
    finally:
        for _, handle, _ in running:  # after a failure: leave nothing running
            handle.cancel()
    return [runs[i] for i in range(len(specs))]


def succeeded(run: JobRun) -> JobRun:
    status = run.status
    assert status.state == JobState.SUCCEEDED, (
        f"{run.spec.run_dir.name}: {status.state.value}: {status.error}"
    )
    return run
