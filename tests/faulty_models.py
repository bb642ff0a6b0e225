"""Fault injection as test code: models that fail the way real ones do."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch.distributed as dist

from actors.models.gpt import GPT


class RaisingGPT(GPT):
    """Raises on rank 1 at its third forward pass (a bug in user code on one worker)."""

    FAIL_RANK = 1
    FAIL_AT_CALL = 3

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._calls = 0

    def forward(self, idx):
        self._calls += 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank == self.FAIL_RANK and self._calls == self.FAIL_AT_CALL:
            raise RuntimeError("injected fault: RaisingGPT failed on purpose")
        return super().forward(idx)


class HeldGPT(GPT):
    """Trains slowly while ``HOLD_FILE`` exists, at full speed once it is gone.

    A chaos test that must act between two membership changes (kill, wait
    for a replacement to join, kill again) holds the job back this way
    instead of betting that a run of N steps outlasts a worker's start-up on
    a loaded machine. Workers share the test's machine, hence a file.
    """

    HOLD_FILE = Path(tempfile.gettempdir()) / f"shoal-test-hold-{os.getuid()}"
    DELAY_S = 0.5

    def forward(self, idx):
        if self.HOLD_FILE.exists():
            time.sleep(self.DELAY_S)
        return super().forward(idx)
