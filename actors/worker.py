"""``DataParallelWorker``: the Ray actor around one data-parallel rank.

The actor adds placement and one thing more: a second, "control" thread.
Training calls (steps, checkpoints, epoch changes) run one at a time, in
order, on the default thread. What the controller asks during a recovery —
which copies of state the worker holds, and the copies themselves — runs on
the control thread, so it is answered even when a step is stuck in a
collective whose peers have gone.

Ray does not restart the actor on failure (``max_restarts=0``): replacing a
dead rank is the controller's decision, not Ray's.
"""

from __future__ import annotations

from typing import Any

import ray
import torch

from actors.dp_runtime import DataParallelRuntime


@ray.remote(max_restarts=0, max_task_retries=0, concurrency_groups={"control": 1})
class DataParallelWorker(DataParallelRuntime):
    @ray.method(concurrency_group="control")
    def holdings(self) -> list[dict[str, Any]]:
        return super().holdings()

    @ray.method(concurrency_group="control")
    def export_piece(self, kind: str, owner: int, done: int) -> dict[str, torch.Tensor]:
        return super().export_piece(kind, owner, done)
