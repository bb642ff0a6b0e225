"""Helpers for tests that drive a running job: wait until it reaches a step."""

from __future__ import annotations

import time


def wait_for_step(handle, step: int, timeout: float = 120) -> None:
    """Block until the job's metrics show ``step``; fail at once if the job ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        metrics = handle.metrics()
        if metrics and metrics[-1]["step"] >= step:
            return
        assert not handle.done(), handle.status().error
        time.sleep(0.05)
    raise TimeoutError(f"job did not reach step {step}")
