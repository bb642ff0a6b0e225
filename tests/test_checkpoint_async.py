"""Asynchronous shard saving, ranged verified reads and failure handling, in one process.

Faults are test code: ``Faulty...`` stores wrap the real ``LocalStore`` and
block, fail or break the way a real store does.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from safetensors.torch import load as st_load

from storage.async_saver import AsyncSaver
from storage.checkpoint import (
    RNG_KEY,
    CheckpointReader,
    CorruptCheckpointError,
    Manifest,
    all_step_dirs,
    check_objects,
    commit,
    committed_steps,
    latest_manifest,
    snapshot_shard,
    step_dir,
    verify,
)
from storage.object_store import LocalStore, StoreError
from tests.checkpoint_helpers import write_shard


class BlockingStore(LocalStore):
    """Holds every ``put`` of a shard until ``release`` is set."""

    def __init__(self, root):
        super().__init__(root)
        self.entered = threading.Event()
        self.release = threading.Event()

    def put(self, key, data):
        if "shard-" in key:
            self.entered.set()
            assert self.release.wait(30), "test never released the upload"
        super().put(key, data)


class FlakyStore(LocalStore):
    """Fails the first ``failures`` shard puts with a ``StoreError``, like an unreachable S3."""

    def __init__(self, root, failures: int):
        super().__init__(root)
        self.failures = failures
        self.puts = 0

    def put(self, key, data):
        if "shard-" in key:
            self.puts += 1
            if self.puts <= self.failures:
                raise StoreError("cannot reach S3 endpoint http://127.0.0.1:1 (injected)")
        super().put(key, data)


class UndeletableStore(LocalStore):
    """Deletes fail: retention cannot run."""

    def delete(self, key):
        raise StoreError("access denied (injected)")

    def delete_prefix(self, prefix):
        raise StoreError("access denied (injected)")


def _manifest(step: int, records, numel: int) -> Manifest:
    return Manifest(
        step=step,
        world_size=len(records),
        strategy="zero2",
        numel=numel,
        layout=[],
        optimizer={"step_count": step},
        shards=list(records),
    )


def _save(store, step, full, bounds, keep=5, chunk_bytes=None) -> Manifest:
    records = [
        write_shard(
            store, step, r, lo, hi, {k: v[lo:hi] for k, v in full.items()}, chunk_bytes=chunk_bytes
        )
        for r, (lo, hi) in enumerate(bounds)
    ]
    manifest = _manifest(step, records, bounds[-1][1])
    commit(store, manifest, keep=keep)
    return manifest


def test_snapshot_is_plain_safetensors_and_independent_of_training():
    param, exp_avg = torch.randn(100), torch.randn(100)
    rng = torch.get_rng_state()
    snap = snapshot_shard(1, 200, 300, {"param": param, "exp_avg": exp_avg}, rng)
    expected = {"param": param.clone(), "exp_avg": exp_avg.clone()}
    param.add_(1.0)  # training goes on after the snapshot
    loaded = st_load(bytes(snap.view()))
    assert torch.equal(loaded["param"], expected["param"])
    assert torch.equal(loaded["exp_avg"], expected["exp_avg"])
    assert torch.equal(loaded[RNG_KEY], rng)
    # Reusing the buffer (as AsyncSaver does) gives the same bytes for the same state.
    again = snapshot_shard(1, 200, 300, expected, rng, out=snap.buffer)
    assert again.buffer is snap.buffer and st_load(bytes(again.view()))["param"].equal(
        expected["param"]
    )


def test_save_returns_before_upload_and_result_arrives_later(tmp_path):
    store = BlockingStore(tmp_path)
    saver = AsyncSaver(store)
    live = {"param": torch.randn(1000), "exp_avg": torch.randn(1000)}
    saved = {k: v.clone() for k, v in live.items()}
    ticket = saver.save(3, 0, 0, 1000, live)
    assert store.entered.wait(10)
    assert saver.busy() and saver.result(3) is None  # still uploading: no outcome yet
    live["param"].zero_()  # training mutates the live state during the upload
    store.release.set()
    assert saver.wait(10)
    result = saver.result(3)
    assert result.ok and result.attempts == 1 and ticket.blocked_s < 5
    assert saver.result(3) is None  # handed out once
    manifest = _manifest(3, [result.record], 1000)
    commit(store, manifest, keep=1)
    reader = CheckpointReader(store, latest_manifest(store))
    assert torch.equal(reader.read("param", 0, 1000), saved["param"])


def test_policy_new_request_waits_for_running_upload(tmp_path):
    store = BlockingStore(tmp_path)
    saver = AsyncSaver(store)
    saver.save(1, 0, 0, 10, {"param": torch.randn(10)})
    assert store.entered.wait(10)
    second: list = []
    t = threading.Thread(
        target=lambda: second.append(saver.save(2, 0, 0, 10, {"param": torch.randn(10)}))
    )
    t.start()
    time.sleep(0.3)
    assert not second, "the second save must wait for the upload in flight"
    store.release.set()
    t.join(10)
    assert second and second[0].wait_s >= 0.25
    assert saver.wait(10)
    assert saver.result(1).ok and saver.result(2).ok


def test_failed_upload_is_retried_with_backoff(tmp_path):
    store = FlakyStore(tmp_path, failures=2)
    saver = AsyncSaver(store, base_delay=0.01)
    saver.save(5, 0, 0, 10, {"param": torch.randn(10)})
    assert saver.wait(10)
    result = saver.result(5)
    assert result.ok and result.attempts == 3


def test_upload_gives_up_after_patience_and_reports_error(tmp_path):
    saver = AsyncSaver(FlakyStore(tmp_path, failures=10**6), patience_s=0.3, base_delay=0.05)
    saver.save(5, 0, 0, 10, {"param": torch.randn(10)})
    assert saver.wait(10)
    result = saver.result(5)
    assert not result.ok and result.attempts >= 2
    assert "gave up" in result.error and "cannot reach S3" in result.error


def test_backing_off_upload_is_superseded_not_waited_for(tmp_path):
    store = FlakyStore(tmp_path, failures=1)
    saver = AsyncSaver(store, base_delay=30.0, max_delay=30.0)
    saver.save(2, 0, 0, 10, {"param": torch.randn(10)})
    deadline = time.time() + 10
    while store.puts < 1 and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # now in a (long) backoff after the failed attempt
    ticket = saver.save(4, 0, 0, 10, {"param": torch.randn(10)})
    assert ticket.blocked_s < 5, "an upload in backoff must not stall training"
    first = saver.result(2)
    assert not first.ok and "superseded" in first.error
    assert saver.wait(10) and saver.result(4).ok


def test_ranged_reads_fetch_only_needed_chunks_and_verify_them(tmp_path):
    store = LocalStore(tmp_path)
    n = 3000
    full = {"param": torch.randn(n), "exp_avg": torch.randn(n)}
    bounds = [(0, 1000), (1000, 2200), (2200, 3000)]  # uneven shards
    _save(store, 7, full, bounds, chunk_bytes=256)
    manifest = latest_manifest(store)
    reader = CheckpointReader(store, manifest)
    assert torch.equal(reader.read("param", 950, 1010), full["param"][950:1010])
    # 60 floats across two shards: at most two 256-byte chunks from each.
    assert reader.bytes_read <= 4 * 256 < manifest.nbytes // 10
    for lo, hi in [(0, n), (1, 2), (999, 2201), (2999, 3000)]:
        assert torch.equal(reader.read("exp_avg", lo, hi), full["exp_avg"][lo:hi])


def test_corrupt_chunk_is_named_and_untouched_ranges_still_read(tmp_path):
    store = LocalStore(tmp_path)
    full = {"param": torch.randn(2000)}
    _save(store, 3, full, [(0, 1000), (1000, 2000)], chunk_bytes=400)
    manifest = latest_manifest(store)
    rec = manifest.shards[1]
    path = tmp_path / step_dir(3) / rec.key
    data = bytearray(path.read_bytes())
    data[rec.tensors["param"].begin + 900] ^= 0xFF  # float 225 of shard 1: chunk 2
    path.write_bytes(bytes(data))
    reader = CheckpointReader(store, manifest)
    assert torch.equal(reader.read("param", 1000, 1200), full["param"][1000:1200])  # chunks 0-1
    with pytest.raises(CorruptCheckpointError, match=r"shard-00001.*'param' chunk 2"):
        reader.read("param", 1200, 1300)
    problems = verify(store, manifest)
    assert len(problems) == 1 and "shard-00001" in problems[0] and "chunk 2" in problems[0]


def test_truncated_or_missing_shard_found_without_reading_it(tmp_path):
    store = LocalStore(tmp_path)
    _save(store, 3, {"param": torch.randn(100)}, [(0, 50), (50, 100)])
    manifest = latest_manifest(store)
    assert verify(store, manifest) == []
    path = tmp_path / step_dir(3) / "shard-00000.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CorruptCheckpointError, match="shard-00000.*truncated"):
        check_objects(store, manifest)
    path.unlink()
    with pytest.raises(CorruptCheckpointError, match="shard-00000.*missing"):
        check_objects(store, manifest)


def test_partial_checkpoints_invisible_then_pruned(tmp_path):
    store = LocalStore(tmp_path)
    full = {"param": torch.randn(20)}
    _save(store, 2, full, [(0, 10), (10, 20)], keep=2)
    # A save that died after one shard (a kill mid-upload): invisible.
    write_shard(store, 4, 0, 0, 10, {"param": full["param"][:10]})
    assert committed_steps(store) == [2] and latest_manifest(store).step == 2
    assert all_step_dirs(store) == {2, 4}
    _save(store, 6, full, [(0, 10), (10, 20)], keep=2)
    # A partial newer than the newest commit may still be uploading: kept.
    write_shard(store, 8, 0, 0, 10, {"param": full["param"][:10]})
    _save(store, 7, full, [(0, 10), (10, 20)], keep=2)
    assert committed_steps(store) == [6, 7]
    assert all_step_dirs(store) == {6, 7, 8}  # step 4 (stale partial) and 2 (retention) gone


def test_failed_retention_does_not_uncommit(tmp_path):
    store = UndeletableStore(tmp_path)
    _save(store, 1, {"param": torch.randn(4)}, [(0, 4)], keep=1)
    _save(store, 2, {"param": torch.randn(4)}, [(0, 4)], keep=1)  # prune fails: warned, not raised
    assert committed_steps(store) == [1, 2]


def test_save_ids_and_spaces_give_each_attempt_its_own_object_and_result(tmp_path):
    store = LocalStore(tmp_path)
    saver = AsyncSaver(store)
    first, second = torch.randn(8), torch.randn(8)
    saver.save(5, 2, 0, 8, {"param": first}, space="stage/1", save_id="a1")
    assert saver.wait(10)
    saver.save(5, 2, 0, 8, {"param": second}, space="stage/1", save_id="b2")  # the step redone
    assert saver.wait(10)
    assert saver.result(5, save_id="zz") is None and saver.result(5, space="dp") is None
    b = saver.result(5, save_id="b2")
    a = saver.result(5)
    assert (a.save_id, b.save_id, a.space) == ("a1", "b2", "stage/1") and a.ok and b.ok
    assert a.record.key == "shard-stage-1-00002.a1.safetensors"
    assert b.record.key == "shard-stage-1-00002.b2.safetensors"
    assert a.nbytes == store.list(f"{step_dir(5)}/{a.record.key}")[0].size
    for result, expected in ((a, first), (b, second)):
        data = store.get(f"{step_dir(5)}/{result.record.key}")
        assert torch.equal(st_load(data)["param"], expected)
    with pytest.raises(ValueError, match="save id"):
        saver.save(6, 0, 0, 8, {"param": first}, save_id="../x")
