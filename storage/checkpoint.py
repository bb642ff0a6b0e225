"""Sharded checkpoints of flat training state, committed by a manifest written last.

Layout under the checkpoint root (``checkpoint.uri``)::

    step-00000100/
        shard-00000.safetensors          # rank 0's [lo, hi) slice of every flat tensor
        shard-00001.safetensors
        shard-server-00003.safetensors   # rank 3's range of the "server" state space
        manifest.json                    # written last: no manifest, no checkpoint

State is divided into named **state spaces**, each a flat index range
``[0, size)`` tiled by its owners' shards: ``dp`` (the data-parallel flat
vectors, the only space of manifests written before spaces existed) and,
for other programs, e.g. ``stage/2``, ``expert/1.7`` or ``server``. The
manifest records each space's size (``spaces``) and each shard's space;
readers ask for a range of a tensor in a space. A shard's key names its
space (``/`` written as ``-``; none for ``dp``) and, when the saver gives
one, its **save id** (``shard-00001.<id>.safetensors``): unique per save
attempt, so a late manifest of an abandoned attempt can only name objects
written for it, never ones a newer attempt of the same step is writing.

A shard holds slices of the flat vectors of ``collectives/flat.py``
("param" and the optimizer's state such as "exp_avg") in safetensors (no
pickle), plus the rank's RNG state. The manifest maps each shard to its
global ``[lo, hi)`` range and, per shard, records:

* ``nbytes`` and ``sha256`` of the whole object -- what ``shoal checkpoints
  verify`` and ``sha256sum`` check;
* the safetensors header's length and SHA-256, and for every tensor its byte
  range in the object (copied from the header we wrote) with one SHA-256 per
  ``chunk_bytes`` piece of its data.

Why per-chunk checksums: a resume at another world size or ZeRO stage reads
only the byte ranges its rank needs (``ObjectStore.get_range``), so a
whole-object checksum could not be checked without downloading everything.
Every ranged read is widened to chunk boundaries and each chunk is verified
before use, so corruption is still detected -- and named -- for every byte
that is used. Because the ranks of a resume together read every byte of
every tensor, a resume that completes has verified all of the checkpoint's
tensor data. Chunk size (per shard, :func:`auto_chunk_bytes`): about 1/64 of
the shard's largest tensor, between 4 KiB and 4 MiB. So widening a read
costs at most two chunks (~3% of a tensor, or 8 MiB), and the manifest
holds at most ~64 hashes per tensor below 256 MiB and ~65 bytes per 4 MiB
of state above.

Visibility and cleanup: shards are uploaded first (each ``put`` is atomic),
the manifest last. A crash before the manifest leaves a partial directory
that no reader looks at; :func:`prune` deletes it once a newer checkpoint is
committed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from storage.object_store import ObjectStore, StoreError, open_store
from storage.tiers import TierFlat, copy_flat

FORMAT = "shoal-flat-v2"
MANIFEST = "manifest.json"
RNG_KEY = "__rng_torch__"
# The data-parallel flat state; the space of every shard written before spaces existed.
DEFAULT_SPACE = "dp"
# Checksum chunks: about CHUNKS_PER_TENSOR per tensor, between these bounds.
MIN_CHUNK_BYTES = 4 * 1024
MAX_CHUNK_BYTES = 4 * 1024 * 1024
CHUNKS_PER_TENSOR = 64
_STEP_DIR = re.compile(r"^step-(\d+)$")
# A shard's key is a file name inside its step directory: never a path elsewhere.
_SHARD_KEY = re.compile(r"^shard-[A-Za-z0-9_.-]+\.safetensors$")
# A space name: "/"-separated parts, the first starting with a letter (so a
# space's key prefix never looks like a dp rank), no "-" (it stands for "/" in keys).
_SPACE = re.compile(r"^[A-Za-z][A-Za-z0-9_.]*(/[A-Za-z0-9_.]+)*$")
_SAVE_ID = re.compile(r"^[A-Za-z0-9]{0,32}$")
# Verification reads this much per request, so memory stays bounded on big shards.
_VERIFY_BLOCK_BYTES = 64 * 1024 * 1024

# safetensors dtype names <-> torch dtypes (the ones a training state can hold).
_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


class CorruptCheckpointError(RuntimeError):
    """A checkpoint's shard or manifest does not match what was committed.

    The message names the object (its full URI) and, where known, the tensor
    and byte range that failed.
    """


def step_dir(step: int) -> str:
    # Zero-padded so that the lexical order of keys is the numeric order of steps.
    return f"step-{step:08d}"


def check_space(space: str) -> str:
    """``space`` if it is a valid state-space name (``dp``, ``stage/2``...), else ``ValueError``."""
    if not isinstance(space, str) or not _SPACE.match(space):
        raise ValueError(
            f"invalid state space name {space!r}: '/'-separated parts of letters, digits, '_' "
            "and '.', starting with a letter"
        )
    return space


def shard_key(rank: int, space: str = DEFAULT_SPACE, save_id: str = "") -> str:
    """The object name of rank ``rank``'s shard of ``space`` inside its step directory.

    ``shard-00003.safetensors`` for ``dp`` without a save id, as before state
    spaces and save ids existed; ``shard-stage-2-00003.<save_id>.safetensors``
    in general. Distinct (space, rank, save id) triples give distinct keys.
    """
    check_space(space)
    if not _SAVE_ID.match(save_id):
        raise ValueError(f"invalid save id {save_id!r}: at most 32 letters and digits")
    prefix = "" if space == DEFAULT_SPACE else space.replace("/", "-") + "-"
    suffix = f".{save_id}" if save_id else ""
    return f"shard-{prefix}{rank:05d}{suffix}.safetensors"


def parse_step_uri(uri: str) -> tuple[str, int] | None:
    """``(root URI, step)`` if ``uri`` names one checkpoint (ends in ``/step-<N>``), else None."""
    root, _, last = uri.rstrip("/").rpartition("/")
    m = _STEP_DIR.match(last)
    return (root, int(m.group(1))) if m and root else None


@dataclass(frozen=True)
class TensorRecord:
    """Where one tensor's data lies in a shard object, and the checksums of its chunks."""

    dtype: str  # safetensors name, e.g. "F32"
    shape: list[int]
    begin: int  # byte offset of the data in the object (header included)
    end: int
    chunk_sha256: list[str]  # SHA-256 of each chunk_bytes piece of [begin, end)


@dataclass(frozen=True)
class ShardRecord:
    """One object of a checkpoint: which range of which space it holds, its size and checksums.

    ``space`` and ``save_id`` are absent from manifests written before they
    existed: such shards are ``dp`` shards without a save id.
    """

    key: str  # relative to the checkpoint's step directory
    rank: int
    lo: int
    hi: int
    nbytes: int
    sha256: str  # of the whole object
    header_bytes: int = 0  # 8 + header length: where tensor data starts
    header_sha256: str = ""
    chunk_bytes: int = MAX_CHUNK_BYTES
    tensors: dict[str, TensorRecord] = field(default_factory=dict)
    space: str = DEFAULT_SPACE
    save_id: str = ""  # the save attempt that wrote the object ("": none given)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ShardRecord:
        raw = dict(raw)
        raw["tensors"] = {k: TensorRecord(**v) for k, v in raw.get("tensors", {}).items()}
        return cls(**raw)


@dataclass
class Manifest:
    """What a committed checkpoint holds: plain data, never code.

    ``config`` is the saving job's configuration, kept for people to read; no
    reader ever instantiates anything from it (a manifest may come from
    someone else's bucket). What a reader needs about the model is recorded
    as data at save time: ``layout`` (parameter names, shapes, offsets) and
    ``tied`` (state-dict names that alias a parameter of the layout).
    ``lineage`` names the run that started this chain of checkpoints (a
    resume continues its lineage); retention only counts its own lineage.

    ``spaces`` maps each state space the checkpoint holds to its size; the
    shards of a space tile ``[0, size)``. ``numel`` is the size of ``dp``
    (0 if the checkpoint has none). Left empty when constructing, it is
    derived: ``dp`` of ``numel``, and each other space the shards name up to
    its highest ``hi``. Manifests written before spaces existed have no
    ``spaces`` and load as ``{"dp": numel}``.
    """

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
    tied: dict = field(default_factory=dict)  # alias -> owner parameter name
    lineage: str = ""  # "" in manifests written before lineages existed
    spaces: dict[str, int] = field(default_factory=dict)  # state space -> size

    def __post_init__(self) -> None:
        if not self.spaces:
            spaces: dict[str, int] = {}
            if self.numel or any(s.space == DEFAULT_SPACE for s in self.shards):
                spaces[DEFAULT_SPACE] = self.numel
            for s in self.shards:
                if s.space != DEFAULT_SPACE:
                    spaces[s.space] = max(spaces.get(s.space, 0), s.hi)
            self.spaces = spaces

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def shards_of(self, space: str = DEFAULT_SPACE) -> list[ShardRecord]:
        """The shards of ``space``, sorted by range."""
        return sorted((s for s in self.shards if s.space == space), key=lambda s: (s.lo, s.hi))

    def owner_ranges(self, space: str = DEFAULT_SPACE) -> dict[int, tuple[int, int]]:
        """Saving rank -> its ``[lo, hi)`` of ``space``: the space's owner ranges at save time."""
        return {s.rank: (s.lo, s.hi) for s in self.shards_of(space)}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        """Parse and check a manifest; ``CorruptCheckpointError`` naming ``where`` if invalid.

        Every field is checked for its type before anything uses it, so a
        crafted or damaged manifest is refused here with a clear message.
        """
        try:
            raw = json.loads(text)
            _check_manifest_fields(raw)
            raw = dict(raw)
            raw["shards"] = [ShardRecord.from_dict(s) for s in raw["shards"]]
            manifest = cls(**raw)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise CorruptCheckpointError(f"{where}: not a valid manifest ({e})") from None
        problem = manifest.coverage_problem()
        if problem:
            raise CorruptCheckpointError(f"{where}: {problem}")
        return manifest

    def coverage_problem(self) -> str | None:
        """Why the shards do not tile each space's ``[0, size)`` exactly once, or None."""
        unknown = {s.space for s in self.shards} - set(self.spaces)
        if unknown:
            return f"shards of unknown state space(s) {sorted(unknown)}"
        for space, size in sorted(self.spaces.items()):
            end = 0
            for s in self.shards_of(space):
                if s.lo != end:
                    end = -1  # a gap or an overlap
                    break
                end = s.hi
            if end != size:
                of = "" if space == DEFAULT_SPACE else f" of state space {space!r}"
                return f"shards do not cover [0, {size}){of}"
        return None


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(what)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_space(v: Any) -> bool:
    return isinstance(v, str) and _SPACE.match(v) is not None


def _check_manifest_fields(raw: Any) -> None:
    """Raise ``ValueError`` naming the first field of ``raw`` with the wrong type."""
    _expect(isinstance(raw, dict), f"expected a JSON object, got {type(raw).__name__}")
    _expect(raw.get("format") == FORMAT, f"format {raw.get('format')!r}, expected {FORMAT!r}")
    for name in ("step", "world_size", "numel"):
        _expect(_is_int(raw.get(name)), f"{name} must be a non-negative integer")
    _expect(isinstance(raw.get("strategy"), str), "strategy must be a string")
    _expect(isinstance(raw.get("layout"), list), "layout must be a list")
    for slot in raw["layout"]:
        _expect(
            isinstance(slot, dict)
            and isinstance(slot.get("name"), str)
            and _is_int(slot.get("offset"))
            and isinstance(slot.get("shape"), list)
            and all(_is_int(d) for d in slot["shape"]),
            "layout entries must have a string name, an integer offset and an integer shape",
        )
    _expect(isinstance(raw.get("optimizer"), dict), "optimizer must be an object")
    for name in ("data", "config", "tied"):
        _expect(isinstance(raw.get(name, {}), dict), f"{name} must be an object")
    tied = raw.get("tied", {})
    _expect(
        all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()),
        "tied must map names to names",
    )
    _expect(isinstance(raw.get("lineage", ""), str), "lineage must be a string")
    # Manifests written before state spaces existed hold one: dp, of numel.
    spaces = raw.get("spaces", {DEFAULT_SPACE: raw["numel"]})
    _expect(
        isinstance(spaces, dict) and all(_is_space(k) and _is_int(v) for k, v in spaces.items()),
        "spaces must map state space names to non-negative integers",
    )
    _expect(spaces.get(DEFAULT_SPACE, 0) == raw["numel"], "numel must be the size of space 'dp'")
    _expect(isinstance(raw.get("shards"), list), "shards must be a list")
    for shard in raw["shards"]:
        _expect(isinstance(shard, dict), "shards must be objects")
        for name in ("rank", "lo", "hi", "nbytes"):
            _expect(_is_int(shard.get(name)), f"shard {name} must be a non-negative integer")
        _expect(
            isinstance(shard.get("key"), str) and _SHARD_KEY.match(shard["key"]) is not None,
            "shard key must be a shard file name",
        )
        space = shard.get("space", DEFAULT_SPACE)
        _expect(_is_space(space) and space in spaces, "shard space must be one of spaces")
        save_id = shard.get("save_id", "")
        _expect(
            isinstance(save_id, str) and _SAVE_ID.match(save_id) is not None,
            "shard save_id must be at most 32 letters and digits",
        )
        _expect(isinstance(shard.get("tensors", {}), dict), "shard tensors must be an object")
        for t in shard.get("tensors", {}).values():
            _expect(
                isinstance(t, dict)
                and t.get("dtype") in _TORCH_DTYPES
                and _is_int(t.get("begin"))
                and _is_int(t.get("end"))
                and isinstance(t.get("chunk_sha256"), list),
                "shard tensor records must have a known dtype, integer byte range and checksums",
            )


# -- encoding: one host buffer per shard --------------------------------------


@dataclass
class ShardSnapshot:
    """A shard serialized into one host buffer: exactly the bytes of its safetensors object.

    Made by :func:`snapshot_shard` (the only part of a save that must block
    training: one copy of the shard); hashing and uploading work on
    ``buffer`` afterwards, while training changes the live tensors.
    """

    rank: int
    lo: int
    hi: int
    buffer: torch.Tensor  # uint8, 1-D, on the host
    header_bytes: int
    tensors: dict[str, tuple[str, list[int], int, int]]  # name -> dtype, shape, begin, end
    space: str = DEFAULT_SPACE
    save_id: str = ""

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    @property
    def key(self) -> str:
        """The object's name inside its step directory (:func:`shard_key`)."""
        return shard_key(self.rank, self.space, self.save_id)

    def view(self) -> memoryview:
        return memoryview(self.buffer.numpy()).cast("B")


def _header_for(
    rank: int, lo: int, hi: int, tensors: dict[str, torch.Tensor], space: str = DEFAULT_SPACE
) -> tuple[bytes, dict[str, tuple[str, list[int], int, int]]]:
    """The safetensors header bytes (length prefix included) and each tensor's byte range."""
    # Widest element first, so every tensor starts at a multiple of its element
    # size (the header is padded to 8): a uint8 buffer slice can then be viewed
    # as the tensor's dtype and copied into directly.
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    metadata = {"lo": str(lo), "hi": str(hi), "rank": str(rank)}
    if space != DEFAULT_SPACE:
        metadata["space"] = space
    entries: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    spans = {}
    for name in order:
        t = tensors[name]
        if t.dtype not in _ST_DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {t.dtype} cannot be checkpointed")
        n = t.numel() * t.element_size()
        entries[name] = {
            "dtype": _ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        spans[name] = (_ST_DTYPES[t.dtype], list(t.shape), offset, offset + n)
        offset += n
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # safetensors allows space padding; keeps data aligned
    start = 8 + len(header)
    spans = {k: (d, s, start + a, start + b) for k, (d, s, a, b) in spans.items()}
    return struct.pack("<Q", len(header)) + header, spans


def snapshot_shard(
    rank: int,
    lo: int,
    hi: int,
    tensors: dict[str, torch.Tensor],
    rng_state: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    *,
    space: str = DEFAULT_SPACE,
    save_id: str = "",
) -> ShardSnapshot:
    """Copy rank ``rank``'s slices ``[lo, hi)`` of ``space`` into one host buffer as safetensors.

    One copy per tensor, straight into its place in the object (no separate
    serialization pass). ``out`` (a uint8 buffer of exactly the right size,
    e.g. the previous snapshot's) is reused when given, which saves the page
    faults of a fresh multi-hundred-MB allocation. ``tensors`` may live on a
    GPU; the copy then goes through pinned memory and is complete on return.
    ``save_id`` goes into the object's key (:func:`shard_key`).

    Why not ``safetensors.torch.save``: it returns new ``bytes`` after moving
    each tensor to the host and serializing (more copies, fresh memory each
    time, no pinned device-to-host copy); for 64-256 MiB shards on a CPU it
    took 5-15x the time of this writer with its reused buffer, 1.4-2.5x
    with a fresh one (``bench/snapshot_writer.py``). The objects are plain
    safetensors: ``safetensors.torch.load`` reads them. A tensor may also be
    a ``storage.tiers.TierFlat`` (optimizer state offloaded to NVMe), which is
    copied in one chunk at a time rather than loaded whole first.
    """
    shard_key(rank, space, save_id)  # refuse a bad space or save id before copying
    payload = {}
    for k, t in tensors.items():
        if t.numel() != hi - lo:
            raise ValueError(f"tensor {k!r} has {t.numel()} elements for range [{lo}, {hi})")
        payload[k] = t.detach()
    if rng_state is not None:
        payload[RNG_KEY] = rng_state.detach()
    header, spans = _header_for(rank, lo, hi, payload, space)
    total = max((end for _, _, _, end in spans.values()), default=len(header))
    on_gpu = any(t.is_cuda for t in payload.values())
    if out is None or out.numel() != total or out.dtype != torch.uint8:
        out = torch.empty(total, dtype=torch.uint8, pin_memory=on_gpu)
    out[: len(header)].copy_(torch.frombuffer(bytearray(header), dtype=torch.uint8))
    for name, t in payload.items():
        _, _, begin, end = spans[name]
        # Offloaded state (a TierFlat) is read chunk by chunk straight into its place.
        dst = out[begin:end].view(t.dtype)
        copy_flat(dst, t if isinstance(t, TierFlat) else t.reshape(-1), non_blocking=on_gpu)
    if on_gpu:
        torch.cuda.synchronize()  # the snapshot must be complete before training goes on
    return ShardSnapshot(rank, lo, hi, out, len(header), spans, space, save_id)


def _chunks(begin: int, end: int, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    for a in range(begin, end, chunk_bytes):
        yield a, min(a + chunk_bytes, end)


def auto_chunk_bytes(snapshot: ShardSnapshot) -> int:
    """The checksum chunk size for a shard: ~1/64 of its largest tensor, 4 KiB to 4 MiB."""
    largest = max((end - begin for _, _, begin, end in snapshot.tensors.values()), default=0)
    size = -(-largest // CHUNKS_PER_TENSOR)
    size = -(-size // MIN_CHUNK_BYTES) * MIN_CHUNK_BYTES  # whole pages: cheap to range-read
    return min(MAX_CHUNK_BYTES, max(MIN_CHUNK_BYTES, size))


def seal(snapshot: ShardSnapshot, chunk_bytes: int | None = None) -> ShardRecord:
    """Hash a snapshot: the whole object, its header, and every chunk of every tensor.

    ``chunk_bytes`` None: :func:`auto_chunk_bytes`.

    The whole-object hash and the chunk hashes run in two threads (hashlib
    releases the GIL), so sealing costs about one pass over the bytes.
    """
    chunk_bytes = chunk_bytes or auto_chunk_bytes(snapshot)
    view = snapshot.view()
    with ThreadPoolExecutor(1) as pool:
        whole = pool.submit(lambda: hashlib.sha256(view).hexdigest())
        tensors = {}
        for name, (dtype, shape, begin, end) in snapshot.tensors.items():
            sums = [
                hashlib.sha256(view[a:b]).hexdigest() for a, b in _chunks(begin, end, chunk_bytes)
            ]
            tensors[name] = TensorRecord(dtype, shape, begin, end, sums)
        sha = whole.result()
    return ShardRecord(
        key=snapshot.key,
        rank=snapshot.rank,
        lo=snapshot.lo,
        hi=snapshot.hi,
        nbytes=snapshot.nbytes,
        sha256=sha,
        header_bytes=snapshot.header_bytes,
        header_sha256=hashlib.sha256(view[: snapshot.header_bytes]).hexdigest(),
        chunk_bytes=chunk_bytes,
        tensors=tensors,
        space=snapshot.space,
        save_id=snapshot.save_id,
    )


def upload_shard(
    store: ObjectStore, step: int, snapshot: ShardSnapshot, chunk_bytes: int | None = None
) -> ShardRecord:
    """Hash ``snapshot`` and put it as ``step-<N>/<snapshot.key>``; returns its record.

    Raises whatever ``store.put`` raises (``StoreError``); the put is atomic,
    so a failed or interrupted upload leaves no partial object behind.
    """
    with ThreadPoolExecutor(1) as pool:
        # Hashing overlaps the upload: neither needs the other's result.
        record = pool.submit(seal, snapshot, chunk_bytes)
        store.put(f"{step_dir(step)}/{snapshot.key}", snapshot.view())
        return record.result()


# -- committing and retention -------------------------------------------------


def commit(store: ObjectStore, manifest: Manifest, keep: int) -> list[int]:
    """Make a checkpoint visible by writing its manifest, then apply retention.

    Returns the steps deleted. Older checkpoints are deleted only after the
    new manifest is in place, so a crash at any moment leaves a committed one.
    Call only after every shard's upload has succeeded. ``StoreError`` if the
    manifest cannot be written (the checkpoint is then not committed);
    ``CorruptCheckpointError`` (nothing written) if the manifest is one no
    reader would accept, e.g. shards that do not tile a space.
    Retention is best effort: if pruning fails, the checkpoint stays committed,
    a warning is logged, and the next commit prunes again.
    """
    manifest.created_at = manifest.created_at or time.time()
    key = f"{step_dir(manifest.step)}/{MANIFEST}"
    text = manifest.to_json()
    Manifest.from_json(text, f"{store.uri}/{key} (not written)")  # never commit what won't load
    store.put(key, text.encode())
    try:
        return prune(store, keep, manifest.lineage or None)
    except StoreError as e:
        logging.getLogger("shoal.checkpoint").warning("retention skipped this time: %s", e)
        return []


def prune(store: ObjectStore, keep: int, lineage: str | None = None) -> list[int]:
    """Keep the newest ``keep`` committed checkpoints; drop older ones and stale partial ones.

    ``lineage``: only checkpoints of that lineage count and may be deleted;
    another run's checkpoints under the same root are never touched (None:
    every committed checkpoint counts, as in manifests without a lineage).
    A partial (uncommitted) directory older than the newest counted
    checkpoint is the remains of a crashed or failed save and is deleted; one
    newer than it may be an upload still in flight and is left alone.
    """
    committed = committed_steps(store)
    if lineage is not None:
        committed = [s for s in committed if _lineage_of(store, s) == lineage]
    if not committed:
        return []
    keep_steps = set(committed[-keep:])
    newest = committed[-1]
    foreign = set(committed_steps(store)) - set(committed)
    deleted = []
    for step in sorted(all_step_dirs(store)):
        if step in keep_steps or step in foreign or (step not in committed and step > newest):
            continue
        # The manifest goes first, so a prune interrupted half-way never leaves
        # a committed checkpoint with missing shards.
        store.delete(f"{step_dir(step)}/{MANIFEST}")
        store.delete_prefix(step_dir(step) + "/")
        deleted.append(step)
    return deleted


# -- finding ------------------------------------------------------------------


def all_step_dirs(store: ObjectStore) -> set[int]:
    steps = set()
    for obj in store.list("step-"):
        m = _STEP_DIR.match(obj.key.split("/", 1)[0])
        if m:
            steps.add(int(m.group(1)))
    return steps


def _lineage_of(store: ObjectStore, step: int) -> str | None:
    """The lineage of checkpoint ``step``, or None if its manifest cannot be read."""
    try:
        return read_manifest(store, step).lineage
    except (CorruptCheckpointError, StoreError):
        return None


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
    return Manifest.from_json(store.get(key).decode(errors="replace"), f"{store.uri}/{key}")


def latest_manifest(store: ObjectStore) -> Manifest | None:
    """The newest committed checkpoint whose manifest is readable, or None."""
    for step in reversed(committed_steps(store)):
        try:
            return read_manifest(store, step)
        except CorruptCheckpointError:
            continue
    return None


def resolve(
    uri: str, latest_root: str | None = None, **store_options: Any
) -> tuple[ObjectStore, Manifest]:
    """The store and manifest for ``resume``.

    ``uri`` is ``"latest"`` (the newest committed checkpoint under
    ``latest_root`` with a readable manifest) or a checkpoint's own URI
    ending in ``/step-<N>``. Shard contents are not checked here; see
    :func:`check_objects` and :func:`verify`.
    """
    if uri == "latest":
        if latest_root is None:
            raise ValueError("resume=latest needs a checkpoint root")
        store = open_store(latest_root, **store_options)
        manifest = latest_manifest(store)
        if manifest is None:
            raise StoreError(
                f"resume=latest: no committed checkpoint under {latest_root}. Point run_dir= at "
                "the earlier run's folder (see `shoal status`), or pass resume=<checkpoint URI>."
            )
        return store, manifest
    parsed = parse_step_uri(uri)
    if parsed is None:
        raise StoreError(f"resume={uri}: expected a checkpoint URI ending in /step-<N>")
    store = open_store(parsed[0], **store_options)
    try:
        return store, read_manifest(store, parsed[1])
    except StoreError:
        raise StoreError(f"resume={uri}: no committed checkpoint there (no {MANIFEST})") from None


# -- checking -----------------------------------------------------------------


def check_objects(store: ObjectStore, manifest: Manifest) -> None:
    """Cheap check (one listing): every shard exists with its committed size.

    Catches missing and truncated shards without reading them;
    ``CorruptCheckpointError`` names the first bad object.
    """
    prefix = step_dir(manifest.step) + "/"
    sizes = {o.key[len(prefix) :]: o.size for o in store.list(prefix)}
    for rec in manifest.shards:
        where = f"{store.uri}/{prefix}{rec.key}"
        if rec.key not in sizes:
            raise CorruptCheckpointError(f"{where}: shard is missing")
        if sizes[rec.key] != rec.nbytes:
            raise CorruptCheckpointError(
                f"{where}: {sizes[rec.key]} bytes, expected {rec.nbytes}; the shard is truncated "
                "or was overwritten"
            )


def _check_chunk(data: memoryview | bytes, expected: str, where: str, what: str) -> None:
    if hashlib.sha256(data).hexdigest() != expected:
        raise CorruptCheckpointError(f"{where}: checksum mismatch in {what}; the shard is corrupt")


def verify_shard(store: ObjectStore, manifest: Manifest, rec: ShardRecord) -> None:
    """Re-read one shard object and check every checksum the manifest holds for it.

    Streams the object in blocks of at most 64 MiB (bounded memory), checks
    the header's bytes and its tensor offsets against the manifest, every
    chunk of every tensor, and the whole-object SHA-256. ``CorruptCheckpointError``
    names the object and the tensor / byte range that failed; ``StoreError``
    if the store cannot be read.
    """
    key = f"{step_dir(manifest.step)}/{rec.key}"
    where = f"{store.uri}/{key}"
    whole = hashlib.sha256()
    header = store.get_range(key, 0, rec.header_bytes)
    whole.update(header)
    if len(header) != rec.header_bytes:
        raise CorruptCheckpointError(f"{where}: truncated inside the safetensors header")
    _check_chunk(header, rec.header_sha256, where, "the safetensors header")
    (n,) = struct.unpack("<Q", header[:8])
    entries = json.loads(header[8 : 8 + n])
    pos = rec.header_bytes
    for name, t in sorted(rec.tensors.items(), key=lambda kv: kv[1].begin):
        a, b = entries[name]["data_offsets"]
        if (a + rec.header_bytes, b + rec.header_bytes) != (t.begin, t.end) or t.begin != pos:
            raise CorruptCheckpointError(f"{where}: header and manifest disagree on {name!r}")
        step = max(rec.chunk_bytes, (_VERIFY_BLOCK_BYTES // rec.chunk_bytes) * rec.chunk_bytes)
        for block_lo in range(t.begin, t.end, step):
            block_hi = min(block_lo + step, t.end)
            data = store.get_range(key, block_lo, block_hi)
            if len(data) != block_hi - block_lo:
                raise CorruptCheckpointError(
                    f"{where}: truncated: {name!r} ends at byte {block_lo + len(data)}, "
                    f"expected {t.end}"
                )
            whole.update(data)
            view = memoryview(data)
            for a, b in _chunks(block_lo, block_hi, rec.chunk_bytes):
                i = (a - t.begin) // rec.chunk_bytes
                _check_chunk(
                    view[a - block_lo : b - block_lo],
                    t.chunk_sha256[i],
                    where,
                    f"tensor {name!r} chunk {i} (bytes {a}-{b})",
                )
        pos = t.end
    rest = store.get_range(key, pos, rec.nbytes + 1)  # anything past the end: appended junk
    whole.update(rest)
    if pos + len(rest) != rec.nbytes or whole.hexdigest() != rec.sha256:
        raise CorruptCheckpointError(
            f"{where}: whole-object checksum mismatch ({pos + len(rest)} bytes, expected "
            f"{rec.nbytes}); the shard is corrupt or truncated"
        )


def verify(store: ObjectStore, manifest: Manifest) -> list[str]:
    """Every problem of a committed checkpoint, one message per bad object (empty: valid)."""
    problems = []
    try:
        check_objects(store, manifest)
    except CorruptCheckpointError as e:
        problems.append(str(e))
        return problems
    for rec in manifest.shards:
        try:
            verify_shard(store, manifest, rec)
        except (CorruptCheckpointError, StoreError, ValueError, KeyError) as e:
            problems.append(str(e) if isinstance(e, CorruptCheckpointError) else f"{rec.key}: {e}")
    return problems


# -- reading ------------------------------------------------------------------


class CheckpointReader:
    """Assembles any flat range of a checkpointed tensor from the shards that hold it.

    Reads only the byte ranges needed (widened to the manifest's chunk
    boundaries) with ``store.get_range``, and verifies every chunk it reads
    against the manifest before using it. The tensor offsets come from the
    manifest (recorded from the safetensors header at save time), so no
    header request is needed. ``bytes_read`` counts what was fetched.

    Raises ``CorruptCheckpointError`` naming the object, tensor and chunk on
    a checksum mismatch or short read; ``StoreError`` if the store fails.
    """

    def __init__(self, store: ObjectStore, manifest: Manifest):
        self.store = store
        self.manifest = manifest
        self.bytes_read = 0

    def _read_span(self, rec: ShardRecord, name: str, first: int, last: int) -> torch.Tensor:
        """Elements ``[first, last)`` of tensor ``name`` of one shard (shard-local indices)."""
        key = f"{step_dir(self.manifest.step)}/{rec.key}"
        where = f"{self.store.uri}/{key}"
        if name not in rec.tensors:
            raise CorruptCheckpointError(f"{where}: has no tensor {name!r}")
        t = rec.tensors[name]
        dtype = _TORCH_DTYPES[t.dtype]
        size = torch.empty(0, dtype=dtype).element_size()
        want_lo, want_hi = t.begin + first * size, t.begin + last * size
        # Widen to whole chunks so each one can be checked against its hash.
        c0 = (want_lo - t.begin) // rec.chunk_bytes
        c1 = -(-(want_hi - t.begin) // rec.chunk_bytes)
        lo, hi = t.begin + c0 * rec.chunk_bytes, min(t.end, t.begin + c1 * rec.chunk_bytes)
        data = self.store.get_range(key, lo, hi)
        self.bytes_read += len(data)
        if len(data) != hi - lo:
            raise CorruptCheckpointError(
                f"{where}: truncated ({lo + len(data)} bytes, {name!r} needs {hi}); the shard "
                "is corrupt or truncated"
            )
        view = memoryview(data)
        for i in range(c0, c1):
            a, b = t.begin + i * rec.chunk_bytes, min(t.end, t.begin + (i + 1) * rec.chunk_bytes)
            _check_chunk(
                view[a - lo : b - lo], t.chunk_sha256[i], where, f"tensor {name!r} chunk {i}"
            )
        piece = view[want_lo - lo : want_hi - lo]
        return torch.frombuffer(bytearray(piece), dtype=dtype) if len(piece) else torch.empty(0)

    def read(self, name: str, lo: int, hi: int, *, space: str = DEFAULT_SPACE) -> torch.Tensor:
        """Flat elements ``[lo, hi)`` of checkpointed tensor ``name`` in state space ``space``."""
        parts = []
        for rec in self.manifest.shards_of(space):
            a, b = max(lo, rec.lo), min(hi, rec.hi)
            if a >= b:
                continue
            parts.append(self._read_span(rec, name, a - rec.lo, b - rec.lo))
        out = torch.cat(parts) if parts else torch.empty(0)
        if out.numel() != hi - lo:
            of = "" if space == DEFAULT_SPACE else f" in state space {space!r}"
            raise CorruptCheckpointError(f"range [{lo}, {hi}) of {name!r}{of} is not fully covered")
        return out

    def rng_state(self, rank: int, *, space: str | None = None) -> torch.Tensor | None:
        """The RNG state rank ``rank`` saved (with its shard of ``space``, if given), or None."""
        for rec in self.manifest.shards:
            if space is not None and rec.space != space:
                continue
            if rec.rank == rank and RNG_KEY in rec.tensors:
                n = 1
                for d in rec.tensors[RNG_KEY].shape:
                    n *= d
                return self._read_span(rec, RNG_KEY, 0, n)
        return None
