"""Per-worker batch shares for the global batch: equal, or following measured throughput."""

from __future__ import annotations

from typing import Any

from orchestrator.shard_plan import batch_shares, weights_from_throughput


class BatchBalancer:
    """Per-worker batch shares: equal, or proportional to measured throughput.

    With ``auto``, each window of ``every`` steps measures every rank's
    samples per second of compute (forward + backward, which excludes time
    spent waiting for slower peers) and re-plans the shares for the next
    window. Only how the global batch is split changes, never its content.
    """

    def __init__(self, global_batch: int, workers: int, auto: bool, every: int):
        self.global_batch = global_batch
        self.auto = auto
        self.every = every
        self.shares = batch_shares(global_batch, [1.0] * workers)
        self._samples = [0] * workers
        self._seconds = [0.0] * workers
        self._steps = 0

    def bounds(self) -> list[tuple[int, int]]:
        starts = [sum(self.shares[:r]) for r in range(len(self.shares))]
        return [(lo, lo + n) for lo, n in zip(starts, self.shares, strict=True)]

    def observe(self, results: list[Any]) -> None:
        if not self.auto:
            return
        for r in results:
            self._samples[r.rank] += r.n_tokens
            self._seconds[r.rank] += max(r.compute_s, 1e-9)
        self._steps += 1
        if self._steps % self.every == 0:
            rates = [n / s for n, s in zip(self._samples, self._seconds, strict=True)]
            self.shares = batch_shares(self.global_batch, weights_from_throughput(rates))
            self._samples = [0] * len(rates)
            self._seconds = [0.0] * len(rates)
