"""Checkpoint test helpers: a synchronous shard save (training saves through AsyncSaver)."""

from __future__ import annotations

import torch

from storage.checkpoint import DEFAULT_SPACE, ShardRecord, snapshot_shard, upload_shard
from storage.object_store import ObjectStore


def write_shard(
    store: ObjectStore,
    step: int,
    rank: int,
    lo: int,
    hi: int,
    tensors: dict[str, torch.Tensor],
    rng_state: torch.Tensor | None = None,
    chunk_bytes: int | None = None,
    *,
    space: str = DEFAULT_SPACE,
    save_id: str = "",
) -> ShardRecord:
    """Snapshot and upload rank ``rank``'s slices ``[lo, hi)`` of step ``step``; its record."""
    snapshot = snapshot_shard(rank, lo, hi, tensors, rng_state, space=space, save_id=save_id)
    return upload_shard(store, step, snapshot, chunk_bytes)
