"""Sharded checkpoints of flat training state, committed by a manifest written last.

Layout under the checkpoint root (``checkpoint.uri``)::

    step-00000100/
        shard-00000.safetensors   # rank 0's [lo, hi) slice of every flat tensor
        shard-00001.safetensors
        manifest.json             # written last: no manifest, no checkpoint

A shard holds slices of the flat vectors of ``collectives/flat.py``
("param" and the optimizer's state such as "exp_avg"), in safetensors (no
pickle). The manifest maps each shard to its global ``[lo, hi)`` range and
records its size and SHA-256, so a reader can assemble any range it needs,
at any world size, and detect a corrupt or truncated shard before loading it.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from storage.object_store import ObjectStore, StoreError, open_store

FORMAT = "shoal-flat-v1"
MANIFEST = "manifest.json"
RNG_KEY = "__rng_torch__"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CorruptCheckpointError(RuntimeError):
    """A checkpoint's shard or manifest does not match what was committed."""


def step_dir(step: int) -> str:
    # Zero-padded so that the lexical order of keys is the numeric order of steps.
    return f"step-{step:08d}"


@dataclass(frozen=True)
class ShardRecord:
    """One object of a checkpoint: which flat range it holds, its size and checksum."""

    key: str  # relative to the checkpoint's step directory
    rank: int
    lo: int
    hi: int
    nbytes: int
    sha256: str


@dataclass
class Manifest:
    step: int
    world_size: int
    strategy: str
    numel: int
    layout: list[dict]  # FlatLayout.to_json()
    optimizer: dict  # name, state_keys, step_count
    shards: list[ShardRecord]
    data: dict = field(default_factory=dict)  # data position and corpus fingerprint
    config: dict = field(default_factory=dict)
    created_at: float = 0.0
    format: str = FORMAT

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        try:
            raw = json.loads(text)
            if raw.get("format") != FORMAT:
                raise ValueError(f"format {raw.get('format')!r}, expected {FORMAT!r}")
            raw["shards"] = [ShardRecord(**s) for s in raw["shards"]]
            manifest = cls(**raw)
        except (ValueError, TypeError, KeyError) as e:
            raise CorruptCheckpointError(f"{where}: unreadable manifest ({e})") from None
        covered = sorted((s.lo, s.hi) for s in manifest.shards)
        expected_lo = 0
        for lo, hi in covered:
            if lo != expected_lo:
                raise CorruptCheckpointError(f"{where}: shards do not cover [0, {manifest.numel})")
            expected_lo = hi
        if expected_lo != manifest.numel:
            raise CorruptCheckpointError(f"{where}: shards do not cover [0, {manifest.numel})")
        return manifest


# -- writing ----------------------------------------------------------------


def write_shard(
    store: ObjectStore,
    step: int,
    rank: int,
    lo: int,
    hi: int,
    tensors: dict[str, torch.Tensor],
    rng_state: torch.Tensor | None = None,
) -> ShardRecord:
    """Write rank ``rank``'s slices ``[lo, hi)`` as one object; return its record for the manifest."""
    payload = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    for k, t in payload.items():
        if t.numel() != hi - lo:
            raise ValueError(f"tensor {k!r} has {t.numel()} elements for range [{lo}, {hi})")
    if rng_state is not None:
        payload[RNG_KEY] = rng_state
    data = st_save(payload, metadata={"lo": str(lo), "hi": str(hi), "rank": str(rank)})
    key = f"shard-{rank:05d}.safetensors"
    store.put(f"{step_dir(step)}/{key}", data)
    return ShardRecord(key, rank, lo, hi, len(data), hashlib.sha256(data).hexdigest())


def commit(store: ObjectStore, manifest: Manifest, keep: int) -> list[int]:
    """Make a checkpoint visible by writing its manifest, then apply retention.

    Returns the steps deleted. Older checkpoints are deleted only after the
    new manifest is in place, so a crash at any moment leaves a committed one.
    """
    manifest.created_at = manifest.created_at or time.time()
    store.put(f"{step_dir(manifest.step)}/{MANIFEST}", manifest.to_json().encode())
    return prune(store, keep)


def prune(store: ObjectStore, keep: int) -> list[int]:
    """Keep the newest ``keep`` committed checkpoints; drop older ones and stale partial ones."""
    committed = committed_steps(store)
    if not committed:
        return []
    keep_steps = set(committed[-keep:])
    newest = committed[-1]
    deleted = []
    for step in sorted(all_step_dirs(store)):
        # A partial (uncommitted) directory newer than the newest commit may be
        # an upload still in flight: leave it alone.
        if step in keep_steps or (step not in committed and step > newest):
            continue
        store.delete_prefix(step_dir(step) + "/")
        deleted.append(step)
    return deleted


# -- finding ----------------------------------------------------------------


def all_step_dirs(store: ObjectStore) -> set[int]:
    steps = set()
    for obj in store.list("step-"):
        m = _STEP_DIR.match(obj.key.split("/", 1)[0])
        if m:
            steps.add(int(m.group(1)))
    return steps


def committed_steps(store: ObjectStore) -> list[int]:
    steps = []
    for obj in store.list("step-"):
        top, _, rest = obj.key.partition("/")
        m = _STEP_DIR.match(top)
        if m and rest == MANIFEST:
            steps.append(int(m.group(1)))
    return sorted(steps)


def read_manifest(store: ObjectStore, step: int) -> Manifest:
    key = f"{step_dir(step)}/{MANIFEST}"
    return Manifest.from_json(store.get(key).decode(), f"{store.uri}/{key}")


def latest_manifest(store: ObjectStore) -> Manifest | None:
    """The newest committed checkpoint whose manifest is readable, or None."""
    for step in reversed(committed_steps(store)):
        try:
            return read_manifest(store, step)
        except CorruptCheckpointError:
            continue
    return None


def resolve(uri: str, latest_root: str | None = None, **store_options: Any) -> tuple[ObjectStore, Manifest]:
    """The store and manifest for ``resume``: ``"latest"`` under ``latest_root``, or a ``.../step-N`` URI."""
    if uri == "latest":
        if latest_root is None:
            raise ValueError("resume=latest needs a checkpoint root")
        store = open_store(latest_root, **store_options)
        manifest = latest_manifest(store)
        if manifest is None:
            raise StoreError(
                f"resume=latest: no committed checkpoint under {latest_root}. Point run_dir= at the "
                "earlier run's folder (see `shoal status`), or pass resume=<checkpoint URI>."
            )
        return store, manifest
    root, _, last = uri.rstrip("/").rpartition("/")
    m = _STEP_DIR.match(last)
    if not m:
        raise StoreError(f"resume={uri}: expected a checkpoint URI ending in /step-<N>")
    store = open_store(root, **store_options)
    try:
        return store, read_manifest(store, int(m.group(1)))
    except StoreError:
        raise StoreError(f"resume={uri}: no committed checkpoint there (no {MANIFEST})") from None


# -- reading ----------------------------------------------------------------


class CheckpointReader:
    """Assembles any flat range of a checkpointed tensor from the shards that hold it.

    Each shard object is fetched at most once and verified against the
    manifest's size and SHA-256 before any of it is used.
    """

    def __init__(self, store: ObjectStore, manifest: Manifest):
        self.store = store
        self.manifest = manifest
        self._cache: dict[str, dict[str, torch.Tensor]] = {}

    def _shard(self, rec: ShardRecord) -> dict[str, torch.Tensor]:
        if rec.key not in self._cache:
            key = f"{step_dir(self.manifest.step)}/{rec.key}"
            data = self.store.get(key)
            if len(data) != rec.nbytes or hashlib.sha256(data).hexdigest() != rec.sha256:
                raise CorruptCheckpointError(
                    f"{self.store.uri}/{key}: checksum mismatch ({len(data)} bytes, expected "
                    f"{rec.nbytes}); the shard is corrupt or truncated"
                )
            self._cache[rec.key] = st_load(data)
        return self._cache[rec.key]

    def read(self, name: str, lo: int, hi: int) -> torch.Tensor:
        """Flat elements ``[lo, hi)`` of checkpointed tensor ``name``."""
        parts = []
        for rec in sorted(self.manifest.shards, key=lambda r: r.lo):
            a, b = max(lo, rec.lo), min(hi, rec.hi)
            if a >= b:
                continue
            tensors = self._shard(rec)
            if name not in tensors:
                raise CorruptCheckpointError(f"{rec.key}: has no tensor {name!r}")
            parts.append(tensors[name][a - rec.lo : b - rec.lo])
        out = torch.cat(parts) if parts else torch.empty(0)
        if out.numel() != hi - lo:
            raise CorruptCheckpointError(f"range [{lo}, {hi}) of {name!r} is not fully covered")
        return out

    def rng_state(self, rank: int) -> torch.Tensor | None:
        for rec in self.manifest.shards:
            if rec.rank == rank:
                return self._shard(rec).get(RNG_KEY)
        return None
