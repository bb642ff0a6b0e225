"""Checkpoints keyed by state space: several spaces in one manifest, old manifests, validation."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load as st_load

from storage.checkpoint import (
    MANIFEST,
    CheckpointReader,
    CorruptCheckpointError,
    Manifest,
    commit,
    read_manifest,
    shard_key,
    step_dir,
    verify,
)
from storage.object_store import LocalStore
from tests.checkpoint_helpers import write_shard

# "dp": 10 elements over 2 ranks, unevenly; "server": 4 elements, all on rank 1.
DP_BOUNDS = [(0, 3), (3, 10)]
SERVER = (1, 0, 4)  # rank, lo, hi


def _state() -> dict[str, dict[str, torch.Tensor]]:
    return {
        "dp": {"param": torch.randn(10), "exp_avg": torch.randn(10)},
        "server": {"param": torch.randn(4), "momentum": torch.randn(4).double()},
    }


def _save_two_spaces(store: LocalStore, step: int, state, **manifest_fields) -> Manifest:
    records = [
        write_shard(store, step, r, lo, hi, {k: v[lo:hi] for k, v in state["dp"].items()})
        for r, (lo, hi) in enumerate(DP_BOUNDS)
    ]
    rank, lo, hi = SERVER
    records.append(write_shard(store, step, rank, lo, hi, state["server"], space="server"))
    manifest = Manifest(
        step=step,
        world_size=2,
        strategy="federated",
        numel=10,
        layout=[],
        optimizer={"step_count": step},
        shards=records,
        **manifest_fields,
    )
    commit(store, manifest, keep=5)
    return manifest


def test_two_spaces_save_and_read_back_with_uneven_ranges(tmp_path):
    store = LocalStore(tmp_path)
    state = _state()
    _save_two_spaces(store, 7, state)
    manifest = read_manifest(store, 7)
    assert manifest.spaces == {"dp": 10, "server": 4}  # derived at save, recorded, read back
    assert manifest.owner_ranges("dp") == {0: (0, 3), 1: (3, 10)}
    assert manifest.owner_ranges("server") == {1: (0, 4)}
    assert verify(store, manifest) == []
    reader = CheckpointReader(store, manifest)
    for lo, hi in [(0, 10), (2, 5), (9, 10)]:
        assert torch.equal(reader.read("param", lo, hi), state["dp"]["param"][lo:hi])
        assert torch.equal(
            reader.read("exp_avg", lo, hi, space="dp"), state["dp"]["exp_avg"][lo:hi]
        )
    for lo, hi in [(0, 4), (1, 3)]:
        for name, t in state["server"].items():
            assert torch.equal(reader.read(name, lo, hi, space="server"), t[lo:hi])
    with pytest.raises(CorruptCheckpointError, match="has no tensor 'momentum'"):
        reader.read("momentum", 0, 4)  # a server tensor is not in dp
    with pytest.raises(CorruptCheckpointError, match="not fully covered"):
        reader.read("param", 0, 5, space="server")
    # dp keeps its pre-space key; another space's key names it; all are plain safetensors.
    keys = sorted(o.key for o in store.list(step_dir(7) + "/"))
    assert keys == [
        f"{step_dir(7)}/{name}"
        for name in (
            MANIFEST,
            "shard-00000.safetensors",
            "shard-00001.safetensors",
            "shard-server-00001.safetensors",
        )
    ]
    server = store.get(f"{step_dir(7)}/shard-server-00001.safetensors")
    assert torch.equal(st_load(server)["momentum"], state["server"]["momentum"])
    with safe_open(tmp_path / step_dir(7) / "shard-server-00001.safetensors", "pt") as f:
        assert f.metadata()["space"] == "server"


def test_coverage_is_checked_per_space(tmp_path):
    store = LocalStore(tmp_path)
    state = _state()
    # The server shard holds [0, 4) but the manifest says the space has 5 elements.
    with pytest.raises(CorruptCheckpointError, match=r"do not cover \[0, 5\) of state space"):
        _save_two_spaces(store, 3, state, spaces={"dp": 10, "server": 5})
    assert not store.exists(f"{step_dir(3)}/{MANIFEST}")  # nothing was committed
    # dp complete and server complete elsewhere does not make up for a dp gap.
    _save_two_spaces(store, 4, state)
    path = tmp_path / step_dir(4) / MANIFEST
    raw = json.loads(path.read_text())
    raw["shards"] = [s for s in raw["shards"] if (s.get("space"), s["rank"]) != ("dp", 0)]
    path.write_text(json.dumps(raw))
    with pytest.raises(CorruptCheckpointError, match=r"do not cover \[0, 10\)$"):
        read_manifest(store, 4)


# Written by the code before state spaces existed (commit e8801b1): two dp shards of
# torch.arange(6.0), [0, 2) and [2, 6), no "spaces", no shard "space" or "save_id".
OLD_MANIFEST = (
    '{"config":{},"created_at":1.0,"data":{},"format":"shoal-flat-v2","layout":[{"name":"w",'
    '"offset":0,"shape":[2,3]}],"lineage":"run-a","numel":6,"optimizer":{"name":"adamw",'
    '"step_count":3},"shards":[{"chunk_bytes":4096,"header_bytes":112,"header_sha256":'
    '"243045fa581182d3e42c9e8966346b8fe4e3ecf9e1c8a9c86850e790ba1583ee","hi":2,"key":'
    '"shard-00000.safetensors","lo":0,"nbytes":120,"rank":0,"sha256":'
    '"50e4e0ed93492eb008088011e9b3c03e3e10e6bd30838118961605ac8a96947b","tensors":{"param":'
    '{"begin":112,"chunk_sha256":["22b6f43bd8d27738d3213f29e96b62d01d9d6c0ab4f9732aaae803186f'
    '51eab7"],"dtype":"F32","end":120,"shape":[2]}}},{"chunk_bytes":4096,"header_bytes":120,'
    '"header_sha256":"9d02668eeeabfa2be83425319734276f8b3368741ffd41401b5a057d1c1aafa3","hi":6,'
    '"key":"shard-00001.safetensors","lo":2,"nbytes":136,"rank":1,"sha256":'
    '"fa3d3edc45c36014393156e573b09cb73ffb188e86d66739c635fcd7fdf01157","tensors":{"param":'
    '{"begin":120,"chunk_sha256":["1180e36f58837887478f2d0dc12271b6ec4b103f20b533f8af7d44c313e27'
    'c18"],"dtype":"F32","end":136,"shape":[4]}}}],"step":3,"strategy":"zero2","tied":{},'
    '"world_size":2}'
)


def test_manifest_written_before_spaces_loads_as_dp(tmp_path):
    store = LocalStore(tmp_path)
    full = torch.arange(6, dtype=torch.float32)
    # A dp shard without a save id is byte for byte what the old writer wrote.
    for r, (lo, hi) in enumerate([(0, 2), (2, 6)]):
        write_shard(store, 3, r, lo, hi, {"param": full[lo:hi]})
    store.put(f"{step_dir(3)}/{MANIFEST}", OLD_MANIFEST.encode())
    manifest = read_manifest(store, 3)
    assert manifest.spaces == {"dp": 6} and {s.space for s in manifest.shards} == {"dp"}
    assert {s.save_id for s in manifest.shards} == {""}
    assert verify(store, manifest) == []
    assert torch.equal(CheckpointReader(store, manifest).read("param", 1, 5), full[1:5])


def test_current_manifest_stripped_of_space_fields_still_loads(tmp_path):
    store = LocalStore(tmp_path)
    full = torch.randn(10)
    records = [
        write_shard(store, 2, r, lo, hi, {"param": full[lo:hi]})
        for r, (lo, hi) in enumerate(DP_BOUNDS)
    ]
    commit(store, Manifest(2, 2, "zero1", 10, [], {}, records), keep=5)
    path = tmp_path / step_dir(2) / MANIFEST
    raw = json.loads(path.read_text())
    assert raw["spaces"] == {"dp": 10} and raw["shards"][0]["space"] == "dp"
    del raw["spaces"]
    for shard in raw["shards"]:
        del shard["space"], shard["save_id"]
    path.write_text(json.dumps(raw))
    manifest = read_manifest(store, 2)
    assert manifest.spaces == {"dp": 10} and verify(store, manifest) == []
    assert torch.equal(CheckpointReader(store, manifest).read("param", 0, 10), full)


def _shard0(raw: dict, **fields) -> dict:
    return {**raw, "shards": [{**raw["shards"][0], **fields}, *raw["shards"][1:]]}


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: {**raw, "spaces": ["dp"]},
        lambda raw: {**raw, "spaces": {**raw["spaces"], "server": -4}},
        lambda raw: {**raw, "spaces": {**raw["spaces"], "../server": 4}},
        lambda raw: {**raw, "spaces": {**raw["spaces"], "server": "4"}},
        lambda raw: {**raw, "spaces": {**raw["spaces"], "dp": 11}},
        lambda raw: {**raw, "spaces": {"server": 4}},  # numel 10 but no dp space
        lambda raw: _shard0(raw, space="stage/9"),
        lambda raw: _shard0(raw, space={"_target_": "os.system"}),
        lambda raw: _shard0(raw, save_id="../../x"),
        lambda raw: _shard0(raw, save_id="a" * 33),
        lambda raw: {k: v for k, v in raw.items() if k != "spaces"},  # server shard, no spaces
    ],
    ids=[
        "spaces-list",
        "size-negative",
        "name-escapes",
        "size-string",
        "dp-not-numel",
        "dp-missing",
        "unknown-space",
        "space-object",
        "save-id-path",
        "save-id-long",
        "spaces-stripped",
    ],
)
def test_malformed_space_fields_are_refused(tmp_path, damage):
    store = LocalStore(tmp_path)
    _save_two_spaces(store, 5, _state())
    path = tmp_path / step_dir(5) / MANIFEST
    path.write_text(json.dumps(damage(json.loads(path.read_text()))))
    with pytest.raises(CorruptCheckpointError, match="not a valid manifest"):
        read_manifest(store, 5)


def test_shard_keys_are_distinct_per_space_rank_and_save():
    assert shard_key(3) == "shard-00003.safetensors"
    assert shard_key(3, "expert/1.7", "a1") == "shard-expert-1.7-00003.a1.safetensors"
    triples = [
        (r, space, sid)
        for r in (0, 1, 12)
        for space in ("dp", "a", "a/00001", "stage/2", "stage/2/x", "expert/1.7")
        for sid in ("", "7", "00002", "b")
    ]
    assert len({shard_key(*t) for t in triples}) == len(triples)
    for space in ("", "2stage", "a-b", "a//b", "../x", "a/"):
        with pytest.raises(ValueError, match="state space"):
            shard_key(0, space)
    with pytest.raises(ValueError, match="save id"):
        shard_key(0, "dp", "x/y")
