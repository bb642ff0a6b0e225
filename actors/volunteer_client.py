"""A volunteer's side of the gateway protocol: connect out, do work items, stay connected.

``VolunteerClient`` runs on a machine outside the Ray cluster. It opens a TLS
channel to the gateway, verifying the gateway's certificate against the run's
``ca.pem`` (no system roots: only the run's CA is trusted), registers with its
token, and opens the one bidirectional stream of the protocol (see
actors/gateway_server.py). The volunteer needs no inbound port.

Work items arrive on the stream, possibly split over several frames; once
whole, they are handed one at a time to ``handler(method, tensors, args) ->
(tensors, args)`` on a worker thread, and the answer goes back as result
frames (split the same way). A handler that raises sends its error text
instead; a work item the gateway cancelled (its deadline passed) is skipped
if it has not started. A heartbeat goes up every ``heartbeat_s`` the gateway
asked for, and the gateway answers each with an ack carrying the credit it
grants; if nothing comes back for ``heartbeat_timeout_s`` the connection is
taken for dead.

Outgoing frames are paced to just under the gateway's rate limits (announced
in ``Welcome``), so an honest volunteer is never rate-limited.

After a network drop (or the gateway restarting) the client registers again
after an exponential backoff with jitter: ``backoff_initial_s * 2^(n-1)``,
capped at ``backoff_max_s``, reset by a session that lasted; ``max_attempts``
consecutive failures (None: no limit) end it. A refusal that retrying cannot
fix (bad or revoked token, banned, protocol mismatch) ends it at once.
``close()`` (and Ctrl-C in ``run_forever``) sends ``Leave`` so the gateway
knows the volunteer left rather than vanished.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch

from actors.gateway_server import MAX_ERROR_CHARS, PROTOCOL_VERSION, TokenBucket
from collectives import volunteer_pb2 as pb
from collectives import volunteer_pb2_grpc as pb_grpc
from collectives.tensor_wire import Assembler, WireError, WireLimits, check_tensors, pack_chunks

log = logging.getLogger(__name__)

Handler = Callable[
    [str, dict[str, torch.Tensor], dict[str, Any]], tuple[dict[str, torch.Tensor], dict[str, Any]]
]

# Refusals that registering again cannot fix.
_FATAL = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
}
_PACE = 0.9  # send at this fraction of the gateway's announced rates
_CHANNEL_MESSAGE_BYTES = 64 << 20  # the gateway is authenticated; its frames are far smaller


def backoff_delay(attempt: int, initial_s: float, max_s: float) -> float:
    """The wait before reconnect ``attempt`` (1, 2, ...), before jitter."""
    return min(max_s, initial_s * 2.0 ** max(0, attempt - 1))


@dataclass(frozen=True)
class VolunteerStatus:
    """What the volunteer is doing, for its own display."""

    connected: bool
    volunteer_id: str | None
    work_done: int  # results sent
    work_failed: int  # the handler raised
    credit: float  # as the gateway last reported
    gateway_work_done: int  # results the gateway accepted
    gateway_work_rejected: int  # results the gateway rejected
    last_error: str | None
    connects: int  # sessions opened
    failed_attempts: int  # consecutive failed registrations
    backoff_s: float  # the last wait before a reconnect
    stopped: bool


class _Session:
    """One registration and its stream."""

    STOP = object()

    def __init__(self, welcome: pb.Welcome, paced: bool):
        self.welcome = welcome
        self.paced = paced
        self.out: queue.Queue = queue.Queue()
        self.work: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.seq = welcome.seq_start
        self.stopped = threading.Event()
        self.last_rx = time.monotonic()
        self.cancelled: set[bytes] = set()
        self.incoming: dict[bytes, tuple[Assembler, pb.WorkItem]] = {}
        self.call: Any = None
        self.limits = WireLimits(
            max_tensor_elements=max(1, welcome.max_tensor_elements),
            max_tensor_bytes=max(1, welcome.max_tensor_bytes),
            max_message_bytes=max(1, welcome.max_message_bytes),
            chunk_bytes=max(1024, welcome.frame_bytes),
        )
        self.msg_bucket = TokenBucket(
            welcome.rate_msgs_per_s * _PACE, max(1.0, welcome.rate_msgs_burst * _PACE)
        )
        self.byte_bucket = TokenBucket(
            welcome.rate_bytes_per_s * _PACE, max(1.0, welcome.rate_bytes_burst * _PACE)
        )

    def header(self, step: int = 0, nonce: bytes = b"") -> pb.Header:
        return pb.Header(job_id=self.welcome.job_id, step=step, nonce=nonce)

    def send(self, frame: pb.VolunteerFrame) -> None:
        """Queue ``frame``, numbering its header's ``seq`` in queue order."""
        header = getattr(frame, frame.WhichOneof("kind")).header
        with self.lock:
            self.seq += 1
            header.seq = self.seq
            self.out.put(frame)

    def requests(self) -> Iterator[pb.VolunteerFrame]:
        """The stream's outgoing frames: Hello, then the queue, paced to the rate limits."""
        w = self.welcome
        yield pb.VolunteerFrame(
            hello=pb.Hello(volunteer_id=w.volunteer_id, session_key=w.session_key)
        )
        while True:
            frame = self.out.get()
            if frame is self.STOP:
                return
            size = frame.ByteSize()
            while self.paced and not (self.msg_bucket.take(1) and self.byte_bucket.take(size)):
                wait = max(self.msg_bucket.wait_time(1), self.byte_bucket.wait_time(size))
                if self.stopped.wait(min(max(wait, 0.001), 0.5)):
                    return
            yield frame

    def stop(self) -> None:
        self.stopped.set()
        self.out.put(self.STOP)
        self.work.put(self.STOP)
        if self.call is not None:
            self.call.cancel()


class VolunteerClient:
    """One volunteer's connection to a gateway (see the module docstring).

    ``address`` is ``host:port``; ``ca_path`` the run's ``ca.pem`` (or the
    operator's CA); ``capabilities`` a small JSON-able dict (e.g. ``{"role":
    "expert_host", "device": "cpu"}``).
    """

    pace_sends = True  # keep under the gateway's rate limits (a faulty test client does not)

    def __init__(
        self,
        address: str,
        token: str,
        ca_path: str | Path,
        name: str,
        capabilities: Mapping[str, Any],
        handler: Handler,
        *,
        connect_timeout_s: float = 10.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        max_attempts: int | None = None,
        leave_timeout_s: float = 5.0,
        server_name: str | None = None,
    ):
        if not 0 < backoff_initial_s <= backoff_max_s:
            raise ValueError("need 0 < backoff_initial_s <= backoff_max_s")
        self.address, self.name, self.handler = address, name, handler
        self.capabilities = dict(capabilities)
        self._token = token
        self._ca_pem = Path(ca_path).read_bytes()
        self.connect_timeout_s = connect_timeout_s
        self.backoff_initial_s, self.backoff_max_s = backoff_initial_s, backoff_max_s
        self.max_attempts = max_attempts
        self.leave_timeout_s = leave_timeout_s
        self._options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", _CHANNEL_MESSAGE_BYTES),
            ("grpc.max_send_message_length", _CHANNEL_MESSAGE_BYTES),
        ]
        if server_name is not None:  # the certificate names another host than ``address``
            self._options.append(("grpc.ssl_target_name_override", server_name))
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._stopped = threading.Event()
        self._connected = threading.Event()
        self._thread: threading.Thread | None = None
        self._session: _Session | None = None
        self._stub: pb_grpc.GatewayStub | None = None
        self._volunteer_id: str | None = None
        self._work_done = 0
        self._work_failed = 0
        self._credit = 0.0
        self._gateway_done = 0
        self._gateway_rejected = 0
        self._last_error: str | None = None
        self._connects = 0
        self._failed_attempts = 0
        self._backoff_s = 0.0

    # ------------------------------------------------------------ public

    def start(self) -> None:
        """Connect (and keep reconnecting) on a background thread."""
        if self._thread is not None:
            raise RuntimeError("the volunteer client is already started")
        self._thread = threading.Thread(target=self._loop, name="volunteer-client", daemon=True)
        self._thread.start()

    def run_forever(self, poll_s: float = 0.5) -> None:
        """Run until stopped by the gateway or a fatal refusal; Ctrl-C leaves cleanly."""
        self.start()
        try:
            while not self._stopped.wait(poll_s):
                pass
        except KeyboardInterrupt:
            log.info("interrupted: leaving the gateway")
        finally:
            self.close()

    def close(self, timeout_s: float = 10.0) -> None:
        """Send Leave (if connected), end the stream and the background thread."""
        self._closing.set()
        with self._lock:
            session, stub = self._session, self._stub
        if session is not None and stub is not None and not session.stopped.is_set():
            w = session.welcome
            try:
                stub.Leave(
                    pb.LeaveRequest(
                        volunteer_id=w.volunteer_id,
                        session_key=w.session_key,
                        reason="the volunteer closed",
                    ),
                    timeout=self.leave_timeout_s,
                )
            except grpc.RpcError as e:
                log.info("leave failed (%s); the gateway will notice the silence", e.code())
        if session is not None:
            session.stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
        self._stopped.set()

    def job_config(self) -> dict[str, Any]:
        """What the gateway said about the job when this volunteer registered (plain JSON data:
        the caller decides what, if anything, to build from it)."""
        with self._lock:
            return dict(getattr(self, "_job_config", {}))

    def wait_connected(self, timeout_s: float) -> bool:
        """Whether the client is connected (waiting up to ``timeout_s`` for it)."""
        return self._connected.wait(timeout_s)

    def status(self) -> VolunteerStatus:
        with self._lock:
            return VolunteerStatus(
                connected=self._connected.is_set(),
                volunteer_id=self._volunteer_id,
                work_done=self._work_done,
                work_failed=self._work_failed,
                credit=self._credit,
                gateway_work_done=self._gateway_done,
                gateway_work_rejected=self._gateway_rejected,
                last_error=self._last_error,
                connects=self._connects,
                failed_attempts=self._failed_attempts,
                backoff_s=self._backoff_s,
                stopped=self._stopped.is_set(),
            )

    # ------------------------------------------------------------ connect loop

    def _error(self, text: str) -> None:
        with self._lock:
            self._last_error = text
        log.warning("volunteer %s: %s", self.name, text)

    def _loop(self) -> None:
        attempt = 0
        creds = grpc.ssl_channel_credentials(root_certificates=self._ca_pem)
        try:
            while not self._closing.is_set():
                channel = grpc.secure_channel(self.address, creds, options=self._options)
                try:
                    stub = pb_grpc.GatewayStub(channel)
                    request = pb.RegisterRequest(
                        token=self._token,
                        name=self.name,
                        capabilities_json=json.dumps(self.capabilities),
                        protocol_version=PROTOCOL_VERSION,
                    )
                    try:
                        welcome = stub.Register(request, timeout=self.connect_timeout_s)
                    except grpc.RpcError as e:
                        self._error(f"register: {e.code().name}: {e.details()}")
                        if e.code() in _FATAL:
                            return
                        attempt += 1
                        with self._lock:
                            self._failed_attempts = attempt
                        if self.max_attempts is not None and attempt >= self.max_attempts:
                            self._error(f"gave up after {attempt} failed attempts")
                            return
                        self._wait_backoff(attempt)
                        continue
                    with self._lock:
                        self._failed_attempts = 0
                        self._connects += 1
                        self._volunteer_id = welcome.volunteer_id
                        self._stub = stub
                        self._job_config = json.loads(welcome.config_json or "{}")
                    began = time.monotonic()
                    retry = self._run_session(stub, welcome)
                    if not retry or self._closing.is_set():
                        return
                    # A session that lasted resets the backoff; one that ended at
                    # once (a flapping gateway) keeps growing it.
                    attempt = 1 if time.monotonic() - began > self.backoff_max_s else attempt + 1
                    self._wait_backoff(attempt)
                finally:
                    channel.close()
        finally:
            self._connected.clear()
            self._stopped.set()

    def _wait_backoff(self, attempt: int) -> None:
        delay = backoff_delay(attempt, self.backoff_initial_s, self.backoff_max_s)
        delay *= random.uniform(0.5, 1.0)  # jitter: volunteers dropped together spread out
        with self._lock:
            self._backoff_s = delay
        self._closing.wait(delay)

    def _run_session(self, stub: pb_grpc.GatewayStub, welcome: pb.Welcome) -> bool:
        """Serve one stream until it ends; whether to register again."""
        session = _Session(welcome, self.pace_sends)
        with self._lock:
            if self._closing.is_set():  # close() ran while registering
                return False
            self._session = session
        session.call = stub.Stream(session.requests())
        if session.stopped.is_set():  # close() stopped it before the call existed
            session.call.cancel()
        heartbeats = threading.Thread(target=self._heartbeats, args=(session,), daemon=True)
        # The handler may run long: the worker is not waited for when the session
        # ends; it drops whatever it finishes for a session that has ended.
        worker = threading.Thread(target=self._worker, args=(session,), daemon=True)
        heartbeats.start()
        worker.start()
        self._send_heartbeat(session, 0)  # answered at once: then the session is live
        retry = True
        try:
            for frame in session.call:
                session.last_rx = time.monotonic()
                self._connected.set()
                kind = frame.WhichOneof("kind")
                if kind == "work":
                    self._on_work_part(session, frame.work)
                elif kind == "ack":
                    self._on_ack(frame.ack)
                elif kind == "cancel":
                    session.cancelled.add(frame.cancel.header.nonce)
                elif kind == "goodbye":
                    retry = frame.goodbye.retry
                    if not self._closing.is_set():
                        self._error(f"the gateway ended the session: {frame.goodbye.reason}")
                    break
        except grpc.RpcError as e:
            if not self._closing.is_set():
                self._error(f"stream: {e.code().name}: {e.details()}")
        finally:
            self._connected.clear()
            session.stop()
            heartbeats.join(timeout=5.0)
        return retry

    # ------------------------------------------------------------ session threads

    def _heartbeats(self, session: _Session) -> None:
        w = session.welcome
        busy = 0
        while not session.stopped.wait(w.heartbeat_s):
            if time.monotonic() - session.last_rx > w.heartbeat_timeout_s:
                self._error(f"nothing from the gateway for {w.heartbeat_timeout_s}s: reconnecting")
                session.stop()
                return
            busy = session.work.qsize()
            self._send_heartbeat(session, busy)

    def _send_heartbeat(self, session: _Session, busy: int) -> None:
        session.send(pb.VolunteerFrame(heartbeat=pb.Heartbeat(header=session.header(), busy=busy)))

    def _on_ack(self, ack: pb.Ack) -> None:
        with self._lock:
            self._credit = ack.credit
            self._gateway_done = ack.work_done
            self._gateway_rejected = ack.work_rejected
        if not ack.accepted:
            self._error(f"the gateway rejected a message: {ack.reason}")

    def _on_work_part(self, session: _Session, item: pb.WorkItem) -> None:
        nonce = item.header.nonce
        if item.part == 0:
            session.incoming[nonce] = (Assembler(session.limits), item)
        entry = session.incoming.get(nonce)
        if entry is None:
            self._error(f"a work item part {item.part} arrived without its part 0")
            return
        assembler, first = entry
        try:
            for chunk in item.chunks:
                assembler.add(chunk)
            if not item.last:
                return
            tensors = assembler.finish()
            args = json.loads(first.args_json or "{}")
        except (WireError, ValueError) as e:
            del session.incoming[nonce]
            self._error(f"a malformed work item: {e}")
            return
        del session.incoming[nonce]
        session.work.put((first, tensors, args))

    def _worker(self, session: _Session) -> None:
        while True:
            got = session.work.get()
            if got is _Session.STOP or session.stopped.is_set():
                return
            item, tensors, args = got
            if item.header.nonce in session.cancelled:
                session.cancelled.discard(item.header.nonce)
                continue
            error = ""
            out_tensors: dict[str, torch.Tensor] = {}
            out_args: dict[str, Any] = {}
            try:
                out_tensors, out_args = self.handler(item.method, tensors, args)
                self._check_outgoing(session, out_tensors, out_args)
            except Exception as e:
                error = f"{type(e).__name__}: {e}"[:MAX_ERROR_CHARS]
                out_tensors, out_args = {}, {}
                with self._lock:
                    self._work_failed += 1
                log.exception("volunteer %s: %s failed", self.name, item.method)
            if session.stopped.is_set() or item.header.nonce in session.cancelled:
                continue
            for frame in self._result_frames(session, item, out_tensors, out_args, error):
                session.send(frame)
            with self._lock:
                self._work_done += 1

    def _check_outgoing(
        self, session: _Session, tensors: Mapping[str, torch.Tensor], args: Mapping[str, Any]
    ) -> None:
        """An honest volunteer checks its answer against the gateway's bounds before sending."""
        check_tensors(tensors, session.limits)
        json.dumps(dict(args), allow_nan=False)

    def _result_frames(
        self,
        session: _Session,
        item: pb.WorkItem,
        tensors: Mapping[str, torch.Tensor],
        args: Mapping[str, Any],
        error: str,
    ) -> Iterator[pb.VolunteerFrame]:
        """The frames answering ``item`` (``seq`` is numbered when each is queued)."""
        groups = list(pack_chunks(tensors, session.limits.chunk_bytes))
        for i, group in enumerate(groups):
            header = session.header(item.header.step, item.header.nonce)
            result = pb.Result(
                header=header,
                args_json=json.dumps(dict(args)) if i == 0 else "",
                part=i,
                last=i == len(groups) - 1,
                chunks=group,
                error=error if i == 0 else "",
            )
            yield pb.VolunteerFrame(result=result)
