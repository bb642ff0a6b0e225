"""``DataParallelWorker``: the Ray actor around one data-parallel rank.

The actor adds nothing but placement: resources are set by the controller
with ``.options(num_cpus=..., num_gpus=...)``. Ray does not restart it on
failure (``max_restarts=0``): replacing a dead rank is the controller's
decision, not Ray's.
"""

from __future__ import annotations

import ray

from actors.dp_runtime import DataParallelRuntime


@ray.remote(max_restarts=0, max_task_retries=0)
class DataParallelWorker(DataParallelRuntime):
    pass
