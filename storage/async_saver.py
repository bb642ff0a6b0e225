"""Background upload of one worker's checkpoint shards.

A save has two halves. :meth:`AsyncSaver.save` is the half that blocks
training: it copies the rank's shard into a host buffer (one memcpy,
:func:`storage.checkpoint.snapshot_shard`) and returns. A background thread
does the rest: hashing, the upload (:func:`storage.checkpoint.upload_shard`)
and its retries. The controller collects the outcome later with
:meth:`AsyncSaver.result` and writes the manifest only when every rank's
upload succeeded.

Policy when a checkpoint is requested while the previous upload is still
running: **wait** for it. At most one snapshot per worker is ever in host
memory, and no checkpoint is silently skipped while the store works. One
exception keeps an unreachable store from stalling training: the wait is for
the previous upload's *current attempt* only. If that attempt fails (or the
upload is already backing off after a failed one), the previous checkpoint
is abandoned -- reported as failed, "superseded" -- and the new, newer
snapshot takes its place. So a new request blocks for at most the remainder
of one upload attempt.

Failure semantics: a failed attempt is retried with exponential backoff
and full jitter for up to ``patience_s`` seconds (by default a minute: long
enough to ride out a restarting store or a network blip, short enough that
the run's final checkpoint reports failure in reasonable time); after that
the upload is reported as failed, with the last error. Training is never
interrupted by a store error. A put is
atomic, so a failed or killed upload leaves no partial object, only a
directory without a manifest, which readers ignore and
:func:`storage.checkpoint.prune` removes later.

Save ids: a caller that may save the same step twice (a new epoch redoing
steps after falling back to an older checkpoint, while an abandoned
committer of the old epoch may still write a manifest) passes a ``save_id``
unique to the attempt. It goes into the shard's key, its ``ShardRecord``
and its ``UploadResult``, so each attempt writes its own objects and a
manifest names only objects written for it; ``result`` hands out the
outcome of the attempt asked for.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from storage.checkpoint import (
    DEFAULT_SPACE,
    ShardRecord,
    ShardSnapshot,
    snapshot_shard,
    upload_shard,
)
from storage.object_store import ObjectStore, StoreError


@dataclass(frozen=True)
class SaveTicket:
    """What :meth:`AsyncSaver.save` cost the caller, in seconds, and what it snapshotted."""

    step: int
    blocked_s: float  # total time the caller was blocked
    wait_s: float  # of which: waiting for the previous upload (the policy)
    copy_s: float  # of which: copying the shard to host memory
    nbytes: int


@dataclass(frozen=True)
class UploadResult:
    """The outcome of one background upload."""

    step: int
    ok: bool
    record: ShardRecord | None  # set when ok
    error: str | None  # set when not ok
    attempts: int
    upload_s: float  # from the start of the first attempt to the outcome
    nbytes: int
    space: str = DEFAULT_SPACE
    save_id: str = ""


class AsyncSaver:
    """Uploads one worker's shards in the background, one upload at a time.

    Thread-safe: ``save`` is meant to be called from the training thread,
    ``result`` / ``wait`` from anywhere.

    Args:
        store: where shards go.
        patience_s: how long to keep retrying a failing upload, seconds
            (measured from the first attempt; an attempt in progress finishes).
        base_delay: bound of the first backoff, seconds; doubles per retry.
        max_delay: cap of one backoff, seconds.
        chunk_bytes: checksum chunk size recorded in the manifest (None: automatic).
        upload: the upload function (tests inject faults through it).
    """

    def __init__(
        self,
        store: ObjectStore,
        *,
        patience_s: float = 60.0,
        base_delay: float = 0.5,
        max_delay: float = 8.0,
        chunk_bytes: int | None = None,
        upload: Callable[..., ShardRecord] = upload_shard,
    ):
        if patience_s < 0:
            raise ValueError(f"patience_s must be >= 0, got {patience_s}")
        self.store = store
        self.patience_s = patience_s
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.chunk_bytes = chunk_bytes
        self._upload = upload
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._superseded = threading.Event()
        self._results: dict[tuple[int, str, str], UploadResult] = {}  # (step, space, save_id)
        self._buffer: torch.Tensor | None = None  # reused between snapshots

    def save(
        self,
        step: int,
        rank: int,
        lo: int,
        hi: int,
        tensors: dict[str, torch.Tensor],
        rng_state: torch.Tensor | None = None,
        *,
        space: str = DEFAULT_SPACE,
        save_id: str = "",
    ) -> SaveTicket:
        """Snapshot the shard and start uploading it; returns once the snapshot is taken.

        Blocks first for the previous upload, per the module's policy. The
        tensors may change as soon as this returns. ``space``: the state
        space the range belongs to; ``save_id``: this save attempt's id, at
        most 32 letters and digits, put in the shard's key ("": the key of
        saves without one, ``shard-<rank>.safetensors`` for ``dp``).
        """
        start = time.perf_counter()
        self._finish_previous()
        waited = time.perf_counter()
        snapshot = snapshot_shard(
            rank, lo, hi, tensors, rng_state, out=self._buffer, space=space, save_id=save_id
        )
        self._buffer = snapshot.buffer
        copied = time.perf_counter()
        self._superseded.clear()
        self._thread = threading.Thread(
            target=self._run, args=(step, snapshot), name=f"shoal-upload-{step}", daemon=True
        )
        self._thread.start()
        return SaveTicket(
            step=step,
            blocked_s=copied - start,
            wait_s=waited - start,
            copy_s=copied - waited,
            nbytes=snapshot.nbytes,
        )

    def _finish_previous(self) -> None:
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        # Let the current attempt finish, but no further retries: if it fails,
        # the store is in trouble and the new snapshot is newer. Giving the old
        # one up beats stalling training for the whole retry window.
        self._superseded.set()
        thread.join()

    def _run(self, step: int, snapshot: ShardSnapshot) -> None:
        start = time.perf_counter()
        deadline = start + self.patience_s
        attempt = 0
        while True:
            attempt += 1
            try:
                record = self._upload(self.store, step, snapshot, self.chunk_bytes)
            except (StoreError, OSError) as e:
                error = f"{type(e).__name__}: {e}"
            else:
                self._publish(
                    UploadResult(step, True, record, None, attempt, 0.0, 0), snapshot, start
                )
                return
            bound = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
            delay = random.uniform(0.0, bound)
            if time.perf_counter() + delay > deadline:
                error = f"gave up after {attempt} attempt(s) in {self.patience_s:g}s: {error}"
                break
            if self._superseded.is_set() or self._superseded.wait(delay):
                error = (
                    f"superseded by a newer checkpoint after {attempt} failed attempt(s): {error}"
                )
                break
        self._publish(UploadResult(step, False, None, error, attempt, 0.0, 0), snapshot, start)

    def _publish(self, result: UploadResult, snapshot: ShardSnapshot, start: float) -> None:
        final = UploadResult(
            result.step,
            result.ok,
            result.record,
            result.error,
            result.attempts,
            time.perf_counter() - start,
            snapshot.nbytes,
            snapshot.space,
            snapshot.save_id,
        )
        with self._lock:
            self._results[(result.step, snapshot.space, snapshot.save_id)] = final

    def result(
        self, step: int, *, space: str | None = None, save_id: str | None = None
    ) -> UploadResult | None:
        """The outcome of ``step``'s upload if it has finished (then forgotten), else None.

        ``space`` / ``save_id``: only the outcome of that space / save
        attempt (None: any). Never blocks.
        """
        with self._lock:
            for key in sorted(self._results):
                s, sp, sid = key
                if s == step and space in (None, sp) and save_id in (None, sid):
                    return self._results.pop(key)
        return None

    def busy(self) -> bool:
        """Whether an upload is in flight."""
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the in-flight upload, if any; False if ``timeout`` passed first."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True
