"""Models for benchmarks that stand in for hardware this machine does not have."""

from __future__ import annotations

import os
import time

from actors.models.gpt import GPT


class AcceleratorTimeGPT(GPT):
    """A GPT whose forward pass also waits ``SHOAL_BENCH_DEVICE_MS`` ms with the CPU idle.

    On a GPU the host's cores are mostly idle while a step computes; on this
    CPU-only machine the model's own math keeps every core busy. The wait
    (``time.sleep``, which releases the CPU) gives a step that idle host
    time, so that work done in background threads (the replica exchange)
    can be seen to hide behind it. Read via the environment: Ray workers
    inherit the driver's.
    """

    def forward(self, idx):
        time.sleep(float(os.environ.get("SHOAL_BENCH_DEVICE_MS", "0")) / 1000)
        return super().forward(idx)
