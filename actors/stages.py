"""A model as a sequence of layers, and what each layer costs: the pipeline planner's input.

``strategy=pipeline`` cuts the model between layers. A model says where it
can be cut with a ``pipeline_layers()`` method returning ``[(name, module),
...]`` whose composition in order computes ``forward`` (each layer takes and
returns one tensor): ``GPT`` and ``MLP`` have one. An ``nn.Sequential`` needs
none. Each worker then times every layer's forward and backward on one
micro-batch and counts its bytes (``profile_layers``), so the planner sees
the worker's own speed, not a guess.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from collectives.flat import FlatLayout
from collectives.stage_engine import layer_slots, owned_ranges

# Timed repetitions per layer (after one warm-up); the minimum is kept, as
# interference from other processes only ever adds time. A layer stops being
# repeated once its repetitions took PROFILE_BUDGET_S.
PROFILE_REPEATS = 7
PROFILE_BUDGET_S = 0.5


def pipeline_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's layers for pipelining (see the module docstring)."""
    layers = getattr(model, "pipeline_layers", None)
    if callable(layers):
        out = list(layers())
    elif isinstance(model, nn.Sequential):
        out = list(model.named_children())
    else:
        raise TypeError(
            f"strategy=pipeline: {type(model).__name__} cannot be cut into stages. Give it a "
            "pipeline_layers() method returning [(name, module), ...] whose composition is its "
            "forward (each layer takes and returns one tensor), or make it an nn.Sequential"
        )
    if not out or not all(isinstance(m, nn.Module) for _, m in out):
        raise TypeError(
            f"{type(model).__name__}.pipeline_layers() must return (name, module) pairs"
        )
    return out


def layer_ranges(
    model: nn.Module, layers: Sequence[tuple[str, nn.Module]]
) -> list[tuple[int, int]]:
    """Each layer's own range of the model's flat vector (see ``collectives/stage_engine.py``)."""
    layout = FlatLayout.of(model)
    uses = layer_slots(layout, model, [m for _, m in layers])
    return owned_ranges(layout, uses, [n for n, _ in layers])


def profile_layers(
    model: nn.Module,
    layers: Sequence[tuple[str, nn.Module]],
    example: torch.Tensor,
    state_bytes_per_element: int,
) -> list[dict[str, Any]]:
    """Per layer: name, forward+backward seconds on ``example``, state and activation bytes.

    Each layer runs on the previous layer's (detached) output, so its
    backward is timed alone. The layers' parameter gradients are cleared
    afterwards.
    """
    ranges = layer_ranges(model, layers)
    params = {p.data_ptr() for p in model.parameters()}
    out = []
    x = example
    for (name, layer), (lo, hi) in zip(layers, ranges, strict=True):
        best, saved, spent = float("inf"), 0, 0.0
        for rep in range(PROFILE_REPEATS + 1):
            if rep > 1 and spent > PROFILE_BUDGET_S:
                break
            xin = x.detach().requires_grad_(x.is_floating_point())
            nbytes = 0

            def pack(t: torch.Tensor) -> torch.Tensor:
                nonlocal nbytes
                if t.data_ptr() not in params:
                    nbytes += t.numel() * t.element_size()
                return t

            start = time.perf_counter()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                y = layer(xin)
            if y.requires_grad:
                y.backward(torch.ones_like(y))
            elapsed = time.perf_counter() - start
            if rep > 0:  # the first run warms caches and allocators up: neither kept nor counted
                spent += elapsed
                best, saved = min(best, elapsed), nbytes
        x = y.detach()
        out.append(
            {
                "name": name,
                "compute_s": best,
                "state_bytes": (hi - lo) * state_bytes_per_element,
                "activation_bytes": saved,
                "flat": [lo, hi],
            }
        )
    model.zero_grad(set_to_none=True)
    return out
