"""Autoscaling on a real Ray autoscaler: Ray's fake multi-node provider.

A job with ``min_workers=1, max_workers=3`` is submitted to a cluster that has no worker
node (and a head with no CPU). Ray's autoscaler adds one-CPU nodes one after another; the
job starts on the first and grows as the others arrive. Then Ray drains the node of the
first worker (as on a spot-preemption notice) and the job moves that worker's state off
before it leaves. Then one node — the one running the last worker to join — is lost (its
raylet and everything it started are SIGKILLed), and the job survives it from buddy
replicas and finishes.

The scenario runs in a subprocess (``tests/autoscaling_scenario.py``): one process holds
one Ray connection, and this session already holds one (``ray_session``). It starts and
stops only its own Ray processes (never ``ray stop``, which ``AutoscalingCluster.start()``
runs and which would kill every Ray instance of the user on the machine).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKERS = 3
SCENARIO_TIMEOUT_S = 380


def _run_scenario(out: Path) -> tuple[dict, str]:
    """Run the scenario; returns its result file and its output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    env.pop("RAY_ADDRESS", None)  # never this session's Ray
    log = out / "scenario.log"
    out.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.autoscaling_scenario", str(out)],
            cwd=REPO_ROOT,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: swept below if anything is left
        )
        try:
            proc.wait(timeout=SCENARIO_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # the scenario cleans up and writes its result
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        finally:
            _sweep_process_group(proc.pid)
    output = log.read_text(errors="replace")
    result_file = out / "result.json"
    if not result_file.exists():
        pytest.fail(f"the scenario wrote no result (exit {proc.returncode}):\n{output[-6000:]}")
    return json.loads(result_file.read_text()), output


def _sweep_process_group(pgid: int) -> None:
    """Kill whatever the scenario left in its own process group (normally nothing)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _describe(result: dict, output: str) -> str:
    shown = {k: v for k, v in result.items() if k not in ("events", "timeline")}
    return (
        f"result: {json.dumps(shown, indent=1)}\n"
        f"timeline: {json.dumps(result.get('timeline'))}\n"
        f"events: {json.dumps(result.get('events'))}\n"
        f"output (tail):\n{output[-4000:]}"
    )


@pytest.mark.timeout(SCENARIO_TIMEOUT_S + 90)
def test_job_grows_with_the_autoscaler_moves_off_a_drained_node_and_survives_a_lost_one(tmp_path):
    if importlib.util.find_spec("ray.autoscaler._private.fake_multi_node.node_provider") is None:
        pytest.skip("this Ray has no fake multi-node autoscaler provider")
    result, output = _run_scenario(tmp_path / "autoscaling")
    if "cluster_error" in result:
        pytest.skip(f"Ray's fake autoscaling cluster cannot start here: {result['cluster_error']}")
    why = _describe(result, output)
    assert result["ok"], why
    assert result["worker_nodes_at_submit"] == 0, why  # the cluster starts with no worker node

    # Scale-up: the job trained with fewer than 3 workers first, then grew to 3 as the
    # autoscaler added nodes; the newcomers joined a running job at a step boundary.
    timeline = result["timeline"]
    sizes = [row["workers"] for row in timeline if row["state"] == "running"]
    assert sizes and sizes[0] < WORKERS and max(sizes) == WORKERS, why
    assert max(row["nodes"] for row in timeline) == WORKERS, why
    events = result["events"]
    names = [e["event"] for e in events]
    mid_run_joins = [e for e in events if e["event"] == "joined" and "step" in e]
    assert len(mid_run_joins) >= 1, why
    assert names.count("joined") >= WORKERS, why

    # A node drained mid-run: the job saw it, moved the worker's state off at a step
    # boundary and let it go, before and apart from the failure below.
    assert "drained" in result, f"the job ended before a node could be drained\n{why}"
    drained_id = result["drained"]["worker_id"]
    notices = [e["worker_id"] for e in events if e["event"] == "node-draining"]
    assert notices == [drained_id], why
    drains = [(e["worker_id"], e["reason"]) for e in events if e["event"] == "drained"]
    assert drains == [(drained_id, "node draining")], why
    assert "died" not in names[: names.index("drained")], why

    # A node lost mid-run: its worker died, the job recovered from buddy replicas
    # (no checkpoint) and finished every step. The node is removed right after a
    # step was seen; if the worker's copy of that step had not left yet
    # (replication is asynchronous), that one step is redone.
    assert "killed" in result, f"the job ended before a node could be removed\n{why}"
    assert result["state"] == "succeeded", why
    assert result["error"] is None, why
    died = [e for e in events if e["event"] == "died"]
    assert [e["pid"] for e in died] == [result["killed"]["worker_pid"]], why
    restored = [e for e in events if e["event"] == "restored-from-buddy"]
    assert len(restored) == 1 and names.index("died") < names.index("restored-from-buddy"), why
    assert "restored-from-checkpoint" not in names, why
    assert "stuck" not in names, why
    assert result["failures_survived"] == 1, why
    assert result["steps_redone"] <= 1, why
    assert result["final_step"] == result["steps"], why
    assert result["final_workers"] >= 1, why
    steps = result["metric_steps"]
    assert not steps["repeated"] and steps["in_order"], why
    # Every step has its record, except steps every rank had applied (and replicated) when
    # the worker died but whose results were lost with it: those are kept, not redone.
    died_during = int(died[0]["during"].removeprefix("step "))
    assert set(steps["missing"]) <= set(range(died_during, restored[0]["step"])), why
