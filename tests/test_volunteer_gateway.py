"""The volunteer gateway, its volunteers and the wire between them, on 127.0.0.1.

The gateway runs in this process; volunteers run as threads
(``VolunteerClient``, or ``FaultyVolunteerClient`` for protocol faults) or,
where a process's death is the point (SIGKILL, SIGSTOP, Ctrl-C), as real
processes started from this file (``python tests/test_volunteer_gateway.py
volunteer ...``). Every wait is a generous timeout, never a timing assertion.
"""

from __future__ import annotations

import enum
import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from cryptography import x509

from actors.gateway_server import (
    GatewayConfig,
    VolunteerGateway,
    VolunteerLost,
    WorkFailed,
    WorkRejected,
    WorkTimeout,
)
from actors.volunteer_client import VolunteerClient, backoff_delay
from collectives import volunteer_pb2 as pb
from collectives import volunteer_pb2_grpc as pb_grpc
from collectives.tensor_wire import (
    ALLOWED_DTYPES,
    Assembler,
    WireError,
    WireLimits,
    check_tensors,
    decode,
    pack_chunks,
)
from storage.gateway_trust import (
    check_token,
    create_token,
    ensure_run_certificates,
    list_tokens,
    revoke_token,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
JOB = "job-1"
WAIT_S = 20.0  # generous: every wait below ends as soon as its condition holds
PROCESS_START_S = 90.0  # a volunteer process imports torch: slow on a busy 2-core machine


# Volunteer processes are Ctrl-C'd: they must react to SIGINT as under a terminal.
pytestmark = pytest.mark.usefixtures("default_sigint")


def wait_for(cond: Callable[[], Any], what: str, timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def double(method: str, tensors: dict, args: dict) -> tuple[dict, dict]:
    """The honest handler: ``y = 2x``; a few methods misbehave on purpose."""
    if method == "nan":
        return {"y": torch.full((2, 3), float("nan"))}, {}
    if method == "wrong_shape":
        return {"y": torch.zeros(3, 2)}, {}
    if method == "wrong_dtype":
        return {"y": torch.zeros(2, 3, dtype=torch.int64)}, {}
    if method == "huge":
        return {"y": torch.zeros(100_000)}, {}
    if method == "raise":
        raise RuntimeError("the volunteer's model broke")
    if method == "hang":
        Path(args["marker"]).write_text("started")
        time.sleep(args["sleep_s"])
    return {"y": tensors["x"] * 2}, {"method": method, "echo": args.get("echo")}


X = torch.arange(6.0).reshape(2, 3)
EXPECT = {"y": ("float32", (2, 3))}


class Fault(enum.Enum):
    """Protocol faults a ``FaultyVolunteerClient`` adds after answering a work item."""

    REPLAY = "replay"  # re-send the previous work item's result frames
    UNKNOWN_NONCE = "unknown_nonce"  # a result for a nonce the gateway never sent
    WRONG_JOB = "wrong_job"  # a copy of the answer with another job id
    STALE_SEQ = "stale_seq"  # a heartbeat whose seq does not increase
    FLOOD = "flood"  # 300 heartbeats at once


class FaultyVolunteerClient(VolunteerClient):
    """Sends what its handler returns unchecked and unpaced, plus ``args["fault"]``."""

    pace_sends = False

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._previous: list[pb.VolunteerFrame] = []

    def _check_outgoing(self, session, tensors, args) -> None:
        pass  # whatever the handler returns goes on the wire: the gateway must cope

    def _result_frames(self, session, item, tensors, args, error):
        frames = list(super()._result_frames(session, item, tensors, args, error))
        yield from frames
        fault = json.loads(item.args_json or "{}").get("fault")
        if fault == Fault.REPLAY.value:
            for old in self._previous:
                copy = pb.VolunteerFrame()
                copy.CopyFrom(old)
                yield copy
        elif fault == Fault.UNKNOWN_NONCE.value:
            header = session.header(item.header.step, secrets.token_bytes(16))
            yield pb.VolunteerFrame(result=pb.Result(header=header, last=True))
        elif fault == Fault.WRONG_JOB.value:
            copy = pb.VolunteerFrame()
            copy.CopyFrom(frames[0])
            copy.result.header.job_id = "another-job"
            yield copy
        elif fault == Fault.STALE_SEQ.value:  # bypasses numbering: seq 1 is long past
            header = pb.Header(job_id=session.welcome.job_id, seq=1)
            session.out.put(pb.VolunteerFrame(heartbeat=pb.Heartbeat(header=header)))
        elif fault == Fault.FLOOD.value:
            for _ in range(300):
                yield pb.VolunteerFrame(heartbeat=pb.Heartbeat(header=session.header()))
        self._previous = frames


class Harness:
    """A run directory with its certificates, tokens, gateways and clients (all torn down)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.creds = ensure_run_certificates(run_dir)
        self.events: list[tuple[str, dict]] = []
        self.gateways: list[VolunteerGateway] = []
        self.clients: list[VolunteerClient] = []
        self.procs: list[subprocess.Popen] = []

    def audit(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    def of(self, event: str, volunteer_id: str | None = None) -> list[dict]:
        return [
            f
            for e, f in list(self.events)
            if e == event and (volunteer_id is None or f.get("volunteer_id") == volunteer_id)
        ]

    def gateway(self, **overrides: Any) -> VolunteerGateway:
        settings: dict[str, Any] = dict(heartbeat_s=0.1, heartbeat_timeout_s=2.0)
        settings.update(overrides)
        config = GatewayConfig(
            job_id=JOB, run_dir=str(self.run_dir), credentials=self.creds, **settings
        )
        gw = VolunteerGateway(config, audit=self.audit)
        gw.start()
        self.gateways.append(gw)
        return gw

    def client(
        self,
        port: int,
        name: str,
        token: str | None = None,
        handler: Callable = double,
        cls: type[VolunteerClient] = VolunteerClient,
        **kwargs: Any,
    ) -> VolunteerClient:
        token = token if token is not None else create_token(self.run_dir, name)
        settings: dict[str, Any] = dict(
            backoff_initial_s=0.05, backoff_max_s=0.4, connect_timeout_s=5.0
        )
        settings.update(kwargs)
        c = cls(
            f"127.0.0.1:{port}",
            token,
            self.creds.ca_path,
            f"{name}-machine",
            {"role": "expert_host"},
            handler,
            **settings,
        )
        c.start()
        self.clients.append(c)
        return c

    def process(self, port: int, name: str, log_path: Path) -> subprocess.Popen:
        token = create_token(self.run_dir, name)
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        cmd = [sys.executable, __file__, "volunteer", f"127.0.0.1:{port}", token]
        cmd += [str(self.creds.ca_path), name]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=log)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for c in self.clients:
            c.close(timeout_s=5.0)
        for gw in self.gateways:
            gw.stop(grace_s=0.5)


@pytest.fixture
def harness(tmp_path: Path):
    h = Harness(tmp_path / "run")
    yield h
    h.close()


def connected(gw: VolunteerGateway, volunteer_id: str) -> bool:
    return any(v.volunteer_id == volunteer_id and v.connected for v in gw.volunteers())


def info(gw: VolunteerGateway, volunteer_id: str):
    return next(v for v in gw.volunteers() if v.volunteer_id == volunteer_id)


# ------------------------------------------------------------------ the wire


def test_generated_protobuf_modules_are_current(tmp_path: Path):
    protoc = pytest.importorskip(
        "grpc_tools.protoc", reason="grpcio-tools is not installed (pip install -e '.[test]')"
    )
    (tmp_path / "collectives").mkdir()
    shutil.copy(REPO_ROOT / "collectives" / "volunteer.proto", tmp_path / "collectives")
    rc = protoc.main(
        [
            "protoc",
            f"-I{tmp_path}",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            str(tmp_path / "collectives" / "volunteer.proto"),
        ]
    )
    assert rc == 0
    for name in ("volunteer_pb2.py", "volunteer_pb2_grpc.py"):
        fresh = (tmp_path / "collectives" / name).read_bytes()
        assert fresh == (REPO_ROOT / "collectives" / name).read_bytes(), (
            f"collectives/{name} is stale: regenerate it (see collectives/volunteer.proto)"
        )


def test_tensor_wire_round_trips_every_allowed_dtype_with_chunking():
    gen = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    for name, dtype in ALLOWED_DTYPES.items():
        if dtype.is_floating_point:
            t = torch.randn(37, 29, generator=gen).to(dtype)
        elif dtype == torch.bool:
            t = torch.rand(37, 29, generator=gen) > 0.5
        else:
            t = torch.randint(0, 200, (37, 29), generator=gen).to(dtype)
        tensors[name] = t
    tensors["scalar"] = torch.tensor(3.5)
    tensors["empty"] = torch.zeros(0, 4, dtype=torch.int32)
    tensors["strided"] = torch.arange(40.0).reshape(5, 8).t()  # not contiguous
    limits = WireLimits(chunk_bytes=1024)
    frames = list(pack_chunks(tensors, limits.chunk_bytes))
    assert len(frames) > 10
    assert all(sum(len(c.data) for c in f) <= 1024 for f in frames)
    # the int64 tensor (37*29*8 bytes) had to be cut into several chunks
    assert sum(c.name == "int64" for f in frames for c in f) > 1
    out = decode((c for f in frames for c in f), limits)
    assert list(out) == list(tensors)
    for name, t in tensors.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape, name
        assert torch.equal(out[name], t), name


def test_tensor_wire_refuses_a_disallowed_dtype():
    with pytest.raises(ValueError, match="float64"):
        check_tensors({"x": torch.zeros(3, dtype=torch.float64)}, WireLimits())
    for dtype in ("float64", "object", "complex64", ""):
        chunk = pb.TensorChunk(name="x", dtype=dtype, shape=[2], offset=0, data=b"\0" * 16)
        with pytest.raises(WireError, match="not allowed") as e:
            Assembler(WireLimits()).add(chunk)
        assert e.value.kind == "dtype"


def test_tensor_wire_refuses_declared_sizes_over_the_bounds_before_allocating():
    # 2**50 float32 elements (4 PiB): allocating would raise MemoryError, not WireError
    huge = pb.TensorChunk(name="x", dtype="float32", shape=[2**25, 2**25], offset=0, data=b"")
    with pytest.raises(WireError, match="over the bound") as e:
        Assembler(WireLimits()).add(huge)
    assert e.value.kind == "oversized"
    # per tensor: elements and bytes
    limits = WireLimits(max_tensor_elements=100, max_tensor_bytes=1 << 20, max_message_bytes=600)
    with pytest.raises(WireError, match="101 elements"):
        Assembler(limits).add(pb.TensorChunk(name="x", dtype="uint8", shape=[101]))
    # per message: each tensor fits, the two together do not
    asm = Assembler(limits)
    asm.add(pb.TensorChunk(name="a", dtype="float32", shape=[100], data=b"\0" * 400))
    with pytest.raises(WireError, match="over max_message_bytes=600") as e:
        asm.add(pb.TensorChunk(name="b", dtype="float32", shape=[100], data=b""))
    assert e.value.kind == "oversized" and asm.declared_bytes == 400
    # more data than declared, chunks out of order, an incomplete tensor, too many dims
    asm = Assembler(WireLimits())
    with pytest.raises(WireError, match="8 declared"):
        asm.add(pb.TensorChunk(name="x", dtype="int32", shape=[2], data=b"\0" * 12))
    asm = Assembler(WireLimits())
    asm.add(pb.TensorChunk(name="x", dtype="int32", shape=[4], data=b"\0" * 8))
    with pytest.raises(WireError, match="expected 8"):
        asm.add(pb.TensorChunk(name="x", dtype="int32", shape=[4], offset=12, data=b"\0" * 4))
    with pytest.raises(WireError, match="8 of 16 bytes"):
        asm.finish()
    with pytest.raises(WireError, match="dims"):
        Assembler(WireLimits()).add(pb.TensorChunk(name="x", dtype="uint8", shape=[1] * 9))


# ------------------------------------------------------------------ trust material


def test_run_certificates_and_tokens(tmp_path: Path):
    run = tmp_path / "run"
    creds = ensure_run_certificates(run, hostnames=["gw.example.org"])
    gdir = run / "gateway"
    assert stat.S_IMODE(os.stat(gdir / "server.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(gdir / "ca.key").st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(creds.server_cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = {str(v) for v in san.get_values_for_type(x509.IPAddress)}
    names |= set(san.get_values_for_type(x509.DNSName))
    assert {"127.0.0.1", "localhost", "gw.example.org"} <= names
    # reused as they are, unless a new host name needs a new server certificate (same CA)
    assert ensure_run_certificates(run) == creds
    again = ensure_run_certificates(run, hostnames=["other.example.org"])
    assert again.ca_pem == creds.ca_pem and again.server_cert_pem != creds.server_cert_pem

    token = create_token(run, "alice")
    assert token not in (gdir / "tokens.json").read_text()
    assert stat.S_IMODE(os.stat(gdir / "tokens.json").st_mode) == 0o600
    assert check_token(run, token) == "alice"
    assert check_token(run, token + "x") is None and check_token(run, "") is None
    with pytest.raises(ValueError, match="revoke it first"):
        create_token(run, "alice")
    with pytest.raises(ValueError, match="token name"):
        create_token(run, "../evil")
    revoke_token(run, "alice")
    assert check_token(run, token) is None
    with pytest.raises(KeyError):
        revoke_token(run, "alice")
    fresh = create_token(run, "alice")
    assert check_token(run, fresh) == "alice" and check_token(run, token) is None
    assert [(t.name, t.revoked is None) for t in list_tokens(run)] == [
        ("alice", False),
        ("alice", True),
    ]


# ------------------------------------------------------------------ the gateway


def test_join_work_credit_leave(harness: Harness):
    gw = harness.gateway()
    joins, leaves = [], []
    gw.on_join(joins.append)
    gw.on_leave(lambda info, why: leaves.append((info.volunteer_id, why)))
    alice = harness.client(gw.port, "alice")
    wait_for(lambda: connected(gw, "alice"), "alice to join")
    [v] = gw.volunteers()
    assert (v.name, v.role, v.work_done) == ("alice-machine", "expert_host", 0)
    assert v.connected_since is not None and joins[0].volunteer_id == "alice"

    big = torch.randn(700_000)  # 2.8 MB: several frames each way
    futures = [
        gw.submit("alice", "double", {"x": X}, {"echo": 1}, step=1, deadline_s=WAIT_S),
        gw.submit("alice", "double", {"x": big}, {}, step=1, deadline_s=WAIT_S, expect=None),
    ]
    tensors, args = futures[0].result(WAIT_S)
    assert torch.equal(tensors["y"], X * 2) and args == {"method": "double", "echo": 1}
    assert torch.equal(futures[1].result(WAIT_S)[0]["y"], big * 2)
    assert gw.credit("alice", 2.5) == 2.5
    wait_for(lambda: alice.status().credit == 2.5, "the credit to reach alice in an ack")
    assert info(gw, "alice").work_done == 2 and alice.status().work_done == 2

    alice.close()
    wait_for(lambda: harness.of("left", "alice"), "alice's leave")
    assert not harness.of("lost", "alice") and leaves == [("alice", "left: the volunteer closed")]
    assert not info(gw, "alice").connected
    with pytest.raises(VolunteerLost, match="not connected"):
        gw.submit("alice", "double", {"x": X}, {}, step=2, deadline_s=1.0).result(WAIT_S)


def test_bad_token_revoked_token_and_plaintext_are_refused(harness: Harness, tmp_path: Path):
    gw = harness.gateway()
    bad = harness.client(gw.port, "nobody", token="shoal-vt-not-a-token")
    wait_for(lambda: bad.status().stopped, "the bad token's client to give up")
    assert "UNAUTHENTICATED" in bad.status().last_error
    assert "unknown token" in bad.status().last_error

    token = create_token(harness.run_dir, "old")
    revoke_token(harness.run_dir, "old")
    old = harness.client(gw.port, "old", token=token)
    wait_for(lambda: old.status().stopped, "the revoked token's client to give up")
    assert "token 'old' is revoked" in old.status().last_error
    assert [f["kind"] for f in harness.of("rejected")] == ["token", "token"]

    # plaintext: no TLS handshake, no connection
    with grpc.insecure_channel(f"127.0.0.1:{gw.port}") as channel:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.GatewayStub(channel).Register(
                pb.RegisterRequest(token=token, name="x", protocol_version=1), timeout=5.0
            )
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    # TLS against another run's CA: the gateway is not trusted
    other = ensure_run_certificates(tmp_path / "other-run")
    creds = grpc.ssl_channel_credentials(root_certificates=other.ca_pem)
    with grpc.secure_channel(f"127.0.0.1:{gw.port}", creds) as channel:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.GatewayStub(channel).Register(pb.RegisterRequest(), timeout=5.0)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert gw.volunteers() == []

    # with TLS and a valid token, but a wrong session key, protocol version or first frame
    alice_token = create_token(harness.run_dir, "alice")
    creds = grpc.ssl_channel_credentials(root_certificates=harness.creds.ca_pem)
    with grpc.secure_channel(f"127.0.0.1:{gw.port}", creds) as channel:
        stub = pb_grpc.GatewayStub(channel)
        with pytest.raises(grpc.RpcError, match="protocol version 7") as e:
            stub.Register(pb.RegisterRequest(token=alice_token, name="a", protocol_version=7))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        welcome = stub.Register(
            pb.RegisterRequest(token=alice_token, name="a", protocol_version=1), timeout=5.0
        )
        forged = pb.Hello(volunteer_id="alice", session_key=b"x" * 32)
        with pytest.raises(grpc.RpcError, match="unknown or ended session") as e:
            list(stub.Stream(iter([pb.VolunteerFrame(hello=forged)]), timeout=5.0))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        not_hello = pb.VolunteerFrame(heartbeat=pb.Heartbeat(header=pb.Header(job_id=JOB)))
        with pytest.raises(grpc.RpcError, match="must start with Hello") as e:
            list(stub.Stream(iter([not_hello]), timeout=5.0))
        with pytest.raises(grpc.RpcError, match="unknown session") as e:
            stub.Leave(pb.LeaveRequest(volunteer_id="alice", session_key=b"y"), timeout=5.0)
        assert welcome.session_key and not connected(gw, "alice")


def test_revoking_or_banning_disconnects_a_live_volunteer(harness: Harness, tmp_path: Path):
    gw = harness.gateway()
    bob_token = create_token(harness.run_dir, "bob")
    alice = harness.client(gw.port, "alice")
    bob = harness.client(gw.port, "bob", token=bob_token)
    wait_for(lambda: connected(gw, "alice") and connected(gw, "bob"), "both to join")
    marker = tmp_path / "alice-started"
    pending = gw.submit(
        "alice", "hang", {"x": X}, {"marker": str(marker), "sleep_s": 3}, step=1, deadline_s=60
    )
    wait_for(marker.exists, "alice to start working")
    revoke_token(harness.run_dir, "alice")
    with pytest.raises(VolunteerLost, match="revoked"):
        pending.result(WAIT_S)  # noticed at alice's next heartbeat
    wait_for(lambda: alice.status().stopped, "alice to stop")
    assert "revoked" in alice.status().last_error and harness.of("revoked", "alice")
    assert connected(gw, "bob")

    gw.ban("bob", "sent wrong results")
    wait_for(lambda: bob.status().stopped, "bob to stop")
    assert "banned: sent wrong results" in bob.status().last_error
    assert harness.of("banned", "bob")
    refused = harness.client(gw.port, "bob", token=bob_token)  # a valid token, but banned
    wait_for(lambda: refused.status().stopped, "banned bob to be refused")
    assert "PERMISSION_DENIED" in refused.status().last_error
    gw.unban("bob")
    back = harness.client(gw.port, "bob", token=bob_token)
    assert back.wait_connected(WAIT_S)
    tensors, _ = gw.submit("bob", "double", {"x": X}, {}, step=2, deadline_s=WAIT_S).result(WAIT_S)
    assert torch.equal(tensors["y"], X * 2)


def test_bad_results_are_rejected_and_counted_the_rest_unaffected(harness: Harness):
    limits = WireLimits(max_tensor_bytes=64 << 10, chunk_bytes=16 << 10)
    gw = harness.gateway(limits=limits)
    mallory = harness.client(gw.port, "mallory", cls=FaultyVolunteerClient)
    bob = harness.client(gw.port, "bob")
    wait_for(lambda: connected(gw, "mallory") and connected(gw, "bob"), "both to join")

    def work(volunteer: str, method: str, step: int, **args: Any):
        return gw.submit(volunteer, method, {"x": X}, args, step, WAIT_S, expect=EXPECT)

    def honest(step: int) -> None:  # mallory's and bob's honest work still goes through
        for volunteer in ("mallory", "bob"):
            tensors, _ = work(volunteer, "double", step).result(WAIT_S)
            assert torch.equal(tensors["y"], X * 2)

    cases = [
        ("nan", "non_finite", "3 non-finite|6 non-finite"),
        ("wrong_shape", "shape", r"shape \[3, 2\], expected \[2, 3\]"),
        ("wrong_dtype", "dtype", "is int64, expected float32"),
        ("huge", "oversized", "over the bound of"),
    ]
    for step, (method, kind, text) in enumerate(cases):
        bad = work("mallory", method, step)
        honest(step)
        with pytest.raises(WorkRejected, match=text) as e:
            bad.result(WAIT_S)
        assert e.value.kind == kind and "mallory" in str(e.value)
    with pytest.raises(WorkFailed, match="the volunteer's model broke"):
        work("mallory", "raise", 10).result(WAIT_S)

    # protocol faults ride along an honest answer, which is still accepted
    for step, fault in enumerate(
        [Fault.REPLAY, Fault.UNKNOWN_NONCE, Fault.WRONG_JOB, Fault.STALE_SEQ], start=20
    ):
        tensors, _ = work("mallory", "double", step, fault=fault.value).result(WAIT_S)
        assert torch.equal(tensors["y"], X * 2)
        honest(step)
    expected = {
        "non_finite": 1,
        "shape": 1,
        "dtype": 1,
        "oversized": 1,  # once: the rest of that result's frames are dropped quietly
        "replay": 1,
        "unknown_nonce": 1,
        "job_id": 1,
        "seq": 1,
    }
    wait_for(lambda: info(gw, "mallory").rejections == expected, "every rejection to be counted")
    m, b = info(gw, "mallory"), info(gw, "bob")
    assert (m.work_rejected, m.messages_rejected, m.work_failed) == (4, 4, 1)
    assert m.work_done == len(cases) + 2 * 4 and m.connected  # honest answers, and the faulty
    assert (b.work_done, b.work_rejected, b.messages_rejected) == (len(cases) + 4, 0, 0)
    assert sorted(f["kind"] for f in harness.of("rejected", "mallory")) == sorted(expected)
    wait_for(lambda: mallory.status().gateway_work_rejected == 4, "mallory to hear of it")
    assert bob.status().last_error is None


def test_rate_limit_drops_frames_then_disconnects(harness: Harness):
    gw = harness.gateway(rate_msgs_per_s=20.0, rate_msgs_burst=20.0, max_rate_violations=50)
    flood = harness.client(gw.port, "flood", cls=FaultyVolunteerClient)
    harness.client(gw.port, "bob")
    wait_for(lambda: connected(gw, "flood") and connected(gw, "bob"), "both to join")
    gw.submit("flood", "double", {"x": X}, {"fault": "flood"}, step=1, deadline_s=WAIT_S)
    wait_for(lambda: harness.of("rate_limited", "flood"), "the flood to be rate-limited")
    disconnected = wait_for(
        lambda: [f for f in harness.of("rate_limited", "flood") if f.get("disconnected")],
        "the flood to be disconnected",
    )
    assert "over the rate limit" in disconnected[0]["why"]
    assert harness.of("lost", "flood")
    assert info(gw, "flood").rejections["rate_limited"] > 50
    # the honest volunteer, paced under the same limits, is untouched
    for step in range(30):
        gw.submit("bob", "double", {"x": X}, {}, step, WAIT_S).result(WAIT_S)
    assert info(gw, "bob").messages_rejected == 0 and not harness.of("rate_limited", "bob")
    assert flood.status().connects >= 1


def test_a_missed_deadline_times_out_and_is_cancelled(harness: Harness, tmp_path: Path):
    gw = harness.gateway()
    slow = harness.client(gw.port, "slow")
    wait_for(lambda: connected(gw, "slow"), "slow to join")
    marker = tmp_path / "m"
    late = gw.submit("slow", "hang", {"x": X}, {"marker": str(marker), "sleep_s": 1.0}, 1, 0.3)
    with pytest.raises(WorkTimeout, match=r"'slow' \(slow-machine\) did not answer hang"):
        late.result(WAIT_S)
    # the volunteer got a Cancel: it drops the answer (the gateway would count it late);
    # the next work item, queued behind it, goes through
    tensors, _ = gw.submit("slow", "double", {"x": X}, {}, 2, WAIT_S).result(WAIT_S)
    assert torch.equal(tensors["y"], X * 2)
    assert slow.status().work_done == 1 and info(gw, "slow").rejections == {}
    assert info(gw, "slow").connected


def test_backoff_grows_and_is_capped():
    delays = [backoff_delay(n, 0.5, 4.0) for n in range(1, 8)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0]


def test_volunteer_reconnects_after_the_gateway_restarts(harness: Harness):
    gw = harness.gateway()
    port = gw.port
    alice = harness.client(gw.port, "alice", backoff_initial_s=0.05, backoff_max_s=0.4)
    wait_for(lambda: connected(gw, "alice"), "alice to join")
    gw.stop(grace_s=0.5)
    wait_for(lambda: alice.status().failed_attempts >= 3, "alice to retry with backoff")
    st = alice.status()
    assert not st.connected and "UNAVAILABLE" in st.last_error
    assert st.backoff_s > 0.05 * 0.5  # past the first step of the backoff
    gw2 = harness.gateway(port=port)
    wait_for(lambda: connected(gw2, "alice"), "alice to rejoin the new gateway")
    assert alice.status().connects == 2
    tensors, _ = gw2.submit("alice", "double", {"x": X}, {}, 1, WAIT_S).result(WAIT_S)
    assert torch.equal(tensors["y"], X * 2)


def test_replaced_connection_fails_old_work_and_continues(harness: Harness, tmp_path: Path):
    """A volunteer whose connection silently died registers again: the new session wins."""
    gw = harness.gateway()
    token = create_token(harness.run_dir, "alice")
    first = harness.client(gw.port, "alice", token=token)
    wait_for(lambda: connected(gw, "alice"), "alice to join")
    marker = tmp_path / "m"
    pending = gw.submit("alice", "hang", {"x": X}, {"marker": str(marker), "sleep_s": 2}, 1, 60)
    wait_for(marker.exists, "alice to start working")
    second = harness.client(gw.port, "alice", token=token)
    with pytest.raises(VolunteerLost, match="replaced by a new registration"):
        pending.result(WAIT_S)
    assert second.wait_connected(WAIT_S)
    wait_for(lambda: connected(gw, "alice"), "the second session")
    assert gw.submit("alice", "double", {"x": X}, {}, 2, WAIT_S).result(WAIT_S)
    first.close()


# ------------------------------------------------------------------ volunteer processes


@pytest.fixture(scope="module")
def processes(tmp_path_factory: pytest.TempPathFactory):
    """One gateway and three volunteer processes, started together (each imports torch)."""
    h = Harness(tmp_path_factory.mktemp("procs") / "run")
    gw = h.gateway(heartbeat_timeout_s=2.0)
    for name in ("killed", "frozen", "leaver"):
        h.process(gw.port, name, h.run_dir.parent / f"{name}.log")
    yield h, gw
    h.close()


def _joined(processes, name: str) -> tuple[Harness, VolunteerGateway, subprocess.Popen]:
    h, gw = processes
    proc = h.procs[["killed", "frozen", "leaver"].index(name)]
    log = h.run_dir.parent / f"{name}.log"
    wait_for(
        lambda: connected(gw, name) or proc.poll() is not None, f"{name} to join", PROCESS_START_S
    )
    assert proc.poll() is None, log.read_text()[-3000:]
    return h, gw, proc


def test_a_killed_volunteer_is_lost(processes, tmp_path: Path):
    h, gw, proc = _joined(processes, "killed")
    tensors, _ = gw.submit("killed", "double", {"x": X}, {}, 1, WAIT_S).result(WAIT_S)
    assert torch.equal(tensors["y"], X * 2)
    marker = tmp_path / "started"
    args = {"marker": str(marker), "sleep_s": 60}
    pending = gw.submit("killed", "hang", {"x": X}, args, 2, 60)
    wait_for(marker.exists, "the volunteer to start working")
    proc.kill()  # SIGKILL mid-work
    with pytest.raises(VolunteerLost, match="'killed'"):
        pending.result(gw.config.heartbeat_timeout_s + 5.0)
    assert h.of("lost", "killed") and not h.of("left", "killed")


def test_a_frozen_volunteer_is_lost_by_missed_heartbeats(processes, tmp_path: Path):
    h, gw, proc = _joined(processes, "frozen")
    marker = tmp_path / "started"
    args = {"marker": str(marker), "sleep_s": 60}
    pending = gw.submit("frozen", "hang", {"x": X}, args, 1, 60)
    wait_for(marker.exists, "the volunteer to start working")
    proc.send_signal(signal.SIGSTOP)  # its connection stays open, but it says nothing
    with pytest.raises(VolunteerLost, match="missed heartbeats"):
        pending.result(gw.config.heartbeat_timeout_s + 5.0)
    assert h.of("lost", "frozen")
    proc.kill()


def test_ctrl_c_leaves_cleanly(processes):
    h, gw, proc = _joined(processes, "leaver")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(WAIT_S) == 0, (h.run_dir.parent / "leaver.log").read_text()[-3000:]
    wait_for(lambda: h.of("left", "leaver"), "its Leave")
    assert not h.of("lost", "leaver")


def _volunteer_main(argv: list[str]) -> None:
    """A volunteer process for the tests above: ``volunteer ADDRESS TOKEN CA NAME``."""
    address, token, ca, name = argv
    client = VolunteerClient(address, token, ca, name, {"role": "expert_host"}, double)
    client.run_forever(poll_s=0.1)


if __name__ == "__main__" and sys.argv[1:2] == ["volunteer"]:
    _volunteer_main(sys.argv[2:])
