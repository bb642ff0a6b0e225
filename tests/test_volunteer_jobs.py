"""Volunteers in a federated job: real `shoal volunteer join` processes on 127.0.0.1.

Four volunteers join a running job through its gateway (TLS, a token each):
three honest, one that scales its updates by -5. Volunteers take over the
work of sampled clients; a volunteer's first results are always
spot-checked against a trusted client actor, so the liar is caught and
banned (its update replaced by the trusted one), the honest ones are
credited, and one honest volunteer SIGKILLed mid-run is a dropout. The run
reaches the accuracy of the same run without volunteers within 0.03
(dropouts change which updates a round averages, nothing else).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from actors.gateway_actor import read_address
from orchestrator import JobSpec, JobState, submit
from storage.gateway_trust import create_token, gateway_dir
from tests.conftest import REPO_ROOT

# Volunteers are Ctrl-C'd at the end: they must react to SIGINT as under a terminal.
pytestmark = pytest.mark.usefixtures("default_sigint")

JOB = [
    "strategy=federated",
    "model=mlp",
    "model.hidden=[32]",
    "data=digits",
    "strategy.clients=8",
    "strategy.per_round=8",
    "strategy.aggregator=trimmed_mean",
    "strategy.trim=0.15",
    "strategy.local_epochs=4",
    "train.steps=120",
    "train.eval_every=20",
    "train.sample_tokens=0",
    "cluster.cpus_per_worker=0.5",
    "strategy.server_cpus=0.5",
]


def _events(spec: JobSpec) -> list[dict]:
    return [json.loads(x) for x in (spec.run_dir / "events.jsonl").read_text().splitlines()]


def _join(address: str, token: str, ca: str, name: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "orchestrator.cli", "volunteer", "join"]
    cmd += ["--gateway", address, "--token", token, "--ca", ca, "--name", name]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_volunteers_join_a_liar_is_banned_and_a_killed_one_is_a_dropout(ray_session, tmp_path):
    baseline = JobSpec.from_overrides([*JOB, f"run_dir={tmp_path / 'alone'}"])
    alone_handle = submit(baseline)  # the same run without volunteers, meanwhile

    spec = JobSpec.from_overrides(
        [
            *JOB,
            f"run_dir={tmp_path / 'vol'}",
            "gateway.enabled=true",
            "gateway.host=127.0.0.1",
            "gateway.port=0",
            "gateway.spot_check_min=0.2",
        ]
    )
    tokens = {name: create_token(spec.run_dir, name) for name in ("ann", "bob", "cy", "mallory")}
    handle = submit(spec)
    address = read_address(spec.run_dir, timeout_s=120)
    assert address, "the gateway did not start"
    ca = str(gateway_dir(spec.run_dir) / "ca.pem")
    procs = {n: _join(address, tokens[n], ca, n) for n in ("ann", "bob", "cy")}
    liar = subprocess.Popen(
        [sys.executable, "-m", "tests.malicious_volunteer", address, tokens["mallory"], ca],
        cwd=REPO_ROOT,
    )
    try:
        deadline = time.time() + 180
        while sum(r.get("volunteer_results", 0) for r in handle.metrics()) < 12:
            assert not handle.done(), handle.status().error
            assert time.time() < deadline, "the volunteers did no work"
            time.sleep(0.1)
        os.kill(procs["cy"].pid, signal.SIGKILL)
        status = handle.wait(timeout=200)
        # The job's end tells volunteers it is over: the honest ones still connected leave.
        for name in ("ann", "bob"):
            assert procs[name].wait(timeout=60) == 0
    finally:
        for p in [*procs.values(), liar]:
            p.send_signal(signal.SIGINT)  # Ctrl-C: leave cleanly
        for p in [*procs.values(), liar]:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
    assert status.state == JobState.SUCCEEDED, status.error
    alone = alone_handle.wait(timeout=200)
    assert alone.state == JobState.SUCCEEDED, alone.error
    events = _events(spec)
    banned = [e for e in events if e["event"] == "volunteer-banned"]
    assert [e.get("volunteer_id") or e.get("name") for e in banned] == ["mallory"], banned
    assert any(e["event"] == "volunteer-lost" and "cy" in json.dumps(e) for e in events)
    rows = {v["name"]: v for v in status.program["volunteers"]}
    assert rows["mallory"]["banned"] and rows["mallory"]["credit"] == 0
    assert rows["ann"]["credit"] > 0 and rows["bob"]["credit"] > 0
    assert rows["ann"]["work_done"] > 0 and not rows["ann"]["banned"]
    assert abs(status.accuracy - alone.accuracy) <= 0.03, (status.accuracy, alone.accuracy)
