"""shoal jobs through Ray's job service: ``shoal submit``, ``shoal jobs ...``, ``shoal status ID``.

The end-to-end tests start a real head node of their own (``ray start --head``
with the dashboard on 127.0.0.1, free ports, its own temp dir), separate from
the test session's Ray instance, and stop it by the PIDs of its processes —
never ``ray stop``, which would stop every Ray on the machine. Nothing here
calls ``ray.init`` for it: every check goes through the dashboard's HTTP API,
as a user on another machine would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from orchestrator.api import JobHandle
from orchestrator.job_driver import cluster_overrides
from orchestrator.remote_jobs import (
    RECORD_MARK,
    STATUS_MARK,
    DashboardUnreachable,
    RemoteJob,
    RemoteJobHandle,
    connect,
    merged_status,
    package,
    parse_log,
    resolve_address,
)
from orchestrator.spec import ConfigError, JobSpec
from orchestrator.status import JobState, JobStatus

BIN = Path(sys.executable).parent
SMALL = ["model=mlp", "data=digits", "train.log_every=10", "train.sample_tokens=0"]
WAIT_S = 240.0  # generous bounds for a loaded 2-core machine; never asserted on


# --------------------------------------------------------------------------- without a cluster


def _status_line(**fields) -> str:
    status = JobStatus(job_id="j", state=JobState.RUNNING, run_dir="/r", **fields)
    return STATUS_MARK + status.to_json().replace("\n", "")


def test_logs_split_into_lines_status_records_and_events():
    text = "\n".join(
        [
            "shoal[j] step 10/30  loss 1.0",
            _status_line(step=10, loss=1.0),
            RECORD_MARK + json.dumps({"step": 9, "loss": 1.0}),
            RECORD_MARK + json.dumps({"step": 10, "loss": 0.9}),
            # a recovery went back to step 10: the redone record replaces the first
            RECORD_MARK + json.dumps({"step": 10, "loss": 0.8}),
            STATUS_MARK + '{"job_id": "j", "sta',  # cut short by a kill: ignored
            'SHOAL_EVENT {"event": "joined", "rank": 0}',
        ]
    )
    log = parse_log(text)
    assert log.lines == ["shoal[j] step 10/30  loss 1.0"]
    assert log.status is not None and log.status.step == 10
    assert [r["loss"] for r in log.records] == [1.0, 0.8]
    assert log.events == [{"event": "joined", "rank": 0}]


class _Info:
    def __init__(self, status: str, message: str = ""):
        self.status, self.message = status, message


def test_a_driver_that_ended_without_its_last_line_is_not_shown_running():
    running = parse_log(_status_line(step=5))
    stopped = merged_status("j", _Info("STOPPED"), running)
    assert stopped.state == JobState.CANCELLED and "shoal jobs stop" in stopped.error
    crashed = merged_status("j", _Info("FAILED", "exit code 1"), parse_log(_status_line()))
    assert crashed.state == JobState.FAILED and "exit code 1" in crashed.error
    assert merged_status("j", _Info("RUNNING"), parse_log("")).state == JobState.STARTING


def test_the_driver_runs_on_its_cluster_with_a_lasting_run_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("SHOAL_RUNS_ROOT", str(tmp_path))
    out = cluster_overrides(["cluster.address=10.0.0.1:6379", "train.steps=5"], "job1")
    assert out == ["train.steps=5", "cluster.address=auto", f"run_dir={tmp_path / 'job1'}"]
    assert cluster_overrides(["run_dir=a/b"], "j")[-1] == f"run_dir={tmp_path / 'a/b'}"
    assert cluster_overrides(["run_dir=/abs/x"], "j")[-1] == "run_dir=/abs/x"


def test_packaging_sends_the_overrides_and_refuses_what_would_not_survive():
    spec = JobSpec.from_overrides(["train.steps=7", "model=mlp", "data=digits"])
    pkg = package(spec, working_dir=None)
    assert pkg.submission_id == spec.job_id
    assert pkg.entrypoint.startswith(f"python -m orchestrator.job_driver --job-id {spec.job_id}")
    assert pkg.entrypoint.endswith("train.steps=7 model=mlp data=digits")
    assert {Path(p).name for p in pkg.runtime_env["py_modules"]} >= {"orchestrator", "configs"}
    assert "working_dir" not in pkg.runtime_env and ".venv" in pkg.runtime_env["excludes"]
    with pytest.raises(ConfigError, match="--address"):
        package(JobSpec.from_overrides(["cluster.address=auto"]), working_dir=None)
    spec.config.train.steps = 8  # edited after composition: it would be lost on the way
    with pytest.raises(ConfigError, match="overrides"):
        package(spec, working_dir=None)


def test_no_dashboard_is_one_error_saying_how_to_start_one(monkeypatch):
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    assert resolve_address(None) == "http://127.0.0.1:8265"
    assert resolve_address("10.1.2.3:8265") == "http://10.1.2.3:8265"
    port = _free_port()
    with pytest.raises(DashboardUnreachable, match="ray start --head --dashboard-host"):
        connect(f"http://127.0.0.1:{port}")


# --------------------------------------------------------------------------- a real head node


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Head:
    """A head node of our own; ``stop()`` ends its processes by PID."""

    def __init__(self) -> None:
        # Short: Ray's unix socket paths under it must stay within ~107 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="shoal-rj-", dir="/tmp")
        self.dashboard_port = _free_port()
        self.metrics_port = _free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "PYTHONPATH")
        }
        # The job's entrypoint runs `python` from PATH: this virtualenv's.
        self.env["PATH"] = f"{BIN}{os.pathsep}{self.env.get('PATH', '')}"
        self.env["RAY_metrics_report_interval_ms"] = "1000"
        self.env["SHOAL_RUNS_ROOT"] = str(Path(self.temp_dir) / "runs")

    def start(self) -> None:
        ports = {
            "--port": _free_port(),
            "--dashboard-port": self.dashboard_port,
            "--metrics-export-port": self.metrics_port,
            "--ray-client-server-port": _free_port(),
            "--dashboard-agent-listen-port": _free_port(),
            "--dashboard-agent-grpc-port": _free_port(),
            "--runtime-env-agent-port": _free_port(),
        }
        args = [str(BIN / "ray"), "start", "--head", "--dashboard-host", "127.0.0.1"]
        args += [f"{k}={v}" for k, v in ports.items()]
        # 7 one-CPU workers of four jobs at once, on however many cores there are.
        args += ["--num-cpus", "8", "--temp-dir", self.temp_dir, "--disable-usage-stats"]
        done = subprocess.run(
            args, env=self.env, capture_output=True, text=True, timeout=120, cwd=self.temp_dir
        )
        if done.returncode != 0:
            self.stop()
            pytest.skip(f"`ray start --head` failed here: {done.stderr.strip()[-500:]}")

    def processes(self) -> list:
        psutil = _psutil()
        found = {}
        for p in psutil.process_iter(["cmdline"]):
            if any(self.temp_dir in a for a in p.info["cmdline"] or ()):
                found[p.pid] = p
                for child in _safe_children(p):
                    found[child.pid] = child
        return list(found.values())

    def stop(self) -> None:
        psutil = _psutil()
        procs = self.processes()
        for p in procs:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=3)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def shoal(self, *args: str, cwd: Path, timeout: float = WAIT_S) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "shoal"), *args],
            env=self.env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def submit(self, *overrides: str, cwd: Path) -> str:
        done = self.shoal("submit", "--address", self.address, *overrides, cwd=cwd)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()[-1]

    def job(self, job_id: str) -> RemoteJob:
        return RemoteJob.find(job_id, self.address)


def _psutil():
    import importlib

    import ray  # noqa: F401 - Ray bundles psutil

    return importlib.import_module("psutil")


def _safe_children(p) -> list:
    try:
        return p.children(recursive=True)
    except Exception:  # noqa: BLE001 - gone already
        return []


@pytest.fixture(scope="module")
def head():
    if not (BIN / "ray").exists():
        pytest.skip(f"no `ray` command next to {sys.executable}: cannot start a head node")
    node = Head()
    node.start()
    yield node
    node.stop()


@pytest.fixture(scope="module")
def jobs(head, tmp_path_factory) -> dict[str, str]:
    """The module's short jobs, submitted at once so that their start-ups overlap.

    ``first`` through ``shoal submit``; ``second`` and ``kill`` through the
    Python API, ``submit(spec, address=...)``. ``kill``'s controller is killed
    after its first checkpoint.
    """
    from orchestrator.api import submit

    workdir = tmp_path_factory.mktemp("workdir")
    (workdir / "notes.txt").write_text("uploaded with the job\n")
    first = head.submit(*SMALL, "train.steps=40", cwd=workdir)
    here = os.getcwd()
    os.chdir(workdir)  # submit() uploads the working directory: this small one
    try:
        kill = submit(
            JobSpec.from_overrides(
                [*SMALL, "train.steps=800", "checkpoint.every=10", "checkpoint.keep=1"]
            ),
            address=head.address,
        )
        second = submit(
            JobSpec.from_overrides([*SMALL, "train.steps=30", "cluster.workers=1"]),
            address=head.address,
        )
    finally:
        os.chdir(here)
    assert isinstance(kill, RemoteJobHandle) and isinstance(second, JobHandle)
    return {"workdir": str(workdir), "first": first, "second": second.job_id, "kill": kill.job_id}


def _wait(predicate, what: str, timeout: float = WAIT_S, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_killed_controller_is_restarted_and_the_job_finishes(head, jobs):
    job_id = jobs["kill"]
    job = head.job(job_id)
    _wait(lambda: job.status().last_checkpoint, "a committed checkpoint", poll=0.2)
    from ray.util.state import list_actors

    controllers = list_actors(
        address=head.address,
        filters=[("job_id", "=", job.info().job_id), ("class_name", "=", "JobController")],
        detail=True,
    )
    assert len(controllers) == 1 and controllers[0].name == f"shoal-{job_id}"
    os.kill(controllers[0].pid, signal.SIGKILL)

    final = job.wait(timeout=WAIT_S)
    assert final.state == JobState.SUCCEEDED, final.error
    assert final.step == 800 and final.failures_survived >= 1
    events = [e["event"] for e in job.log().events]
    assert "controller-restarted" in events
    runs = Path(head.env["SHOAL_RUNS_ROOT"])
    steps = [json.loads(line)["step"] for line in (runs / job_id / "metrics.jsonl").open()]
    assert steps == list(range(800))  # resumed from its checkpoint: every step once


def test_two_jobs_side_by_side_follow_list_and_status(head, jobs):
    """Two jobs on one cluster both finish; logs stream; ls and status report them."""
    first, second, cwd = jobs["first"], jobs["second"], Path(jobs["workdir"])
    follow = head.shoal("jobs", "logs", first, "--follow", "--address", head.address, cwd=cwd)
    assert follow.returncode == 0, follow.stdout + follow.stderr
    assert f"shoal[{first}] step 40/40" in follow.stdout
    assert STATUS_MARK not in follow.stdout and RECORD_MARK not in follow.stdout
    assert f"job {first}: succeeded" in follow.stdout

    job2 = head.job(second)
    final2 = job2.wait(timeout=WAIT_S)
    assert final2.state == JobState.SUCCEEDED, final2.error
    assert final2.step == 30

    listing = head.shoal("jobs", "ls", "--address", head.address, cwd=cwd)
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[0]: line.split() for line in listing.stdout.splitlines()[1:]}
    assert rows[first][1:3] == ["succeeded", "40/40"]
    assert rows[second][1:3] == ["succeeded", "30/30"] and rows[second][4] == "1"

    status = head.shoal("status", first, "--address", head.address, cwd=cwd)
    assert status.returncode == 0, status.stderr
    assert f"job {first}: succeeded" in status.stdout and "steps       40/40" in status.stdout
    # Two jobs, two run folders on the cluster, each with its own records.
    runs = Path(head.env["SHOAL_RUNS_ROOT"])
    for job_id, steps in ((first, 40), (second, 30)):
        lines = (runs / job_id / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == steps
    # What a RemoteJobHandle's metrics() reads: every step's record, from the logs.
    assert [r["step"] for r in job2.log().records] == list(range(30))


def test_stop_frees_every_actor_and_metrics_reach_rays_endpoint(head, jobs):
    cwd = Path(jobs["workdir"])
    job_id = head.submit(*SMALL, "train.steps=1000000", cwd=cwd)
    job = head.job(job_id)
    running = _wait(
        lambda: (s := job.status()).state == JobState.RUNNING and s.step >= 10 and s,
        "the long job to train",
    )
    pids = [w["pid"] for w in running.workers]
    assert len(pids) == 2

    def shoal_metrics() -> set[str]:
        url = f"http://127.0.0.1:{head.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        return {
            line.split("{")[0]
            for line in text.splitlines()
            if line.startswith("ray_shoal_") and f'job_id="{job_id}"' in line
        }

    names = _wait(
        lambda: (
            {"ray_shoal_loss", "ray_shoal_step", "ray_shoal_workers"} <= shoal_metrics()
            and shoal_metrics()
        ),
        "shoal's metrics on Ray's Prometheus endpoint",
    )
    assert {"ray_shoal_samples_per_second", "ray_shoal_worker_shard_bytes"} <= names
    assert _wait(job.actors_alive, "the job's actors in Ray's state API")

    stop = head.shoal("jobs", "stop", job_id, "--address", head.address, cwd=cwd)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert "every actor of it is gone" in stop.stdout
    assert job.actors_alive() == []
    psutil = _psutil()
    _wait(lambda: not any(psutil.pid_exists(p) for p in pids), "the workers' processes to exit")
    assert job.status().state == JobState.CANCELLED
