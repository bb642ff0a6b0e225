"""One-process reference training: what N-worker training must reproduce.

Its optimizer is ``OptimizerSpec.build``: torch's AdamW (or SGD) with
nanoGPT's two parameter groups, weight decay on the parameters with ``>= 2``
dims (linear weights, embeddings) and none on the rest (biases, LayerNorm
weights), which is what the engines' flat optimizer applies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from actors.data import VOCAB_SIZE, batch_offsets, make_batch
from actors.dp_runtime import optimizer_spec
from actors.models.build import build_model
from collectives.flat import FlatLayout
from orchestrator.schedule import lr_at
from orchestrator.spec import JobSpec


def train_reference(spec: JobSpec, tokens, steps: int) -> torch.Tensor:
    """Plain single-process training on the same global batches; returns flat parameters."""
    t = spec.train
    torch.manual_seed(t.seed)
    model = build_model(spec.model, VOCAB_SIZE)
    opt = optimizer_spec(spec).build(list(model.parameters()), lr=t.lr)  # two param groups
    for step in range(steps):
        offsets = batch_offsets(t.seed, step, t.global_batch, len(tokens), spec.seq_len)
        x, y = make_batch(tokens, offsets, spec.seq_len)
        opt.zero_grad()
        logits = model(x)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, t)
        opt.step()
    return flat_params(model)


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    params = dict(model.named_parameters())
    return torch.cat([params[s.name].detach().reshape(-1) for s in FlatLayout.of(model).slots])
