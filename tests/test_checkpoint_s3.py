"""Checkpoints in S3, over HTTP, against moto's server on 127.0.0.1 (no boto3 patching).

Faults are injected in the network, not in boto3: ``FaultyProxy`` sits
between the clients and the S3 server and can reset every connection (a
store that is down) or hold a chosen request (an upload in flight, for a
kill). Jobs use the tiny model of ``tests/test_jobs.py``.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from orchestrator import JobState, submit
from storage.checkpoint import (
    CheckpointReader,
    Manifest,
    all_step_dirs,
    commit,
    committed_steps,
    read_manifest,
    step_dir,
    verify,
)
from storage.s3_store import S3Store
from tests.checkpoint_helpers import write_shard
from tests.conftest import REPO_ROOT
from tests.reference import run_job
from tests.test_jobs import ATOL, _spec, run_jobs

pytest_plugins = ["tests.s3_server"]


class FaultyProxy:
    """A TCP proxy in front of the S3 server that can go down or hold a request.

    * ``down`` set: new connections are reset at once and open ones on their
      next request -- to boto3, an unreachable store.
    * ``down_after(pattern)``: go down once the (2xx) response to the first
      request containing ``pattern`` has been passed back.
    * ``hold(regex)``: the first request matching ``regex`` is not
      forwarded until ``release`` is set; ``held`` is set when it arrives.
    """

    def __init__(self, upstream: str):
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.down = threading.Event()
        self.held = threading.Event()
        self.release = threading.Event()
        self._down_after: bytes | None = None
        self._hold: re.Pattern[bytes] | None = None
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def down_after(self, pattern: bytes) -> None:
        self._down_after = pattern

    def hold(self, regex: bytes) -> None:
        self._hold = re.compile(regex)

    def close(self) -> None:
        self.release.set()
        self._listener.close()

    @staticmethod
    def _reset(sock: socket.socket) -> None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        except OSError:
            pass

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.down.is_set():
                self._reset(client)
                continue
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                self._reset(client)
                continue
            trigger = threading.Event()
            threading.Thread(target=self._up, args=(client, server, trigger), daemon=True).start()
            threading.Thread(target=self._back, args=(server, client, trigger), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, trigger: threading.Event) -> None:
        try:
            while data := client.recv(1 << 16):
                if self.down.is_set():
                    break
                if self._hold and self._hold.search(data):
                    self._hold = None
                    self.held.set()
                    self.release.wait()
                    break  # never forwarded: the sender was killed meanwhile
                if self._down_after and self._down_after in data:
                    self._down_after = None
                    trigger.set()
                server.sendall(data)
        except OSError:
            pass
        self._reset(client)
        self._reset(server)

    def _back(self, server: socket.socket, client: socket.socket, trigger: threading.Event) -> None:
        try:
            while data := server.recv(1 << 16):
                client.sendall(data)
                # Not on "100 Continue": the request body has yet to be sent.
                if trigger.is_set() and data.startswith(b"HTTP/1.1 2"):
                    self.down.set()
        except OSError:
            pass


@pytest.fixture
def bucket(s3_server) -> str:
    return s3_server.make_bucket()


@pytest.fixture
def ray_s3(s3_server, ray_session):
    """Ray whose worker processes see the S3 server's fake credentials.

    Ray workers inherit the environment of the moment Ray started. Listed
    after ``s3_server``, ``ray_session`` normally starts with the fake
    credentials already set; if another test started Ray earlier, restart it
    with them in its runtime environment.
    """
    import ray

    @ray.remote(num_cpus=0)
    def aws_key() -> str | None:
        return os.environ.get("AWS_ACCESS_KEY_ID")

    if ray.get(aws_key.remote()) != os.environ["AWS_ACCESS_KEY_ID"]:
        ray.shutdown()
        env = {k: v for k, v in os.environ.items() if k.startswith("AWS_") or k == "PYTHONPATH"}
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            namespace="shoal-tests",
            logging_level=logging.WARNING,
            runtime_env={"env_vars": env},
        )
    return ray_session


def _store(endpoint: str, uri: str, **options) -> S3Store:
    return S3Store.from_uri(uri, endpoint_url=endpoint, path_style=True, **options)


def _s3(endpoint: str, uri: str) -> list[str]:
    return [f"checkpoint.uri={uri}", f"storage.endpoint_url={endpoint}", "storage.path_style=true"]


def _params(store: S3Store, step: int) -> torch.Tensor:
    manifest = read_manifest(store, step)
    return CheckpointReader(store, manifest).read("param", 0, manifest.numel)


def test_round_trip_across_world_sizes_stages_and_corrupt_fallback(
    ray_s3, s3_server, bucket, tmp_path
):
    ep = s3_server.endpoint
    uri_a = f"s3://{bucket}/runs/a"
    full = _spec(
        tmp_path,
        "full",
        "strategy=zero2",
        "cluster.workers=2",
        "train.steps=6",
        "checkpoint.every=3",
        "checkpoint.keep=5",
        *_s3(ep, uri_a),
    )
    handle, status = run_job(full)
    assert status.checkpoints_committed == 2 and status.checkpoints_failed == 0
    records = {m["step"]: m for m in handle.metrics()}
    # The records of the steps that ended at a checkpoint say what it blocked.
    assert records[2]["checkpoint_blocked_s"] >= 0 and len(records[2]["checkpoint_copy_s"]) == 2
    assert "checkpoint_drain_s" in records[5] and "checkpoint_blocked_s" not in records[3]
    store_a = _store(ep, uri_a)
    assert committed_steps(store_a) == [3, 6]
    assert verify(store_a, read_manifest(store_a, 6)) == []
    final = _params(store_a, 6)

    # Corrupt the newest checkpoint (same size: only a checksum can tell).
    damaged = read_manifest(store_a, 6).shards[1].key
    key = f"runs/a/{step_dir(6)}/{damaged}"
    data = bytearray(store_a._client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0x55  # inside a tensor's data
    store_a._client.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    problems = verify(store_a, read_manifest(store_a, 6))
    assert len(problems) == 1 and damaged in problems[0]

    # Two jobs at once (each reads step 3 of run a, which neither changes):
    # ZeRO-2 on 2 even shards -> ZeRO-3 on 2 uneven ones: each rank reads only its ranges.
    uri_b = f"s3://{bucket}/runs/b"
    three = _spec(
        tmp_path,
        "zero3",
        "strategy=zero3",
        "cluster.workers=2",
        "strategy.shard_weights=[1,3]",
        "train.steps=6",
        f"resume={uri_a}/step-00000003",
        *_s3(ep, uri_b),
    )
    # resume=latest on 1 DDP worker must skip the corrupt step 6, say so, and redo
    # steps 3-5 to the same parameters.
    one = _spec(
        tmp_path,
        "ddp1",
        "strategy=ddp",
        "cluster.workers=1",
        "train.steps=6",
        "checkpoint.every=3",
        "checkpoint.keep=5",
        "resume=latest",
        *_s3(ep, uri_a),
    )
    (_, st3, _), (_, st1, metrics1) = run_jobs(three, one)

    assert st3.resumed_from.endswith("step-00000003") and st3.resume_note is None
    whole = read_manifest(store_a, 3).nbytes
    # Rank 0 needs a quarter of every tensor; it must not fetch whole shards.
    assert st3.resume_bytes_read[0] < 0.35 * whole, (st3.resume_bytes_read, whole)
    torch.testing.assert_close(_params(_store(ep, uri_b), 6), final, atol=ATOL, rtol=0)

    assert st1.resumed_from.endswith("step-00000003")
    assert "step-00000006" in st1.resume_note and "checksum mismatch" in st1.resume_note
    assert [m["step"] for m in metrics1] == [3, 4, 5]
    rewritten = read_manifest(store_a, 6)
    assert rewritten.world_size == 1 and verify(store_a, rewritten) == []
    keys = {o.key for o in store_a.list(step_dir(6) + "/")}
    assert f"{step_dir(6)}/{damaged}" not in keys  # the damaged one was cleared
    torch.testing.assert_close(_params(store_a, 6), final, atol=ATOL, rtol=0)


def test_store_down_then_back_training_continues(ray_s3, s3_server, bucket, tmp_path):
    proxy = FaultyProxy(s3_server.endpoint)
    try:
        proxy.down_after(b"step-00000002/manifest.json")
        uri = f"s3://{bucket}/down"
        spec = _spec(
            tmp_path,
            "down",
            "cluster.workers=1",
            "train.steps=12",
            "checkpoint.every=2",
            "checkpoint.keep=1",
            *_s3(proxy.endpoint, uri),
        )
        handle = submit(spec)
        assert proxy.down.wait(120), "the first checkpoint never committed"
        deadline = time.time() + 120
        # Training goes on while the store is down, and a save fails meanwhile: the store
        # comes back only then (steps take milliseconds, and a save still retrying when the
        # store returns succeeds, which would leave nothing failed to check).
        while time.time() < deadline:
            metrics = handle.metrics()
            if metrics and metrics[-1]["step"] >= 8 and handle.status().checkpoints_failed:
                break
            assert not handle.done(), handle.status().error
            time.sleep(0.05)
        assert handle.metrics()[-1]["step"] >= 8 and handle.status().checkpoints_failed
        proxy.down.clear()
        status = handle.wait(timeout=240)
        assert status.state == JobState.SUCCEEDED, status.error
        assert status.checkpoints_failed >= 1 and "failed" in status.checkpoint_warning
        store = _store(s3_server.endpoint, uri)
        # Retention (keep=1): step 2 and any leftovers of the failed saves are gone.
        assert committed_steps(store) == [12] and all_step_dirs(store) == {12}
        assert verify(store, read_manifest(store, 12)) == []
    finally:
        proxy.close()


KILLED_SAVER = r"""
import sys, time, torch
from storage.async_saver import AsyncSaver
from storage.checkpoint import Manifest, commit
from tests.checkpoint_helpers import write_shard
from storage.s3_store import S3Store

endpoint, uri = sys.argv[1], sys.argv[2]
store = S3Store.from_uri(
    uri, endpoint_url=endpoint, path_style=True, multipart_threshold_mb=5, multipart_chunk_mb=5
)
n = 3_000_000  # rank 1's shard: 12 MB, a three-part multipart upload
state = torch.randn(10 + n)
for step in (2, 4):
    records = [write_shard(store, step, 0, 0, 10, {"param": state[:10]})]
    if step == 2:
        records.append(write_shard(store, step, 1, 10, 10 + n, {"param": state[10:]}))
        commit(store, Manifest(2, 2, "ddp", 10 + n, [], {}, records), keep=5)
    else:
        AsyncSaver(store).save(step, 1, 10, 10 + n, {"param": state[10:]})
        print("uploading", flush=True)
        time.sleep(600)
"""


def test_kill_during_upload_keeps_previous_and_hides_partial(s3_server, bucket):
    proxy = FaultyProxy(s3_server.endpoint)
    uri = f"s3://{bucket}/killed"
    try:
        # Hold part 2 of step 4's multipart upload, then kill the saving process.
        proxy.hold(rb"step-00000004/shard-00001\.safetensors\?\S*partNumber=2 ")
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        saver = subprocess.Popen(
            [sys.executable, "-c", KILLED_SAVER, proxy.endpoint, uri],
            cwd=str(REPO_ROOT),
            env=env,
        )
        try:
            assert proxy.held.wait(60), "the upload never reached part 2"
            os.kill(saver.pid, signal.SIGKILL)
        finally:
            saver.kill()
            saver.wait(30)
    finally:
        proxy.close()
    store = _store(s3_server.endpoint, uri)
    assert committed_steps(store) == [2]
    assert verify(store, read_manifest(store, 2)) == []
    keys = {o.key for o in store.list(step_dir(4) + "/")}
    # Rank 0's shard landed, rank 1's multipart upload never completed: invisible.
    assert keys == {f"{step_dir(4)}/shard-00000.safetensors"}
    # The next commit's retention removes the partial checkpoint.
    rec = write_shard(store, 6, 0, 0, 4, {"param": torch.zeros(4)})
    commit(store, Manifest(6, 1, "ddp", 4, [], {}, [rec]), keep=5)
    assert all_step_dirs(store) == {2, 6}


def test_concurrent_shard_writes_read_back_at_another_world_size(s3_server, bucket):
    store = _store(s3_server.endpoint, f"s3://{bucket}/concurrent")
    n, world = 40_000, 8
    full = {"param": torch.randn(n), "exp_avg": torch.randn(n)}
    bounds = [(r * n // world, (r + 1) * n // world) for r in range(world)]
    with ThreadPoolExecutor(world) as pool:
        records = list(
            pool.map(
                lambda r: write_shard(
                    store,
                    9,
                    r,
                    *bounds[r],
                    {k: v[bounds[r][0] : bounds[r][1]] for k, v in full.items()},
                    chunk_bytes=4096,
                ),
                range(world),
            )
        )
    manifest = Manifest(9, world, "zero1", n, [], {}, records)
    commit(store, manifest, keep=1)
    assert verify(store, read_manifest(store, 9)) == []
    reader = CheckpointReader(store, read_manifest(store, 9))
    for lo, hi in [(0, n), (12_345, 23_456), (n - 1, n)]:
        assert torch.equal(reader.read("exp_avg", lo, hi), full["exp_avg"][lo:hi])
