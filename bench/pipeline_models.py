"""A model whose pipeline layers cost deliberately unequal amounts, for ``bench/pipeline.py``.

``UnequalMLP`` is an input projection, a stack of residual MLP blocks on one
width ``width``, and a classifier head. Block ``i`` widens to
``expansions[i] * width`` and back, so its forward and backward cost is
proportional to ``expansions[i]``; the input and head layers are small next
to any block. With the default ``(6, 4, 4, 2, 2, 2)`` and 2 stages an even
partition (four layers each: input, 6, 4, 4 | 2, 2, 2, head) gives the stages
costs 14 : 6, while the best cut (input, 6, 4 | 4, 2, 2, 2, head) gives
10 : 10.

Use it as a job's model (the workers import it from the repository root)::

    model=mlp data=digits model._target_=bench.pipeline_models.UnequalMLP \
        +model.width=384 '+model.expansions=[6,4,4,2,2,2]'

``SlowedMLP`` has the same shape of costs, but spent waiting (a sleep per
block), as layers on devices of their own would look to a CPU: see its
docstring.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ExpandBlock(nn.Module):
    """``x + W2 gelu(W1 layernorm(x))`` with a hidden width of ``k * width``: cost ~ ``k``."""

    def __init__(self, width: int, k: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, k * width)
        self.proj = nn.Linear(k * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(F.gelu(self.fc(self.norm(x))))


class UnequalMLP(nn.Sequential):
    """A classifier whose blocks cost ``expansions[i]`` units each; see the module docstring."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        width: int = 384,
        expansions: Sequence[int] = (6, 4, 4, 2, 2, 2),
    ):
        ks = [int(k) for k in expansions]
        if not ks:
            raise ValueError("UnequalMLP needs at least one block")
        super().__init__(
            nn.Sequential(nn.Flatten(), nn.Linear(in_features, width)),
            *(ExpandBlock(width, k) for k in ks),
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, num_classes)),
        )
        self.expansions = ks

    def pipeline_layers(self) -> list[tuple[str, nn.Module]]:
        """``input``, one layer per block named by its expansion (``block0.x6``, ...), ``head``."""
        blocks = [(f"block{i}.x{k}", self[i + 1]) for i, k in enumerate(self.expansions)]
        return [("input", self[0]), *blocks, ("head", self[len(self) - 1])]


class _Wait(torch.autograd.Function):
    """Identity that sleeps ``forward_s`` in forward and twice that in backward (a backward
    costs about two forwards): time spent without using a core."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, forward_s: float) -> torch.Tensor:
        time.sleep(forward_s)
        ctx.forward_s = forward_s
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        time.sleep(2 * ctx.forward_s)
        return grad, None


class WaitBlock(ExpandBlock):
    """An ``ExpandBlock`` of expansion 1 that also waits ``k * ms_per_unit`` per forward."""

    def __init__(self, width: int, k: int, ms_per_unit: float):
        super().__init__(width, 1)
        self.wait_s = k * ms_per_unit / 1e3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Wait.apply(super().forward(x), self.wait_s)


class SlowedMLP(UnequalMLP):
    """``UnequalMLP`` whose block ``i`` costs ``expansions[i]`` units of *waiting* (a sleep of
    ``ms_per_unit`` per unit in forward, twice that in backward) over a small computation.

    Stands for layers on devices of their own: two stages on two shared CPU
    cores compete for the cores, so a better cut of compute-bound layers
    cannot shorten the step there; waiting layers leave the cores free, and
    the step follows the slowest stage as it would with a device per stage.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        width: int = 64,
        expansions: Sequence[int] = (6, 4, 4, 2, 2, 2),
        ms_per_unit: float = 5.0,
    ):
        super().__init__(in_features, num_classes, width, expansions)
        for i, k in enumerate(self.expansions):
            self[i + 1] = WaitBlock(width, k, ms_per_unit)
