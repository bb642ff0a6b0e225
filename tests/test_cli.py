"""The ``shoal`` command end to end, as a user runs it: on its own embedded Ray instance, or
joining a running cluster (``cluster.address``; here the test session's Ray instance, which
spares a Ray start and stop per run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.test_tensorboard_log import read_scalars

TINY = [
    "model.n_layer=1",
    "model.d_model=32",
    "model.n_head=2",
    "model.seq_len=16",
    "data.max_bytes=200000",
    "cluster.workers=2",
]


@pytest.fixture
def cluster_address(ray_session) -> str:
    """``cluster.address=`` of the test session's Ray instance. ``shoal`` inherits this
    process's environment, which holds what that instance needs of a client (its
    authentication mode)."""
    return ray_session.get_runtime_context().gcs_address


def shoal(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO_ROOT,
    )


def test_help_teaches():
    out = shoal("--help")
    assert out.returncode == 0 and "run" in out.stdout and "status" in out.stdout
    run_help = shoal("run", "--help").stdout
    for text in ("cluster.workers", "strategy=", "resume=latest", "examples:"):
        assert text in run_help


def test_bad_config_exits_2_naming_the_field(tmp_path):
    out = shoal("run", "train.steps=-3", f"run_dir={tmp_path / 'x'}")
    assert out.returncode == 2
    assert "train.steps" in out.stderr and ">= 1" in out.stderr
    out = shoal("run", "data=text_file", f"data.path={tmp_path / 'missing.txt'}")
    assert out.returncode == 2 and "data.path" in out.stderr


def test_run_end_to_end_then_status_and_resume(tmp_path, cluster_address):
    run_dir = tmp_path / "run"
    out = shoal(
        "run",
        *TINY,
        "train.steps=12",
        "checkpoint.every=6",
        "train.sample_tokens=20",
        "train.tensorboard=true",
        f"run_dir={run_dir}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "succeeded" in out.stdout and "sample" in out.stdout
    for name in ("config.yaml", "metrics.jsonl", "status.json", "loss.png", "sample.txt"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "checkpoints" / "step-00000012" / "manifest.json").is_file()
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(12))
    assert records[-1]["loss"] < records[0]["loss"]
    board = read_scalars(run_dir / "tensorboard")
    assert board["loss"] == {r["step"]: pytest.approx(r["loss"]) for r in records}

    status = shoal("status", str(run_dir))
    assert status.returncode == 0 and "succeeded" in status.stdout and "12/12" in status.stdout

    # resume=latest in the same run folder continues from step 12 to 15, here on a
    # running cluster (the run above started and stopped its own Ray instance).
    out = shoal(
        "run",
        *TINY,
        "train.steps=15",
        "train.sample_tokens=0",
        f"run_dir={run_dir}",
        "resume=latest",
        f"cluster.address={cluster_address}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(15))


def test_worker_error_gives_nonzero_exit(tmp_path, cluster_address):
    out = shoal(
        "run",
        *TINY,
        "train.steps=20",
        "model._target_=tests.faulty_models.RaisingGPT",
        f"run_dir={tmp_path / 'bad'}",
        f"cluster.address={cluster_address}",
    )
    assert out.returncode == 1
    assert "worker 1" in out.stdout and "injected fault" in out.stdout
    assert json.loads(Path(tmp_path / "bad" / "status.json").read_text())["state"] == "failed"
