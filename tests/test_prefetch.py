"""The batch read ahead (actors/prefetch.py): same batches, one thread at a time, errors kept."""

from __future__ import annotations

import threading
import time

import pytest

from actors.prefetch import BatchPrefetcher
from orchestrator.report import data_wait_share


class Source:
    """A pure batch function that records its calls and fails if entered twice at once."""

    def __init__(self, delay: float = 0.0, fail: set[tuple[int, int, int]] | None = None):
        self.calls: list[tuple[int, int, int]] = []
        self.threads: set[str] = set()
        self._inside = threading.Lock()
        self.delay, self.fail = delay, fail or set()

    def __call__(self, step: int, lo: int, hi: int) -> list[int]:
        if not self._inside.acquire(blocking=False):
            raise AssertionError("the dataset was called from two threads at once")
        try:
            self.calls.append((step, lo, hi))
            self.threads.add(threading.current_thread().name)
            time.sleep(self.delay)
            if (step, lo, hi) in self.fail:
                raise ValueError(f"bad rows at step {step}")
            return [step * 1000 + i for i in range(lo, hi)]
        finally:
            self._inside.release()


def test_consecutive_steps_are_served_from_the_read_ahead():
    source = Source()
    p = BatchPrefetcher(source)
    try:
        for step in range(4):
            batch, waited = p.get(step, 2, 5)
            assert batch == [step * 1000 + i for i in (2, 3, 4)]
            assert waited >= 0
        p.wait()
        # Step 0 in the call, steps 1..4 ahead (4: read for a step nobody asked for yet).
        assert source.calls == [(s, 2, 5) for s in range(5)]
        assert any(name.startswith("prefetch") for name in source.threads)
    finally:
        p.close()


def test_a_missed_guess_reads_the_asked_rows_and_never_overlaps_the_read_in_flight():
    source = Source(delay=0.05)
    p = BatchPrefetcher(source)
    try:
        p.get(3, 0, 4)  # reads (4, 0, 4) ahead, slowly
        batch, _ = p.get(3, 1, 2)  # a recovery went back and the rows moved: a miss
        assert batch == [3001]
        assert source.calls == [(3, 0, 4), (4, 0, 4), (3, 1, 2)]
        batch, _ = p.get(4, 1, 2)
        assert batch == [4001]
        assert source.calls[-1] == (4, 1, 2) and source.calls.count((4, 1, 2)) == 1
    finally:
        p.close()


def test_the_wait_is_the_time_the_step_spent_blocked():
    source = Source(delay=0.2)
    p = BatchPrefetcher(source)
    try:
        _, first = p.get(0, 0, 1)
        assert first >= 0.2  # nothing read ahead yet
        time.sleep(0.3)  # the step's compute, longer than the read ahead
        _, second = p.get(1, 0, 1)
        assert second < 0.1
    finally:
        p.close()


def test_an_error_reading_the_asked_rows_reaches_the_step_one_of_a_wasted_guess_does_not():
    source = Source(fail={(1, 0, 2), (6, 0, 2)})
    p = BatchPrefetcher(source)
    try:
        p.get(0, 0, 2)  # reads step 1 ahead: it fails, and step 1 is what comes next
        with pytest.raises(ValueError, match="bad rows at step 1"):
            p.get(1, 0, 2)
        p.get(5, 0, 2)  # reads step 6 ahead: it fails, but the job went elsewhere
        batch, _ = p.get(9, 0, 2)
        assert batch == [9000, 9001]
    finally:
        p.close()


def test_disabled_reads_in_the_call_only():
    source = Source()
    p = BatchPrefetcher(source, enabled=False)
    for step in range(3):
        assert p.get(step, 0, 1)[0] == [step * 1000]
    p.close()
    assert source.calls == [(0, 0, 1), (1, 0, 1), (2, 0, 1)]
    assert source.threads == {threading.current_thread().name}


def test_wait_keeps_the_read_ahead_and_close_ends_the_thread():
    source = Source(delay=0.05)
    p = BatchPrefetcher(source)
    p.get(0, 0, 1)
    p.wait()
    assert source.calls == [(0, 0, 1), (1, 0, 1)]  # finished, and kept:
    p.get(1, 0, 1)
    assert source.calls.count((1, 0, 1)) == 1
    p.close()
    assert not any(t.name.startswith("prefetch") for t in threading.enumerate())


def test_the_data_wait_share_is_the_most_waiting_rank_over_step_time_after_warm_up():
    records = [
        {"step": 0, "step_time_s": 5.0, "data_wait_s": [4.0, 4.0]},  # warm-up: not counted
        {"step": 1, "step_time_s": 5.0, "data_wait_s": [4.0, 4.0]},
        {"step": 2, "step_time_s": 1.0, "data_wait_s": [0.01, 0.03]},
        {"step": 3, "step_time_s": 1.0, "data_wait_s": [0.05, 0.0]},
    ]
    assert data_wait_share(records) == pytest.approx((0.03 + 0.05) / 2.0)
    assert data_wait_share(records[:2]) is None
    assert data_wait_share([{"step": 5, "step_time_s": 1.0}] * 4) is None
