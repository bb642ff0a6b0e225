"""A test-only runtime for a standing role: it holds a slot and says which.

Hosted by ``actors.member.MemberActor`` like any runtime; the standing-role
tests spawn, seat, kill and replace members running it on a real Ray.
"""

from __future__ import annotations

import os
from typing import Any

import ray


class SlotRuntime:
    CONTROL_METHODS = ()

    def __init__(self, spec: Any, worker_id: int, tokens: Any):
        self.worker_id = worker_id
        self.label: str | None = None

    def probe(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "available_memory": 0,
        }

    def setup(self, rdzv: None, label: str) -> dict[str, Any]:
        assert rdzv is None, "a standing member joins no process group"
        self.label = label
        return {"label": label, "pid": os.getpid()}
