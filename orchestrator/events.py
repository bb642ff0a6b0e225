"""``events.jsonl``: what happened to a job's membership, one JSON object per line.

Events: ``joined``, ``died``, ``stuck``, ``node-draining``, ``drained``,
``replanned``, ``restored-from-buddy``, ``restored-from-checkpoint``,
``waiting-for-workers``.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any


class EventLog:
    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._events: list[dict[str, Any]] = []

    def emit(self, event: str, **details: Any) -> dict[str, Any]:
        record = {"time": time.time(), "event": event, **details}
        with self._lock:
            self._events.append(record)
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        return record

    def all(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._events)
