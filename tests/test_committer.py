"""The checkpoint committer's hand-over, without Ray: workers are plain objects here.

A ``FakeWorker`` does what ``DataParallelRuntime.save_shard`` /
``checkpoint_done`` do (a real ``AsyncSaver`` on a real ``LocalStore``);
its ``checkpoint_done.remote(...)`` returns the outcome itself, and the
committer is given ``get=`` that returns such values as they are.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from orchestrator.checkpoint_committer import CheckpointCommitter
from storage.async_saver import AsyncSaver
from storage.checkpoint import (
    MANIFEST,
    CheckpointReader,
    Manifest,
    ShardRecord,
    read_manifest,
    step_dir,
    verify,
)
from storage.object_store import LocalStore

BOUNDS = [(0, 6), (6, 10)]


class GatedStore(LocalStore):
    """Holds shard puts (``gate_shards``) or manifest puts (``gate_manifests``) until opened."""

    def __init__(self, root, *, gate_shards: bool = False, gate_manifests: bool = False):
        super().__init__(root)
        self.gate_shards, self.gate_manifests = gate_shards, gate_manifests
        self.entered = threading.Event()
        self.opened = threading.Event()

    def put(self, key, data):
        if (self.gate_shards and "shard-" in key) or (self.gate_manifests and MANIFEST in key):
            self.entered.set()
            assert self.opened.wait(30), "the test never opened the gate"
        super().put(key, data)


class FakeWorker:
    """One rank: saves its slice with an ``AsyncSaver``; answers ``checkpoint_done`` polls."""

    def __init__(self, store: LocalStore, rank: int):
        self.rank = rank
        self.saver = AsyncSaver(store)
        self.checkpoint_done = SimpleNamespace(remote=self._checkpoint_done)

    def save(self, step: int, full: torch.Tensor, save_id: str = "") -> None:
        lo, hi = BOUNDS[self.rank]
        self.saver.save(step, self.rank, lo, hi, {"param": full[lo:hi]}, save_id=save_id)

    def _checkpoint_done(self, step: int, save_id: str | None = None) -> dict[str, Any] | None:
        result = self.saver.result(step, save_id=save_id)
        return asdict(result) if result is not None else None


def _committer(store, outcomes: list) -> CheckpointCommitter:
    def manifest_for(step: int, records: list[ShardRecord]) -> Manifest:
        return Manifest(step, len(records), "zero2", 10, [], {"step_count": step}, records)

    return CheckpointCommitter(
        store,
        manifest_for,
        keep=5,
        on_outcome=lambda step, uri, error: outcomes.append((step, uri, error)),
        poll_s=0.01,
        get=lambda values, timeout: values,
    )


def test_commits_once_every_rank_uploaded(tmp_path):
    store = LocalStore(tmp_path)
    workers = [FakeWorker(store, r) for r in range(2)]
    full = torch.randn(10)
    for w in workers:
        w.save(4, full, save_id="e1")
    outcomes: list = []
    committer = _committer(store, outcomes)
    committer.submit(4, workers, save_id="e1")
    assert committer.drain(10)
    assert outcomes == [(4, f"{store.uri}/{step_dir(4)}", None)]
    manifest = read_manifest(store, 4)
    assert [s.key for s in manifest.shards] == [
        "shard-00000.e1.safetensors",
        "shard-00001.e1.safetensors",
    ]
    assert verify(store, manifest) == []
    assert committer.close() and committer.closed


def test_abandoned_committer_never_commits_over_a_new_epochs_save(tmp_path):
    """A late manifest of the old epoch must not describe shards the new epoch writes.

    Epoch 1 saves step 4 (save id e1) but rank 1's upload hangs; the drain
    times out and the committer is closed: step 4 is reported abandoned.
    Epoch 2 falls back, redoes the steps and saves step 4 again (e2), and a
    new committer commits it. Then epoch 1's upload completes: nothing of
    it may change what is committed.
    """
    fast, slow = LocalStore(tmp_path), GatedStore(tmp_path, gate_shards=True)
    old = [FakeWorker(fast, 0), FakeWorker(slow, 1)]
    old_state = torch.randn(10)
    for w in old:
        w.save(4, old_state, save_id="e1")
    old_outcomes: list = []
    old_committer = _committer(fast, old_outcomes)
    old_committer.submit(4, old, save_id="e1")
    assert slow.entered.wait(10)
    assert not old_committer.drain(0.2)  # rank 1 still uploading
    assert old_committer.close(timeout=5)
    assert old_outcomes == [(4, None, old_outcomes[0][2])] and "abandoned" in old_outcomes[0][2]

    new = [FakeWorker(fast, r) for r in range(2)]
    new_state = torch.randn(10)
    for w in new:
        w.save(4, new_state, save_id="e2")
    new_outcomes: list = []
    new_committer = _committer(fast, new_outcomes)
    new_committer.submit(4, new, save_id="e2")
    assert new_committer.drain(10) and new_outcomes[0][1] is not None

    slow.opened.set()  # epoch 1's shard lands now; its committer polls on, if it still runs
    assert old[1].saver.wait(10)
    time.sleep(0.2)  # twenty of the old committer's poll intervals
    manifest = read_manifest(fast, 4)
    assert {s.save_id for s in manifest.shards} == {"e2"}
    assert verify(fast, manifest) == []  # epoch 1's objects have keys of their own
    assert torch.equal(CheckpointReader(fast, manifest).read("param", 0, 10), new_state)
    assert len(old_outcomes) == 1  # reported once, by close()
    keys = {o.key.rsplit("/", 1)[1] for o in fast.list(step_dir(4) + "/")}
    assert {"shard-00001.e1.safetensors", "shard-00001.e2.safetensors"} <= keys


def test_close_waits_for_a_manifest_write_under_way(tmp_path):
    store = GatedStore(tmp_path, gate_manifests=True)
    workers = [FakeWorker(store, r) for r in range(2)]
    for w in workers:
        w.save(2, torch.randn(10))
    outcomes: list = []
    committer = _committer(store, outcomes)
    committer.submit(2, workers)
    assert store.entered.wait(10)  # the manifest is being written
    assert not committer.close(timeout=0.1)  # so close cannot promise anything yet
    assert not committer.closed
    threading.Timer(0.2, store.opened.set).start()
    assert committer.close(timeout=10)
    # The write under way finished and was reported as committed, not abandoned.
    assert outcomes == [(2, f"{store.uri}/{step_dir(2)}", None)]
    assert read_manifest(store, 2).step == 2


def test_a_record_of_another_save_fails_the_step(tmp_path):
    store = LocalStore(tmp_path)
    workers = [FakeWorker(store, r) for r in range(2)]
    full = torch.randn(10)
    workers[0].save(6, full, save_id="e2")
    workers[1].save(6, full, save_id="e1")  # a result left over from another attempt
    assert workers[1].saver.wait(10)
    # A worker that does not filter by save id hands it out anyway.
    workers[1].checkpoint_done = SimpleNamespace(
        remote=lambda step, save_id=None: asdict(workers[1].saver.result(step))
    )
    outcomes: list = []
    committer = _committer(store, outcomes)
    committer.submit(6, workers, save_id="e2")
    assert committer.drain(10)
    [(step, uri, error)] = outcomes
    assert step == 6 and uri is None and "belongs to save 'e1', not 'e2'" in error
    assert not store.exists(f"{step_dir(6)}/{MANIFEST}")


def test_failed_upload_and_submit_after_close(tmp_path):
    store = LocalStore(tmp_path)
    workers = [FakeWorker(store, r) for r in range(2)]
    workers[1].checkpoint_done = SimpleNamespace(
        remote=lambda step, save_id=None: {"ok": False, "error": "StoreError: injected"}
    )
    workers[0].save(8, torch.randn(10))
    outcomes: list = []
    committer = _committer(store, outcomes)
    committer.submit(8, workers)
    assert committer.drain(10)
    assert outcomes == [
        (8, None, "upload of rank 1's shard failed after retries: StoreError: injected")
    ]
    assert committer.close() and committer.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        committer.submit(9, workers)
