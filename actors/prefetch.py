"""Read the next step's batch while this one trains.

A batch is a pure function of ``(step, lo, hi)`` (the job's seed and sizes
fixed), so a worker may build step ``s + 1``'s rows on a background thread
while step ``s`` computes, and use them if the next call asks for exactly
that key. A guess that misses (the controller moved this rank's rows, an
epoch ended, a recovery went back) costs only the wasted read: the batch is
then built in the call, as without prefetching. The dataset is never called
from two threads at once: a miss first waits for the read in flight.

``wait_s`` of each ``get`` is the time the step spent waiting for its input,
read ahead or not: the input pipeline's share of step time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

Key = tuple[int, int, int]  # (step, lo, hi)


class BatchPrefetcher:
    """One batch read ahead, on one thread (see the module docstring)."""

    def __init__(self, read: Callable[[int, int, int], Any], enabled: bool = True):
        self._read = read
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch") if enabled else None
        self._ahead: tuple[Key, Future] | None = None

    def get(self, step: int, lo: int, hi: int) -> tuple[Any, float]:
        """Rows ``[lo, hi)`` of step ``step``'s batch and the seconds spent waiting for them;
        then starts reading ``(step + 1, lo, hi)``."""
        start = time.perf_counter()
        key = (step, lo, hi)
        batch = None
        if self._ahead is not None:
            ahead_key, future = self._ahead
            self._ahead = None
            try:
                ahead = future.result()
            except Exception:  # noqa: BLE001 - a failed read ahead is read again below
                ahead = None
                if ahead_key == key:
                    raise
            if ahead_key == key:
                batch = ahead
        if batch is None:
            batch = self._read(*key)
        waited = time.perf_counter() - start
        if self._pool is not None:
            nxt = (step + 1, lo, hi)
            self._ahead = (nxt, self._pool.submit(self._read, *nxt))
        return batch, waited

    def wait(self) -> None:
        """Let the read ahead finish (it is kept), so the caller may use the dataset."""
        if self._ahead is not None:
            self._ahead[1].exception()

    def discard(self) -> None:
        """Forget the read ahead (waits for it: the dataset stays single-threaded)."""
        if self._ahead is not None:
            _, future = self._ahead
            self._ahead = None
            future.exception()  # waits; an error of a guess nobody needs is dropped

    def close(self) -> None:
        self.discard()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
