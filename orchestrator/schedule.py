"""The learning-rate schedule: pure in the step (the controller sends lr with each step)."""

from __future__ import annotations

import math

from orchestrator.schema import TrainConfig


def lr_at(step: int, train: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio``.

    With ``lr_schedule=constant``, ``lr`` after the warm-up.
    """
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    if train.lr_schedule == "constant":
        return train.lr
    span = max(1, train.steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    floor = train.lr * train.min_lr_ratio
    return floor + 0.5 * (train.lr - floor) * (1.0 + math.cos(math.pi * progress))
