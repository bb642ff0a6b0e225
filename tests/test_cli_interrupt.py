"""Ctrl-C during ``shoal run``, sent to a real ``shoal`` process.

Once: the job is cancelled at the next step boundary and summarised. Twice:
it stops at once. Either way the exit code is 130, no traceback is printed,
and no process of the run's embedded Ray instance (GCS, raylet, agents,
workers) outlives the command.
"""

from __future__ import annotations

import importlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray  # noqa: F401 - ray puts its bundled psutil on sys.path

from actors.models.gpt import GPT
from tests.conftest import REPO_ROOT
from tests.test_cli import TINY

psutil = importlib.import_module("psutil")

# The file whose first line releases HeldGPT's hold (a path; set for the workers).
HOLD_AFTER_ENV = "SHOAL_TEST_HOLD_AFTER"
HOLD_CAP_S = 120.0  # a hang catcher: no test waits on a held step this long
SESSION_RE = re.compile(r"session_\d{4}-\d\d-\d\d_[\d_-]+\d")


class HeldGPT(GPT):
    """Holds every forward pass once ``$SHOAL_TEST_HOLD_AFTER`` has a line.

    Pointed at the run's ``metrics.jsonl``, the job logs its first step and
    then never finishes another: a cancel, which lets the steps already
    sent finish first, cannot complete, so the second Ctrl-C always meets a
    cancel in progress, however slow the machine. ``<that file>.held``
    appears once a step is held (a step sent before the first line was
    written may still finish; one sent after it cannot).
    """

    def forward(self, idx):
        after = os.environ.get(HOLD_AFTER_ENV)
        if after and _has_a_line(Path(after)):
            Path(after + ".held").touch()
            deadline = time.monotonic() + HOLD_CAP_S
            while time.monotonic() < deadline:
                time.sleep(0.1)
        return super().forward(idx)


def _has_a_line(path: Path) -> bool:
    try:
        return bool(path.read_text().strip())
    except OSError:
        return False


# The runs these tests start must react to SIGINT as under a terminal.
pytestmark = pytest.mark.usefixtures("default_sigint")


def _start(
    run_dir: Path, *overrides: str, env: dict[str, str] | None = None, own_group: bool = False
) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "run",
            *TINY,
            "train.steps=100000",
            "train.sample_tokens=0",
            f"run_dir={run_dir}",
            *overrides,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT), **(env or {})),
        start_new_session=own_group,
    )


def _ctrl_c(proc: subprocess.Popen, to_group: bool) -> None:
    """SIGINT to ``shoal``, or to its whole process group as a terminal's Ctrl-C sends it
    (which then reaches the Ray processes started in that group too)."""
    if to_group:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGINT)


def _kill_left(proc: subprocess.Popen, processes: dict[int, psutil.Process]) -> None:
    """After a failed test: nothing of this run may linger to disturb the next ones."""
    for p in [*processes.values(), psutil.Process(proc.pid)]:
        try:
            p.kill()
        except psutil.Error:
            pass


def _wait_for_first_step(proc: subprocess.Popen, run_dir: Path) -> None:
    _wait_for(proc, run_dir / "metrics.jsonl", has_a_line=True)


def _wait_for(proc: subprocess.Popen, path: Path, has_a_line: bool = False) -> None:
    deadline = time.monotonic() + 240  # a hang catcher
    while not (_has_a_line(path) if has_a_line else path.exists()):
        if proc.poll() is not None:
            pytest.fail(f"shoal run exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"no {path.name}"
        time.sleep(0.2)


def _ray_processes(proc: subprocess.Popen) -> dict[int, psutil.Process]:
    """The run's Ray processes: ``shoal``'s descendants, and any process naming their
    Ray session (e.g. one already re-parented)."""
    found = {p.pid: p for p in psutil.Process(proc.pid).children(recursive=True)}
    sessions = set()
    for p in list(found.values()):
        try:
            sessions.update(SESSION_RE.findall(" ".join(p.cmdline())))
        except psutil.Error:
            pass
    assert sessions, "no Ray session found among the run's processes"
    for p in psutil.process_iter(["cmdline"]):
        if any(s in a for s in sessions for a in p.info["cmdline"] or ()):
            found.setdefault(p.pid, p)
    found.pop(proc.pid, None)
    return found


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _assert_all_gone(processes: dict[int, psutil.Process]) -> None:
    deadline = time.monotonic() + 10  # a hang catcher, not a timing assertion
    alive = list(processes.values())
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if _running(p)]
    left = []
    for p in alive:
        try:
            left.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.Error:
            pass
    assert not left, "Ray processes outlived shoal:\n" + "\n".join(left)


@pytest.mark.parametrize("to_group", [False, True], ids=["process", "process_group"])
def test_second_ctrl_c_stops_at_once_and_leaves_nothing_running(to_group, tmp_path):
    run_dir = tmp_path / "run"
    proc = _start(
        run_dir,
        "model._target_=tests.test_cli_interrupt.HeldGPT",
        env={HOLD_AFTER_ENV: str(run_dir / "metrics.jsonl")},
        own_group=to_group,
    )
    processes: dict[int, psutil.Process] = {}
    try:
        _wait_for_first_step(proc, run_dir)
        _wait_for(proc, run_dir / "metrics.jsonl.held")
        processes = _ray_processes(proc)
        _ctrl_c(proc, to_group)
        time.sleep(0.3)
        processes.update(_ray_processes(proc))  # workers started since
        _ctrl_c(proc, to_group)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            _kill_left(proc, processes)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "Assertion" not in err, err[-3000:]
    assert "stopped at once" in err
    _assert_all_gone(processes)


def test_one_ctrl_c_cancels_at_a_step_boundary(tmp_path):
    run_dir = tmp_path / "run"
    proc = _start(run_dir)
    processes: dict[int, psutil.Process] = {}
    try:
        _wait_for_first_step(proc, run_dir)
        processes = _ray_processes(proc)
        _ctrl_c(proc, to_group=False)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            _kill_left(proc, processes)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "cancelled" in out and "cancelled by the user" in out, out
    _assert_all_gone(processes)
