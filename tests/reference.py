"""One-process reference training: what N-worker training must reproduce.

Its optimizer is ``OptimizerSpec.build``: torch's AdamW (or SGD) with
nanoGPT's two parameter groups, weight decay on the parameters with ``>= 2``
dims (linear weights, embeddings) and none on the rest (biases, LayerNorm
weights), which is what the engines' flat optimizer applies.
"""

from __future__ import annotations

import torch

from actors.dp_runtime import optimizer_spec
from actors.task import build_model, make_task
from collectives.flat import FlatLayout
from orchestrator.api import submit
from orchestrator.schedule import lr_at
from orchestrator.spec import JobSpec
from orchestrator.status import JobState
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
