"""Volunteers replicating expert hosts in a ``strategy=moe`` job: real `shoal volunteer join`
processes on 127.0.0.1.

Three volunteers join a running MoE job through its gateway: two honest, one
that scales every answer by -5. Each becomes a replica of an expert host's
slot and takes a share of the slot's tokens. A volunteer's first answers are
always spot-checked against its host, so the liar is caught at once, banned,
and its answer replaced by the host's; the honest ones' answers and
gradients are used, and they are credited. One honest volunteer is SIGKILLed
once it has worked: its calls are answered by its host until the gateway
notices it is gone. Since a replica computes what its
host would, the job's final trunk and experts equal a one-process run's
(``tests/test_moe_jobs.py``'s reference) — volunteers or not — up to the
rounding of summing gradients in another order.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from actors.gateway_actor import read_address
from orchestrator import JobState, submit
from storage.gateway_trust import create_token, gateway_dir
from tests.conftest import REPO_ROOT
from tests.test_moe_jobs import EXACT, _final_state, _spec, moe_reference

pytestmark = pytest.mark.usefixtures("default_sigint")

ATOL = 1e-4  # looser than the MoE jobs' 2e-5: volunteers' gradients are summed in another order


def _join(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", *argv],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _work_done(handle, name: str) -> int:
    rows = (handle.status().program or {}).get("volunteers", [])
    return sum(v["work_done"] for v in rows if v["name"] == name)


def test_volunteer_replicas_serve_experts_and_a_liar_is_banned(ray_session, tmp_path):
    spec = _spec(
        tmp_path,
        "moe-volunteers",
        *EXACT,
        "strategy.expert_hosts=2",
        "cluster.workers=1",
        "train.steps=60",
        "checkpoint.every=60",
        "gateway.enabled=true",
        "gateway.host=127.0.0.1",
        "gateway.port=0",
        "gateway.spot_check_min=0.2",
    )
    tokens = {name: create_token(spec.run_dir, name) for name in ("ann", "cy", "mallory")}
    handle = submit(spec)
    address = read_address(spec.run_dir, timeout_s=120)
    assert address, "the gateway did not start"
    ca = str(gateway_dir(spec.run_dir) / "ca.pem")
    honest = {
        name: _join(
            ["orchestrator.cli", "volunteer", "join", "--gateway", address]
            + ["--token", tokens[name], "--ca", ca, "--name", name]
        )
        for name in ("ann", "cy")
    }
    liar = _join(["tests.malicious_volunteer", address, tokens["mallory"], ca])
    procs = [*honest.values(), liar]
    try:
        while _work_done(handle, "cy") == 0:
            assert not handle.done(), "the job ended before volunteer cy did any work"
            time.sleep(0.1)
        os.kill(honest["cy"].pid, signal.SIGKILL)
        status = handle.wait(timeout=300)
        assert honest["ann"].wait(timeout=60) == 0  # the job's end tells it to leave
    finally:
        for p in procs:
            p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
    assert status.state == JobState.SUCCEEDED, status.error
    rows = {v["name"]: v for v in status.program["volunteers"]}
    assert rows["mallory"]["banned"] and rows["mallory"]["credit"] == 0, rows
    assert rows["ann"]["work_done"] > 0 and rows["ann"]["credit"] > 0, rows
    assert not rows["ann"]["banned"] and rows["ann"]["role"].startswith("expert host")
    replicas = status.program["replicas"]
    assert sum(r["calls"] for k, r in replicas.items() if k.endswith(rows["ann"]["id"])) > 0
    events = [json.loads(x) for x in (spec.run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["name"] for e in events if e["event"] == "volunteer-banned"] == ["mallory"]
    assert any(e["event"] == "volunteer-lost" and e.get("name") == "cy" for e in events)

    trunk, experts = _final_state(spec)
    ref_trunk, ref_experts, _ = moe_reference(spec, spec.train.steps)
    torch.testing.assert_close(trunk, ref_trunk, atol=ATOL, rtol=0)
    torch.testing.assert_close(experts, ref_experts, atol=ATOL, rtol=0)
