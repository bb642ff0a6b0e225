"""A shoal job on Ray's fake multi-node autoscaler: it grows as nodes are added, moves off a
node Ray drains, survives one removed.

Run by ``tests/test_autoscaling.py`` in a subprocess (one Ray per process, and the test
session already has one)::

    python -m tests.autoscaling_scenario OUT_DIR

The cluster is the one ``ray.cluster_utils.AutoscalingCluster`` builds — a head with no CPUs
and the ``fake_multinode`` node provider, whose "nodes" are raylets on this machine started
by the autoscaler — but started here rather than through ``AutoscalingCluster.start()``:
that runs ``ray stop --force`` before and after, which kills every Ray process of the
user on the machine (the test session's own instance, and anyone else's), and it reads
``fake_multi_node/example.yaml``, which Ray's wheels do not ship. Here the head is a
``ray.cluster_utils.Cluster`` on a free port, the config is the one AutoscalingCluster
generates (with the provider pointed at that port), and shutting down stops only the
processes this script started.

The job asks for 3 one-CPU workers (``min_workers=1``) on a cluster that has no CPU at
all: it waits for capacity, Ray's autoscaler adds one-CPU nodes (one per update round), and
each new worker joins at a step boundary. Once all three train, Ray is asked to drain the
node of the first (a preemption notice with a deadline): that worker's state moves to the
others at a step boundary and it leaves. Then the node that hosts the last to join is lost
(its raylet and everything the raylet started are SIGKILLed); the job recovers from buddy
replicas and finishes. Until that loss the steps are paced (``PacedGPT``), so that the job
cannot run out of steps however long the autoscaler takes; after it they run at full speed.
Everything observed goes to ``OUT_DIR/result.json`` (written even on failure); the test
asserts on it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import ray

from actors.models.gpt import GPT
from orchestrator import JobSpec, JobState, submit

WORKERS = 3
# Paced (at least PACE_S a step) until the node is lost, these last over a minute of
# scale-up, draining and node loss (~100 steps, 15 s, here); the rest then run at full
# speed (~5-30 ms a step).
STEPS = 600
PACE_S = 0.12
# Set for the job's processes: the file whose existence paces the steps.
PACE_FILE_ENV = "SHOAL_TEST_PACE_FILE"
# One autoscaler round every this many seconds; the fake provider starts one node per round,
# so nodes arrive one after another and the job can be seen to grow.
UPDATE_INTERVAL_S = 8
# Steps the full membership trains together before a node is drained, and the
# remaining workers before another node is lost.
KILL_AFTER_STEPS = 10
# The drained node's deadline (it is never enforced here: the node stays up).
DRAIN_DEADLINE_S = 120
POLL_S = 0.5
NODE_TYPE = "cpu_node"
JOB_TIMEOUT_S = 240.0

# The config ``AutoscalingCluster`` generates, from the fake provider's example.yaml.
BASE_CONFIG: dict[str, Any] = {
    "cluster_name": "shoal-fake-multinode",
    "max_workers": WORKERS,
    "provider": {
        "type": "fake_multinode",
        "use_node_id_as_ip": True,
        "disable_node_updaters": True,
        "disable_launch_config_check": True,
    },
    "head_node_type": "ray.head.default",
    "auth": {},
    "upscaling_speed": 1.0,
    # Long: a node is removed only by the test, never for being idle.
    "idle_timeout_minutes": 10,
    "docker": {},
    "initialization_commands": [],
    "setup_commands": [],
    "head_setup_commands": [],
    "worker_setup_commands": [],
    "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
    "file_mounts": {},
    "cluster_synced_files": [],
    "file_mounts_sync_continuously": False,
    "rsync_exclude": [],
    "rsync_filter": [],
}


def _psutil():
    """Ray's own copy of psutil (ray/thirdparty_files, on sys.path once ray is imported)."""
    import psutil

    return psutil


class PacedGPT(GPT):
    """Each forward pass takes at least ``PACE_S`` while ``$SHOAL_TEST_PACE_FILE`` exists.

    The scenario removes the file once the node is lost: however slowly the autoscaler
    adds nodes, the job cannot finish before the events it waits for.
    """

    def forward(self, idx):
        pace = os.environ.get(PACE_FILE_ENV)
        if pace and os.path.exists(pace):
            time.sleep(PACE_S)
        return super().forward(idx)


class Terminated(Exception):
    """SIGTERM from the test (its timeout): clean up and report."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def cluster_config(gcs_address: str) -> dict[str, Any]:
    config = json.loads(json.dumps(BASE_CONFIG))
    config["provider"]["gcs_address"] = gcs_address
    config["available_node_types"] = {
        "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
        NODE_TYPE: {
            "resources": {"CPU": 1, NODE_TYPE: 1, "object_store_memory": 100 * 2**20},
            "node_config": {},
            "min_workers": 0,
            "max_workers": WORKERS,
        },
    }
    return config


class FakeAutoscalingCluster:
    """A head with the fake multi-node autoscaler; stops only the processes it started."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.cluster = None
        self.address: str | None = None
        self.temp_dir: str | None = None
        self._seen: dict[int, Any] = {}

    def start(self) -> str:
        from ray.cluster_utils import Cluster

        ip = ray.util.get_node_ip_address()
        port = _free_port()
        self.address = f"{ip}:{port}"
        config_path = self.workdir / "autoscaling.json"
        config_path.write_text(json.dumps(cluster_config(self.address)))
        # Read by the autoscaler (the head's monitor process inherits them).
        os.environ["RAY_FAKE_CLUSTER"] = "1"
        os.environ["AUTOSCALER_UPDATE_INTERVAL_S"] = str(UPDATE_INTERVAL_S)
        self.temp_dir = tempfile.mkdtemp(prefix="shoal-as-")
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,
                "gcs_server_port": port,
                "autoscaling_config": str(config_path),
                "include_dashboard": False,
                # A short socket path (Unix sockets are limited to ~107 bytes), and no
                # /tmp/ray/ray_current_cluster for others' `ray.init("auto")` to find.
                "temp_dir": self.temp_dir,
                "object_store_memory": 100 * 2**20,
                # Notice a lost node within seconds.
                "_system_config": {
                    "health_check_period_ms": 1000,
                    "health_check_failure_threshold": 3,
                },
            },
        )
        got = self.cluster.address
        if got != self.address:
            raise RuntimeError(f"the head is at {got}, not at {self.address} as configured")
        self.remember_processes()
        return self.address

    def remember_processes(self) -> None:
        """Note every process below this one (the head's, and the nodes the autoscaler started)."""
        for p in _psutil().Process().children(recursive=True):
            self._seen.setdefault(p.pid, p)

    def shutdown(self, keep_logs: Path | None = None) -> list[int]:
        """Stop the head, then whatever this script started that is still running.

        Returns the pids of the processes that were still running after the head stopped.
        ``keep_logs``: copy Ray's logs there before the temporary folder is removed.
        """
        self.remember_processes()
        if self.cluster is not None:
            try:
                self.cluster.shutdown()
            except Exception:  # noqa: BLE001 - the sweep below still runs
                traceback.print_exc()
        psutil = _psutil()
        left = [p for p in self._seen.values() if p.is_running()]
        for p in left:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        # A short grace: with the head (and its GCS) gone, the autoscaler's nodes' raylets
        # and agents do not finish a graceful exit (it waits on the GCS); they are killed.
        _, alive = psutil.wait_procs(left, timeout=2)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        if self.temp_dir is not None:
            logs = Path(self.temp_dir) / "session_latest" / "logs"
            if keep_logs is not None and logs.is_dir():
                shutil.copytree(logs, keep_logs, dirs_exist_ok=True)
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        return [p.pid for p in left]


def worker_nodes() -> list[dict[str, Any]]:
    return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get(NODE_TYPE)]


def kill_node_of(pid: int) -> dict[str, Any]:
    """Lose the (fake) node running worker process ``pid``: SIGKILL its raylet and everything
    the raylet started (workers, agents), as when a machine goes away.

    Killing the raylet alone is not enough here: its parent, the autoscaler process that
    started the fake node, does not reap it, and a Ray worker takes a raylet that is a zombie
    for a live one, so the workers on a "lost" node would go on training.
    """
    worker = _psutil().Process(pid)
    raylet = worker.parent()
    if raylet is None or "raylet" not in raylet.name():
        raise RuntimeError(f"the parent of worker pid {pid} is not a raylet: {raylet}")
    socket_arg = next((a for a in raylet.cmdline() if a.startswith("--raylet_socket_name")), "")
    node = [raylet, *raylet.children(recursive=True)]
    for p in node:
        try:
            p.kill()
        except _psutil().NoSuchProcess:
            pass
    return {
        "worker_pid": pid,
        "raylet_pid": raylet.pid,
        "node_pids": [p.pid for p in node],
        "raylet_socket": socket_arg.partition("=")[2],
    }


def drain_node_of(worker: dict[str, Any]) -> dict[str, Any]:
    """Ask Ray to drain the node running ``worker`` (a status row), with a deadline.

    The same request Ray's autoscaler makes before removing a node, and what
    ``ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`` sends on a spot
    notice; the node keeps running, but Ray places nothing new on it.
    """
    from ray.core.generated import autoscaler_pb2

    gcs = ray._raylet.GcsClient(address=ray.get_runtime_context().gcs_address)
    deadline_ms = int(time.time() * 1000) + DRAIN_DEADLINE_S * 1000
    accepted, why = gcs.drain_node(
        worker["node_id"],
        autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
        "shoal test: spot preemption notice",
        deadline_ms,
    )
    if not accepted:
        raise RuntimeError(f"Ray refused to drain node {worker['node_id']}: {why}")
    return {"worker_id": worker["worker_id"], "pid": worker["pid"], "node_id": worker["node_id"]}


def job_spec(run_dir: Path, address: str) -> JobSpec:
    return JobSpec.from_overrides(
        [
            "strategy=zero2",
            "model._target_=tests.autoscaling_scenario.PacedGPT",
            "model.n_layer=1",
            "model.d_model=32",
            "model.n_head=2",
            "model.seq_len=16",
            "data.max_bytes=200000",
            f"run_dir={run_dir}",
            "train.sample_tokens=0",
            "train.warmup_steps=2",
            f"train.steps={STEPS}",
            "train.global_batch=6",
            "checkpoint.every=0",
            f"cluster.address={address}",
            f"cluster.workers={WORKERS}",
            "cluster.min_workers=1",
            f"cluster.max_workers={WORKERS}",
            "cluster.cpus_per_worker=1",
            "cluster.start_timeout_s=120",
            "elastic.wait_timeout_s=120",
        ]
    )


def _trained_since(st: Any, mark: int | None) -> bool:
    """Whether the job is running and has trained KILL_AFTER_STEPS steps since step ``mark``."""
    return mark is not None and st.state == JobState.RUNNING and st.step >= mark + KILL_AFTER_STEPS


def scenario(out: Path, result: dict[str, Any], cluster: FakeAutoscalingCluster) -> None:
    t0 = time.monotonic()

    def now() -> float:
        return round(time.monotonic() - t0, 2)

    try:
        address = cluster.start()
    except Exception as e:
        result["cluster_error"] = f"{type(e).__name__}: {e}"
        raise
    result["address"] = address
    result["cluster_started_s"] = now()
    pace = out / "pace"
    pace.touch()  # removed once the node is lost
    ray.init(
        address=address,
        namespace="shoal",
        logging_level=logging.WARNING,
        runtime_env={
            "env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", ""), PACE_FILE_ENV: str(pace)}
        },
    )
    result["worker_nodes_at_submit"] = len(worker_nodes())
    spec = job_spec(out / "run", address)
    handle = submit(spec)
    result["run_dir"] = str(spec.run_dir)
    timeline: list[dict[str, Any]] = []
    result["timeline"] = timeline
    killed = None
    drained = None
    drained_at: int | None = None  # the step at which the drained worker had left
    full_at: int | None = None  # the step at which all WORKERS were first seen training
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not handle.done() and time.monotonic() < deadline:
        st = handle.status()
        row = {
            "t": now(),
            "state": st.state.value,
            "step": st.step,
            "epoch": st.epoch,
            "workers": len(st.workers or []),
            "nodes": len(worker_nodes()),
        }
        if not timeline or any(timeline[-1][k] != row[k] for k in row if k not in ("t", "step")):
            timeline.append(row)
            print(json.dumps(row), flush=True)
        cluster.remember_processes()
        if full_at is None and row["workers"] == WORKERS and st.state == JobState.RUNNING:
            full_at = st.step
        if drained is None and _trained_since(st, full_at):
            # The whole membership has trained together: Ray drains the first
            # joiner's node, as on a spot-preemption notice.
            drained = drain_node_of(st.workers[0])
            drained.update(t=now(), step=st.step, epoch=st.epoch)
            result["drained"] = drained
            print("drained", json.dumps(drained), flush=True)
        if (
            drained is not None
            and drained_at is None
            and st.state == JobState.RUNNING
            and drained["worker_id"] not in [w["worker_id"] for w in st.workers]
        ):
            drained_at = st.step
        if killed is None and _trained_since(st, drained_at):
            # Then a node is lost without notice: the last joiner's.
            killed = kill_node_of(handle.worker_pids()[-1])
            pace.unlink()  # the rest at full speed
            killed.update(t=now(), step=st.step, epoch=st.epoch)
            result["killed"] = killed
            print("killed", json.dumps(killed), flush=True)
        time.sleep(POLL_S)
    final = handle.wait(timeout=max(1.0, deadline - time.monotonic()))
    result["job_s"] = now()
    result["state"] = final.state.value
    result["error"] = final.error
    result["failures_survived"] = final.failures_survived
    result["steps_redone"] = final.steps_redone
    result["final_workers"] = len(final.workers or [])
    result["final_step"] = final.step
    result["steps"] = STEPS
    result["events"] = [
        json.loads(line) for line in (spec.run_dir / "events.jsonl").read_text().splitlines()
    ]
    result["worker_nodes_at_end"] = len(worker_nodes())
    steps = [m["step"] for m in handle.metrics()]
    result["metric_steps"] = {
        "count": len(steps),
        "missing": sorted(set(range(STEPS)) - set(steps)),
        "repeated": sorted(s for s, n in Counter(steps).items() if n > 1),
        "in_order": steps == sorted(steps),
    }


def main(argv: list[str]) -> int:
    out = Path(argv[0]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"ok": False}

    def on_term(signum, frame):
        raise Terminated(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    cluster = FakeAutoscalingCluster(out)
    start = time.monotonic()
    try:
        scenario(out, result, cluster)
        result["ok"] = True
    except BaseException as e:  # noqa: BLE001 - reported in the result file
        result["exception"] = "".join(traceback.format_exception(e))
        traceback.print_exc()
    finally:
        try:
            ray.shutdown()
        finally:
            succeeded = result["ok"] and result.get("state") == JobState.SUCCEEDED.value
            keep_logs = None if succeeded else out / "ray-logs"
            result["leftover_pids_stopped"] = cluster.shutdown(keep_logs)
            result["total_s"] = round(time.monotonic() - start, 2)
            (out / "result.json").write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
