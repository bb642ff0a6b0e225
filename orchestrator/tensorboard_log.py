"""TensorBoard event files in the run folder (``train.tensorboard=true``).

Every number of a step record becomes a scalar at global step ``step``
(``loss``, ``lr``, ``grad_norm``, ``tokens_per_s``, ``eval_loss``,
``accuracy``, ``epsilon``, ...); a per-worker list (``compute_s``,
``peak_rss_mb``) one scalar per rank (``compute_s/rank0``). The files are
written by tensorboardX in TensorBoard's own format, so
``tensorboard --logdir runs/JOB/tensorboard`` shows them (TensorBoard itself
is not a dependency of shoal).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TENSORBOARD_DIR = "tensorboard"
_NOT_SCALARS = frozenset({"step", "epoch"})  # the x axis, and a counter already in status


def scalars(record: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """The record's finite numbers as ``(tag, value)``; lists of numbers by rank."""
    for key, value in record.items():
        if key in _NOT_SCALARS or isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            if math.isfinite(value):
                yield key, float(value)
        elif isinstance(value, list | tuple):
            for rank, v in enumerate(value):
                if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                    yield f"{key}/rank{rank}", float(v)


class TensorBoardLog:
    """Writes step records to ``<run_dir>/tensorboard`` (see the module docstring)."""

    def __init__(self, run_dir: Path):
        from tensorboardX import SummaryWriter

        self.log_dir = Path(run_dir) / TENSORBOARD_DIR
        self._writer = SummaryWriter(str(self.log_dir), flush_secs=5)

    def add(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        for tag, value in scalars(record):
            self._writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self._writer.close()
