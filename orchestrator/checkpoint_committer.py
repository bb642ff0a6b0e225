"""The controller's checkpoint committer: manifests written once every upload succeeded."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import ray

from storage.checkpoint import Manifest, ShardRecord, commit, step_dir
from storage.object_store import ObjectStore

# "Commit step ``step`` once each of ``workers`` uploaded its shard of save ``save_id``."
_Request = tuple[int, list[Any], str | None]


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

    Hand-over at a membership change: :meth:`drain` lets in-flight steps
    finish, then :meth:`close` guarantees this committer writes nothing more,
    even if its thread is still waiting for a worker; the steps it had not
    committed are reported failed. Only then may a new committer start: an
    old manifest can never describe shards that the new epoch is writing.

    ``get``: how the polls' results are fetched (``ray.get``; tests pass a
    plain function and workers whose ``checkpoint_done.remote`` returns values).
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
        get: Callable[..., list[Any]] = ray.get,
    ):
        # Steps with a directory under the root before this run saved anything.
        self.preexisting = set(preexisting or ())
        self.store = store
        self.manifest_for = manifest_for
        self.keep = keep
        self.on_outcome = on_outcome
        self.poll_s = poll_s
        self.call_timeout_s = call_timeout_s
        self._get = get
        self._queue: deque[_Request] = deque()
        # Guards the queue, ``_busy``, ``_unreported`` and ``_closed``; held briefly.
        self._cond = threading.Condition()
        # Held while a manifest is written and its outcome reported, and by
        # close(): what makes "nothing is committed after close()" hold.
        self._commit_lock = threading.Lock()
        self._busy = False
        self._closed = False
        self._unreported: set[int] = set()  # submitted steps without an outcome yet
        self._thread = threading.Thread(target=self._loop, name="shoal-committer", daemon=True)
        self._thread.start()

    def submit(self, step: int, workers: list[Any], *, save_id: str | None = None) -> None:
        """Commit ``step`` once each of ``workers`` (the ranks that saved it) uploaded its shard.

        ``save_id``: the id the workers were given for this save; the
        committer then asks each worker for that save's outcome
        (``checkpoint_done(step, save_id)``) and fails the step if a record
        belongs to another save. ``RuntimeError`` after :meth:`close`.
        """
        with self._cond:
            if self._closed:
                raise RuntimeError(f"checkpoint committer is closed; step {step} not submitted")
            self._queue.append((step, workers, save_id))
            self._unreported.add(step)
            self._cond.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait until every submitted step has an outcome; False if ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._queue or self._busy) and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float = 60.0) -> bool:
        """Stop for good: after this returns True, no manifest is written and nothing reported.

        Steps submitted but not yet committed are reported failed
        ("abandoned") before this returns. Waits only for a manifest write
        already under way (bounded by the store's own timeouts), not for
        uploads; False if that write outlasted ``timeout`` seconds -- it may
        then still land, and the committer is not closed. Idempotent.
        """
        if not self._commit_lock.acquire(timeout=timeout):
            return False
        try:
            with self._cond:
                if self._closed:
                    return True
                self._closed = True
                abandoned = sorted(self._unreported)
                self._unreported.clear()
                self._queue.clear()
                self._cond.notify_all()
            for step in abandoned:
                self.on_outcome(
                    step,
                    None,
                    "abandoned at a membership change before every upload had finished",
                )
        finally:
            self._commit_lock.release()
        return True

    @property
    def closed(self) -> bool:
        return self._closed

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                step, workers, save_id = self._queue.popleft()
                self._busy = True
            try:
                self._handle(step, workers, save_id)
            except Exception:  # noqa: BLE001 - on_outcome failed; the committer must go on
                logging.getLogger("shoal.checkpoint").exception(
                    "reporting checkpoint %d's outcome failed", step
                )
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _handle(self, step: int, workers: list[Any], save_id: str | None) -> None:
        try:
            records, error = self._collect(step, workers, save_id)
        except Exception as e:  # noqa: BLE001 - the committer must outlive any one step
            records, error = None, f"{type(e).__name__}: {e}"
        with self._commit_lock:
            if self._closed:  # close() has reported this step: write and say nothing
                return
            uri = None
            if records is not None:
                try:
                    commit(self.store, self.manifest_for(step, records), keep=self.keep)
                    uri = f"{self.store.uri}/{step_dir(step)}"
                except Exception as e:  # noqa: BLE001 - reported, like a failed upload
                    error = f"{type(e).__name__}: {e}"
            with self._cond:
                self._unreported.discard(step)
            self.on_outcome(step, uri, None if uri else error)

    def _collect(
        self, step: int, workers: list[Any], save_id: str | None
    ) -> tuple[list[ShardRecord] | None, str | None]:
        """All ranks' records once uploaded, else ``(None, error)``; ``(None, None)``: closed."""
        args = (step,) if save_id is None else (step, save_id)
        outcomes: dict[int, dict[str, Any]] = {}
        while len(outcomes) < len(workers):
            if self._closed:
                return None, None
            missing = [r for r in range(len(workers)) if r not in outcomes]
            got = self._get(
                [workers[r].checkpoint_done.remote(*args) for r in missing],
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
        if save_id is not None:
            for rank, rec in enumerate(records):
                if rec.save_id != save_id:
                    return None, (
                        f"rank {rank}'s shard {rec.key} belongs to save {rec.save_id!r}, "
                        f"not {save_id!r}"
                    )
        return records, None
