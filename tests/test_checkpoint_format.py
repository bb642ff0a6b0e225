"""Sharded flat checkpoints on the local store: commit, retention, resharded reads, corruption."""

from __future__ import annotations

import pytest
import torch

from collectives.flat import split_evenly
from storage.checkpoint import (
    CheckpointReader,
    CorruptCheckpointError,
    Manifest,
    commit,
    committed_steps,
    latest_manifest,
    resolve,
    step_dir,
)
from storage.object_store import LocalStore, StoreError
from tests.checkpoint_helpers import write_shard


def _save(store, step, full: dict[str, torch.Tensor], world: int, keep: int = 2) -> Manifest:
    n = next(iter(full.values())).numel()
    records = [
        write_shard(store, step, r, lo, hi, {k: v[lo:hi] for k, v in full.items()})
        for r, (lo, hi) in enumerate(split_evenly(n, world))
    ]
    manifest = Manifest(
        step=step,
        world_size=world,
        strategy="ddp",
        numel=n,
        layout=[],
        optimizer={"step_count": step},
        shards=records,
    )
    commit(store, manifest, keep=keep)
    return manifest


def test_any_range_reads_back_across_shard_boundaries(tmp_path):
    store = LocalStore(tmp_path)
    full = {"param": torch.randn(103), "exp_avg": torch.randn(103)}
    _save(store, 10, full, world=3)
    reader = CheckpointReader(store, latest_manifest(store))
    for lo, hi in [(0, 103), (0, 1), (30, 80), (102, 103)] + split_evenly(103, 4):
        assert torch.equal(reader.read("param", lo, hi), full["param"][lo:hi])
        assert torch.equal(reader.read("exp_avg", lo, hi), full["exp_avg"][lo:hi])


def test_no_manifest_no_checkpoint_and_retention(tmp_path):
    store = LocalStore(tmp_path)
    full = {"param": torch.randn(10)}
    for step in (1, 2, 3):
        _save(store, step, full, world=2, keep=2)
    assert committed_steps(store) == [2, 3]
    # A crash mid-save: shards written, manifest never. Invisible, and the
    # newest committed checkpoint is still found.
    write_shard(store, 4, 0, 0, 5, {"param": full["param"][:5]})
    assert committed_steps(store) == [2, 3]
    assert latest_manifest(store).step == 3


def test_corrupt_shard_is_detected_and_named(tmp_path):
    store = LocalStore(tmp_path)
    _save(store, 5, {"param": torch.randn(50)}, world=2)
    shard = tmp_path / step_dir(5) / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    reader = CheckpointReader(store, latest_manifest(store))
    assert torch.equal(reader.read("param", 0, 10), reader.read("param", 0, 10))  # shard 0 fine
    with pytest.raises(CorruptCheckpointError, match="shard-00001"):
        reader.read("param", 0, 50)


def test_resolve_latest_and_explicit(tmp_path):
    store = LocalStore(tmp_path)
    with pytest.raises(StoreError, match="no committed checkpoint"):
        resolve("latest", latest_root=store.uri)
    _save(store, 7, {"param": torch.randn(4)}, world=1)
    assert resolve("latest", latest_root=store.uri)[1].step == 7
    assert resolve(f"{store.uri}/{step_dir(7)}")[1].step == 7
    with pytest.raises(StoreError):
        resolve(f"{store.uri}/{step_dir(8)}")
