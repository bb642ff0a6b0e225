"""``shoal checkpoints ls|verify|export`` on local and S3 checkpoints (no Ray needed)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from actors.data import BYTE_FACTS
from actors.task import build_model
from collectives.flat import FlatLayout, tied_aliases
from orchestrator.cli import main
from orchestrator.spec import JobSpec
from storage.checkpoint import Manifest, commit, step_dir
from storage.object_store import LocalStore, open_store
from tests.checkpoint_helpers import write_shard
from tests.test_jobs import TINY

pytest_plugins = ["tests.s3_server"]


def _checkpoint(store, step: int, world: int = 2) -> torch.nn.Module:
    """Save a tiny GPT's parameters (and a fake optimizer state) as a ``world``-shard checkpoint."""
    spec = JobSpec.from_overrides([*TINY, "strategy=zero2"])
    torch.manual_seed(step)
    model = build_model(spec.model, BYTE_FACTS)
    layout = FlatLayout.of(model)
    flat = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])
    exp_avg = torch.randn_like(flat)
    n = layout.numel
    bounds = [(r * n // world, (r + 1) * n // world) for r in range(world)]
    records = [
        write_shard(store, step, r, lo, hi, {"param": flat[lo:hi], "exp_avg": exp_avg[lo:hi]})
        for r, (lo, hi) in enumerate(bounds)
    ]
    manifest = Manifest(
        step=step,
        world_size=world,
        strategy="zero2",
        numel=n,
        layout=layout.to_json(),
        optimizer={"name": "adamw", "step_count": step},
        shards=records,
        config=spec.to_dict(),
        tied=tied_aliases(model),
        lineage="test",
    )
    commit(store, manifest, keep=5)
    return model


def test_ls_lists_committed_and_counts_partial(tmp_path, capsys):
    store = LocalStore(tmp_path)
    _checkpoint(store, 10)
    _checkpoint(store, 20, world=3)
    write_shard(store, 30, 0, 0, 4, {"param": torch.zeros(4)})  # in flight / abandoned
    assert main(["checkpoints", "ls", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in out[1:3]]
    assert [r[0] for r in rows] == ["10", "20"]
    assert [r[3] for r in rows] == ["2", "3"] and rows[0][4] == "zero2"
    assert "1 partial" in out[-1]


def test_verify_exit_codes_and_names_corrupt_object(tmp_path, capsys):
    store = LocalStore(tmp_path)
    _checkpoint(store, 10)
    _checkpoint(store, 20)
    assert main(["checkpoints", "verify", store.uri]) == 0
    shard = tmp_path / step_dir(20) / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["checkpoints", "verify", store.uri]) == 3
    out = capsys.readouterr().out
    assert f"ok      {store.uri}/{step_dir(10)}" in out
    assert "CORRUPT" in out and f"{step_dir(20)}/shard-00001.safetensors" in out
    # One checkpoint by its own URI.
    assert main(["checkpoints", "verify", f"{store.uri}/{step_dir(10)}"]) == 0


def test_export_loads_into_the_plain_model_with_tied_weights(tmp_path, capsys):
    store = LocalStore(tmp_path / "ck")
    saved = _checkpoint(store, 10)
    out = tmp_path / "model.safetensors"
    assert main(["checkpoints", "export", store.uri, "--out", str(out)]) == 0
    state = load_file(out)
    assert torch.equal(state["lm_head.weight"], state["wte.weight"])  # tied: under both names
    fresh = build_model(JobSpec.from_overrides(TINY).model, BYTE_FACTS)
    fresh.load_state_dict(state)  # strict: every key of the plain model, no extras
    for (name, p), (_, q) in zip(saved.named_parameters(), fresh.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    assert fresh.lm_head.weight is fresh.wte.weight


def test_s3_options_and_corrupt_export(s3_server, tmp_path, capsys):
    uri = f"s3://{s3_server.make_bucket()}/ck"
    store = open_store(uri, endpoint_url=s3_server.endpoint, path_style=True)
    _checkpoint(store, 5)
    opts = ["--endpoint-url", s3_server.endpoint, "--path-style"]
    assert main(["checkpoints", "ls", uri, *opts]) == 0
    assert f"{uri}/{step_dir(5)}" in capsys.readouterr().out
    assert main(["checkpoints", "verify", uri, *opts]) == 0
    key = f"{step_dir(5)}/shard-00000.safetensors"
    store.put(key, store.get(key)[:-8])  # truncated
    assert main(["checkpoints", "export", uri, "--out", str(tmp_path / "m.st"), *opts]) == 3
    assert "shard-00000" in capsys.readouterr().err and not (tmp_path / "m.st").exists()
    assert main(["checkpoints", "ls", "s3://no-such-bucket-shoal/x", *opts]) == 1
