"""Issue 10's hardening: checkpoints are data, a run folder has one owner, errors are one line.

Most of these need no Ray: the checks they exercise run before Ray starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from actors.data import BYTE_FACTS
from orchestrator import JobSpec, JobState, submit
from orchestrator.cli import main
from orchestrator.preflight import (
    check_checkpoints,
    check_memory,
    model_shape,
    resume_mismatch,
    resume_target,
    worker_bytes_lower_bound,
)
from orchestrator.run_lock import RunFolderBusy, RunFolderLock
from orchestrator.spec import ConfigError
from storage.checkpoint import (
    MANIFEST,
    CorruptCheckpointError,
    Manifest,
    commit,
    committed_steps,
    latest_manifest,
    read_manifest,
    step_dir,
)
from storage.object_store import LocalStore, open_store
from tests.checkpoint_helpers import write_shard
from tests.conftest import REPO_ROOT
from tests.test_checkpoints_cli import _checkpoint
from tests.test_cli import TINY as CLI_TINY
from tests.test_cli import shoal
from tests.test_jobs import TINY, _spec


def _tiny_spec(tmp_path, *extra: str) -> JobSpec:
    return JobSpec.from_overrides([*TINY, f"run_dir={tmp_path / 'run'}", *extra])


def _rewrite_manifest(store: LocalStore, step: int, change) -> None:
    path = store.root / step_dir(step) / MANIFEST
    raw = json.loads(path.read_text())
    path.write_text(json.dumps(change(raw)))


# -- 1. a checkpoint is data, never code ---------------------------------------


def _plant_code(raw: dict, marker) -> dict:
    """What an attacker would write: callables nested in the recorded model config."""
    raw["config"]["model"]["n_layer"] = {"_target_": "os.makedirs", "name": str(marker)}
    raw["config"]["model"]["_target_"] = "os.makedirs"
    raw["config"]["model"]["name"] = str(marker)
    return raw


def test_manifest_with_code_in_its_config_runs_nothing(tmp_path, capsys):
    store = LocalStore(tmp_path / "ck")
    _checkpoint(store, 10)
    marker = tmp_path / "pwned"
    _rewrite_manifest(store, 10, lambda raw: _plant_code(raw, marker))
    out = tmp_path / "model.safetensors"
    assert main(["checkpoints", "ls", store.uri]) == 0
    assert main(["checkpoints", "verify", store.uri]) == 0
    assert main(["checkpoints", "export", store.uri, "--out", str(out)]) == 0
    # Export names come from the manifest's layout and tied record, not from a model it builds.
    from safetensors.torch import load_file

    assert "lm_head.weight" in load_file(out)
    # A resume builds the user's model and compares: the recorded config is never instantiated.
    spec = JobSpec.from_overrides(
        [*TINY, "strategy=zero2", f"run_dir={tmp_path / 'r'}", "train.steps=20", "resume=latest"]
    )
    spec.config.checkpoint.uri = store.uri
    check_checkpoints(spec, model_shape(spec, BYTE_FACTS))
    assert not marker.exists()


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: [1, 2, 3],
        lambda raw: {**raw, "tied": {"x": {"_target_": "os.makedirs", "name": "/tmp/x"}}},
        lambda raw: {**raw, "layout": [{"_target_": "builtins.open", "file": "/tmp/x"}]},
        lambda raw: {**raw, "shards": [{**raw["shards"][0], "key": "../../etc/passwd"}]},
        lambda raw: {**raw, "step": "10; rm -rf /"},
    ],
    ids=["json-list", "code-in-tied", "code-in-layout", "key-escapes", "step-not-int"],
)
def test_invalid_manifest_is_refused_in_one_line(tmp_path, capsys, damage):
    store = LocalStore(tmp_path / "ck")
    _checkpoint(store, 10)
    _checkpoint(store, 20)
    _rewrite_manifest(store, 20, damage)
    with pytest.raises(CorruptCheckpointError, match="not a valid manifest"):
        read_manifest(store, 20)
    capsys.readouterr()
    assert main(["checkpoints", "ls", store.uri]) == 0
    assert "unreadable manifest" in capsys.readouterr().out
    assert main(["checkpoints", "verify", store.uri]) == 3
    assert main(["checkpoints", "export", store.uri, "--out", str(tmp_path / "m.st")]) == 3
    err = capsys.readouterr().err
    assert "not a valid manifest" in err and "Traceback" not in err
    # resume=latest falls back to the previous checkpoint, as for any other damage.
    assert latest_manifest(store).step == 10
    spec = JobSpec.from_overrides(
        [*TINY, "strategy=zero2", f"run_dir={tmp_path / 'r'}", "train.steps=30", "resume=latest"]
    )
    spec.config.checkpoint.uri = store.uri
    assert resume_target(spec, store)[1].step == 10


def test_export_into_a_missing_folder_is_one_line(tmp_path, capsys):
    store = LocalStore(tmp_path / "ck")
    _checkpoint(store, 10)
    missing = tmp_path / "nowhere" / "m.safetensors"
    assert main(["checkpoints", "export", store.uri, "--out", str(missing)]) == 1
    assert "does not exist" in capsys.readouterr().err


# -- 2. a fresh run never destroys older checkpoints ------------------------------


def _commit(store, step: int, lineage: str, keep: int) -> list[int]:
    rec = write_shard(store, step, 0, 0, 4, {"param": torch.full((4,), float(step))})
    manifest = Manifest(step, 1, "ddp", 4, [], {"name": "adamw"}, [rec], lineage=lineage)
    return commit(store, manifest, keep=keep)


def test_retention_counts_only_its_own_lineage(tmp_path):
    store = LocalStore(tmp_path)
    for step in (100, 200):
        _commit(store, step, "old-run", keep=2)
    # Before: the new run's step 10 was pruned at once (two newer steps of another run).
    assert _commit(store, 10, "new-run", keep=2) == []
    assert _commit(store, 20, "new-run", keep=2) == []
    assert _commit(store, 30, "new-run", keep=2) == [10]
    assert committed_steps(store) == [20, 30, 100, 200]


def test_fresh_run_into_a_used_checkpoint_root_is_refused(tmp_path):
    spec = _tiny_spec(tmp_path)
    store = open_store(spec.checkpoint.uri)
    _commit(store, 10, "earlier", keep=5)
    with pytest.raises(ConfigError, match="resume=latest.*checkpoint.overwrite=true"):
        check_checkpoints(spec, model_shape(spec, BYTE_FACTS))
    shape = model_shape(spec, BYTE_FACTS)
    check_checkpoints(_tiny_spec(tmp_path, "checkpoint.overwrite=true"), shape)
    assert committed_steps(store) == [10]  # a check deletes nothing


def test_cli_refuses_a_used_folder_and_keeps_its_config(tmp_path):
    run_dir = tmp_path / "run"
    store = open_store(f"file://{run_dir}/checkpoints")
    _commit(store, 10, "earlier", keep=5)
    (run_dir / "config.yaml").write_text("mine\n")
    out = shoal("run", *CLI_TINY, f"run_dir={run_dir}", timeout=120)
    assert out.returncode == 2, out.stderr
    assert "resume=latest" in out.stderr and "checkpoint.overwrite" in out.stderr
    assert "Traceback" not in out.stderr
    assert (run_dir / "config.yaml").read_text() == "mine\n"
    assert committed_steps(store) == [10]


# -- 3. a run folder has one owner --------------------------------------------------


_HOLD = """
import sys, time
from orchestrator.run_lock import RunFolderLock
RunFolderLock(sys.argv[1], "holder").acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_run_folder_lock_refuses_a_second_owner_and_not_a_dead_one(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(run_dir)],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        (run_dir / "config.yaml").write_text("the holder's\n")
        with pytest.raises(RunFolderBusy, match=f"job holder \\(pid {holder.pid}"):
            RunFolderLock(run_dir, "second").acquire()
        # submit() refuses before writing anything into the folder.
        with pytest.raises(RunFolderBusy):
            submit(_tiny_spec(tmp_path))
        assert (run_dir / "config.yaml").read_text() == "the holder's\n"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The killed holder's lock file stays behind; its lock does not.
    assert (run_dir / ".shoal.lock").exists()
    lock = RunFolderLock(run_dir, "third")
    lock.acquire()
    lock.release()


# -- 5. user errors are one clear line ------------------------------------------------


def test_optimizer_mismatch_is_named_not_called_damage(tmp_path):
    store = LocalStore(tmp_path / "ck")
    _checkpoint(store, 10)
    spec = JobSpec.from_overrides(
        [
            *TINY,
            "strategy=zero2",
            f"run_dir={tmp_path / 'r'}",
            "train.steps=20",
            "train.optimizer=sgd",
            f"resume={store.uri}/{step_dir(10)}",
        ]
    )
    with pytest.raises(ConfigError) as e:
        check_checkpoints(spec, model_shape(spec, BYTE_FACTS))
    assert "train.optimizer" in str(e.value) and "train.optimizer=adamw" in str(e.value)
    assert "corrupt" not in str(e.value) and "damaged" not in str(e.value)


def test_resume_below_the_checkpoint_step_says_so(tmp_path):
    store = LocalStore(tmp_path / "ck")
    _checkpoint(store, 10)
    spec = JobSpec.from_overrides(
        [*TINY, "strategy=zero2", f"run_dir={tmp_path / 'r'}", "train.steps=8", "resume=latest"]
    )
    spec.config.checkpoint.uri = store.uri
    with pytest.raises(ConfigError, match="already at step 10.*train.steps=8"):
        check_checkpoints(spec, model_shape(spec, BYTE_FACTS))


def test_model_too_large_names_its_size_and_the_memory_there(tmp_path):
    spec = _tiny_spec(tmp_path, "cluster.workers=2")
    numel = model_shape(spec, BYTE_FACTS).numel
    per_worker = worker_bytes_lower_bound(numel, spec)
    assert per_worker == 16 * numel  # ddp + adamw: params, grads, two moments, fp32
    zero3 = _tiny_spec(tmp_path, "cluster.workers=2", "strategy=zero3")
    assert worker_bytes_lower_bound(numel, zero3) == 8 * numel  # all of it halved over 2
    check_memory(numel, spec, available=2 * per_worker)
    with pytest.raises(ConfigError, match=f"{numel:,} parameters need at least"):
        check_memory(numel, spec, available=2 * per_worker - 1)
    # End to end: refused before Ray starts (exit 2), naming both sizes.
    big = ["model.n_layer=96", "model.d_model=12288", "model.n_head=96"]
    out = shoal("run", *big, f"run_dir={tmp_path / 'big'}", timeout=120)
    assert out.returncode == 2, out.stderr
    assert "parameters need at least" in out.stderr and "available" in out.stderr


# -- 6./8. checks before Ray, and the cancel summary ----------------------------------


def test_resume_latest_with_nothing_to_resume_fails_before_ray(tmp_path):
    out = shoal("run", *CLI_TINY, f"run_dir={tmp_path / 'none'}", "resume=latest", timeout=120)
    assert out.returncode == 2
    assert "no committed checkpoint" in out.stderr and "Traceback" not in out.stderr
    assert "starting workers" not in out.stderr


def test_cancel_reports_the_newest_committed_checkpoint(ray_session, tmp_path):
    spec = _spec(tmp_path, "cancel-ck", "train.steps=100000", "checkpoint.every=2")
    handle = submit(spec)
    while handle.status().step < 5:
        time.sleep(0.2)
    handle.cancel()
    final = handle.wait(timeout=120)
    assert final.state == JobState.CANCELLED
    assert {w["role"] for w in final.workers} == {"worker"}  # every member row names its role
    store = open_store(spec.checkpoint.uri)
    newest = committed_steps(store)[-1]
    assert final.last_checkpoint == f"{store.uri}/{step_dir(newest)}"
    # Every checkpoint of this run names its lineage and its tied weights.
    manifest = read_manifest(store, newest)
    assert manifest.lineage == spec.job_id and manifest.tied == {"lm_head.weight": "wte.weight"}


def test_job_errors_are_one_line_with_the_traceback_in_the_run_folder(tmp_path):
    from types import SimpleNamespace

    from orchestrator.controller import ERROR_LOG, JobController
    from storage.object_store import StoreError

    fake = SimpleNamespace(run_dir=tmp_path)
    # A store's or a checkpoint's error is the user's to act on: its message alone.
    msg = JobController._describe(fake, StoreError("s3://b/x: bucket does not exist"))
    assert msg == "s3://b/x: bucket does not exist"
    assert not (tmp_path / ERROR_LOG).exists()
    try:
        {}["missing"]
    except KeyError as e:
        msg = JobController._describe(fake, e)
    assert "\n" not in msg and msg.startswith("KeyError: 'missing'") and ERROR_LOG in msg
    assert "Traceback" in (tmp_path / ERROR_LOG).read_text()


def test_resume_on_other_data_is_refused_naming_data(tmp_path):
    """A checkpoint records its data's fingerprint; other data (a file, a tokenizer) is refused."""
    store = LocalStore(tmp_path / "ck")
    _checkpoint(store, 10)
    spec = JobSpec.from_overrides([*TINY, "strategy=zero2", f"run_dir={tmp_path / 'r'}"])
    layout = model_shape(spec, BYTE_FACTS).layout
    saved = dataclasses.replace(read_manifest(store, 10), data={"fingerprint": "aaaa"})
    problem = resume_mismatch(saved, layout, spec, "the-uri", fingerprint="bbbb")
    assert problem.startswith("data: checkpoint the-uri was trained on other data")
    assert resume_mismatch(saved, layout, spec, "the-uri", fingerprint="aaaa") is None
    # Checkpoints written before fingerprints were recorded still resume.
    assert resume_mismatch(read_manifest(store, 10), layout, spec, "u", fingerprint="bbbb") is None
