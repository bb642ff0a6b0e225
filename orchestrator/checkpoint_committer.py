"""The controller's checkpoint committer: manifests written once every upload succeeded."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import ray

from storage.checkpoint import Manifest, ShardRecord, commit, step_dir
from storage.object_store import ObjectStore


class CheckpointCommitter:
    """Writes checkpoint manifests, in step order, once every worker's upload has succeeded.

    A thread of the controller. For each submitted step it polls the workers'
    ``checkpoint_done(step)`` (a non-blocking call that runs between their
    training steps) every ``poll_s`` seconds until every rank has an outcome,
    then commits the manifest (and applies retention) if all succeeded, and
    reports through ``on_outcome(step, uri, error)``: ``uri`` when committed,
    ``error`` when any upload or the commit failed. Steps are handled one at a
    time, oldest first, so a prune never runs while an older manifest is being
    written. ``preexisting``: steps that had a directory under the root
    before this run's first checkpoint. A worker that dies fails the step it was uploading (the job
    itself fails through the training loop).
    """

    FINAL_TIMEOUT_S = 600.0  # how long the run's last checkpoint may take to upload

    def __init__(
        self,
        store: ObjectStore,
        manifest_for: Callable[[int, list[ShardRecord]], Manifest],
        *,
        keep: int,
        on_outcome: Callable[[int, str | None, str | None], None],
        preexisting: set[int] | None = None,
        poll_s: float = 0.2,
        call_timeout_s: float = 300.0,
    ):
        # Steps with a directory under the root before this run saved anything.
        self.preexisting = set(preexisting or ())
        self.store = store
        self.manifest_for = manifest_for
        self.keep = keep
        self.on_outcome = on_outcome
        self.poll_s = poll_s
        self.call_timeout_s = call_timeout_s
        self._queue: deque[tuple[int, list[Any]]] = deque()
        self._cond = threading.Condition()
        self._busy = False
        self._thread = threading.Thread(target=self._loop, name="shoal-committer", daemon=True)
        self._thread.start()

    def submit(self, step: int, workers: list[Any]) -> None:
        """Commit ``step`` once each of ``workers`` (the ranks that saved it) uploaded its shard."""
        with self._cond:
            self._queue.append((step, workers))
            self._cond.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait until every submitted step has an outcome; False if ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                step, workers = self._queue.popleft()
                self._busy = True
            try:
                uri, error = self._finish(step, workers)
                self.on_outcome(step, uri, error)
            except Exception as e:  # noqa: BLE001 - the committer must outlive any one step
                self.on_outcome(step, None, f"{type(e).__name__}: {e}")
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _finish(self, step: int, workers: list[Any]) -> tuple[str | None, str | None]:
        outcomes: dict[int, dict[str, Any]] = {}
        while len(outcomes) < len(workers):
            missing = [r for r in range(len(workers)) if r not in outcomes]
            got = ray.get(
                [workers[r].checkpoint_done.remote(step) for r in missing],
                timeout=self.call_timeout_s,
            )
            for rank, outcome in zip(missing, got, strict=True):
                if outcome is not None:
                    outcomes[rank] = outcome
            if len(outcomes) < len(workers):
                time.sleep(self.poll_s)
        failed = [(r, o["error"]) for r, o in sorted(outcomes.items()) if not o["ok"]]
        if failed:
            rank, error = failed[0]
            return None, f"upload of rank {rank}'s shard failed after retries: {error}"
        records = [ShardRecord.from_dict(outcomes[r]["record"]) for r in range(len(workers))]
        commit(self.store, self.manifest_for(step, records), keep=self.keep)
        return f"{self.store.uri}/{step_dir(step)}", None
