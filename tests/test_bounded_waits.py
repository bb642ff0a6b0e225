"""Waits on a cluster or an endpoint that is not there end in one line naming it.

Every server here is on 127.0.0.1: a port nobody listens on, or a "silent"
one that accepts connections and never answers. Anything that calls
``ray.init`` runs as a ``shoal`` subprocess, apart from the session's Ray.
Timeouts below only catch a hang (the failure these tests guard against);
nothing asserts on elapsed time.
"""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from storage.object_store import StoreError, open_store
from tests.s3_server import CLEARED_AWS_ENV, FAKE_AWS_ENV
from tests.test_cli import TINY, shoal

# Far above the few seconds a bounded failure takes, far below the minutes a hang did.
HANG_S = 120


def closed_port() -> int:
    """A port on 127.0.0.1 with nothing listening (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SilentServer:
    """Accepts TCP connections on 127.0.0.1 and never sends a byte."""

    sock: socket.socket
    accepted: list[socket.socket] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def serve(self) -> None:
        # accept() wakes up now and then to notice `stop` (closing the socket would not wake it).
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.accepted.append(conn)  # kept open: the peer waits for an answer


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    server = SilentServer(sock)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop.set()
        thread.join(timeout=5)
        sock.close()
        for conn in server.accepted:
            conn.close()


def assert_one_line_failure(out: subprocess.CompletedProcess, address: str) -> None:
    assert out.returncode != 0, out.stdout
    assert address in out.stderr, out.stderr
    assert "Traceback" not in out.stderr + out.stdout, out.stderr


def shoal_run(address: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return shoal(
        "run",
        *TINY,
        f"cluster.address={address}",
        "cluster.start_timeout_s=5",
        f"run_dir={tmp_path / 'run'}",
        timeout=HANG_S,
    )


@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_run_with_nothing_listening_fails_naming_the_address(tmp_path: Path, scheme: str) -> None:
    # Before: ray.init retried the GCS for minutes (host:port), or raised a
    # traceback after 30 s (ray://).
    address = f"{scheme}127.0.0.1:{closed_port()}"
    assert_one_line_failure(shoal_run(address, tmp_path), address)


@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_run_with_a_silent_port_fails_naming_the_address(
    tmp_path: Path, scheme: str, silent_server: SilentServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ray dials this node's IP for a loopback GCS address; this setting makes
    # it dial 127.0.0.1, where the silent server is (the shoal subprocess
    # inherits the environment). Ray client (ray://) addresses are dialed as written.
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    address = f"{scheme}127.0.0.1:{silent_server.port}"
    assert_one_line_failure(shoal_run(address, tmp_path), address)
    assert silent_server.accepted, "the silent server was never reached"


def test_scale_with_nothing_listening_fails_naming_the_address() -> None:
    address = f"127.0.0.1:{closed_port()}"
    out = shoal("scale", "somejob", "2", "--address", address, timeout=HANG_S)
    assert_one_line_failure(out, address)


@pytest.mark.timeout(HANG_S)
def test_s3_check_on_a_silent_endpoint_names_it(
    silent_server: SilentServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: the store's own timeouts and retries (60 s read x 5 attempts) at job start.
    for name in CLEARED_AWS_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(name, value)
    endpoint = f"http://127.0.0.1:{silent_server.port}"
    store = open_store("s3://bucket/x", endpoint_url=endpoint, path_style=True)
    with pytest.raises(StoreError) as info:
        store.check()
    message = str(info.value)
    assert endpoint in message and "storage.endpoint_url" in message
    assert len(silent_server.accepted) == 1  # one attempt, no retries
