"""The volunteer gateway: untrusted machines outside the Ray cluster do work over gRPC.

Volunteers never join the Ray cluster (Ray moves pickles; only trusted nodes
belong there). They reach this gateway over gRPC with TLS and a per-volunteer
token, and everything they send is protobuf (collectives/volunteer.proto) with
tensors as raw bytes plus dtype and shape (collectives/tensor_wire.py). This
module is plain Python with no Ray: the gateway actor wraps it.

Protocol
--------
1. ``Register(token, name, capabilities)``: the token is checked against the
   run's ``tokens.json`` (storage/gateway_trust.py); the answer is a
   ``Welcome``: the volunteer's id (its token's name, stable across
   reconnects), a fresh random session key, a random ``seq_start``, the job id,
   the job's config for volunteers, and the gateway's timing, size and rate
   limits. Registering again (a reconnect) replaces the previous session.
2. ``Stream``: one long-lived bidirectional stream *opened by the volunteer*
   (so it needs no inbound port, and NAT is no obstacle). Its first frame is
   ``Hello(volunteer_id, session_key)``. Down it go work items (``WorkItem``
   frames: method, JSON args, tensors, a deadline) and ``Ack``/``Cancel``/
   ``Goodbye``; up come ``Result`` frames and ``Heartbeat``s. Every frame has
   the job id, a step (or round) and a nonce: a work item's nonce is 16
   random bytes that its result must repeat; the volunteer's frames also
   carry a ``seq`` strictly increasing from ``seq_start``. A message larger
   than one frame (``WireLimits.chunk_bytes`` of tensor data) spans several
   frames ``part=0, 1, ...`` with ``last`` set on the final one.
3. ``Leave(volunteer_id, session_key)``: a clean goodbye; its outstanding
   work fails at once with ``VolunteerLost``.

Trust model: what the gateway guarantees before anything reaches the caller
---------------------------------------------------------------------------
- The peer holds a valid, unrevoked token and the session key it was given
  over TLS (a plaintext client cannot even connect), and is not banned. A
  revocation is noticed for new connections at once and for live ones at the
  volunteer's next heartbeat (it is then disconnected).
- Every frame is at most the gRPC message bound; every message is within
  ``WireLimits`` (tensor count, elements and bytes per tensor and per
  message, all checked before allocating) and the JSON bound; dtypes are on
  an allow-list; nothing is unpickled or executed.
- Every frame passes the volunteer's token buckets (messages/s and bytes/s);
  a frame over the rate is dropped, and a volunteer over the rate more than
  ``max_rate_violations`` times within ``rate_violation_window_s`` is
  disconnected.
- A result is accepted only as the answer to an outstanding work item of
  *that* volunteer, with the matching nonce and step; a replay of an
  answered nonce, an unknown nonce, a late answer, a wrong job id or a
  non-increasing seq is rejected and counted.
- A result's tensors are finite, match the caller's ``expect`` spec (names,
  dtypes, shapes) and, if asked, a norm bound, before its future resolves.
  Otherwise the future raises ``WorkRejected`` and the volunteer's
  ``work_rejected`` grows. Robust aggregation and spot checks are the
  caller's: this layer guarantees well-formed, bounded, authenticated data,
  not honest data.
- A volunteer that sends nothing for ``heartbeat_timeout_s`` (or whose
  connection breaks without ``Leave``) is gone: its outstanding work fails
  with ``VolunteerLost``.

The caller's API (thread-safe): ``start``, ``stop``, ``submit`` (a
``concurrent.futures.Future`` per work item), ``volunteers``, ``credit``,
``ban``/``unban``, ``set_role``, ``on_join``/``on_leave``, and an ``audit``
callback receiving every event (joined, left, lost, rejected, rate_limited,
revoked, banned, unbanned, and disconnected when the gateway stops) with its
fields.
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch

from collectives import volunteer_pb2 as pb
from collectives import volunteer_pb2_grpc as pb_grpc
from collectives.tensor_wire import (
    ALLOWED_DTYPES,
    MAX_NAME_CHARS,
    Assembler,
    WireError,
    WireLimits,
    check_tensors,
    dtype_name,
    pack_chunks,
)
from storage.gateway_trust import GatewayCredentials, lookup_token

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
MAX_ERROR_CHARS = 1000  # a volunteer's error text is kept this long
MAX_METHOD_CHARS = 128
_REMEMBERED_NONCES = 4096  # per volunteer: answered/expired nonces, to tell a replay apart


# ---------------------------------------------------------------------- errors


class VolunteerWorkError(RuntimeError):
    """A work item sent to a volunteer did not produce an accepted result."""


class VolunteerLost(VolunteerWorkError):
    """The volunteer left, disconnected, missed heartbeats, or was banned or revoked."""


class WorkTimeout(VolunteerWorkError):
    """The volunteer did not answer within the work item's deadline."""


class WorkRejected(VolunteerWorkError):
    """The result failed the gateway's checks; ``kind`` says which (see ``check_result``)."""

    def __init__(self, message: str, kind: str = "rejected"):
        super().__init__(message)
        self.kind = kind


class WorkFailed(VolunteerWorkError):
    """The volunteer's handler raised; the message holds its (untrusted, truncated) text."""


# ---------------------------------------------------------------------- config


@dataclass(frozen=True, kw_only=True)
class GatewayConfig:
    """Everything the gateway needs; every bound and timeout is explicit here."""

    job_id: str
    run_dir: str  # where gateway/tokens.json lives
    credentials: GatewayCredentials
    host: str = "127.0.0.1"  # "0.0.0.0" to accept volunteers from other machines
    port: int = 0  # 0: a free port, returned by start()
    volunteer_config: Mapping[str, Any] = field(default_factory=dict)  # sent in Welcome
    heartbeat_s: float = 1.0  # how often volunteers send a heartbeat
    heartbeat_timeout_s: float = 5.0  # silence after which a volunteer is lost
    hello_timeout_s: float = 5.0  # a new stream must send its Hello within this
    limits: WireLimits = field(default_factory=WireLimits)
    max_json_bytes: int = 64 << 10  # args, capabilities
    max_volunteers: int = 64  # connected at once
    rate_msgs_per_s: float = 200.0
    rate_msgs_burst: float = 400.0
    rate_bytes_per_s: float = float(64 << 20)
    rate_bytes_burst: float = float(160 << 20)
    max_rate_violations: int = 100  # dropped frames within the window before a disconnect
    rate_violation_window_s: float = 10.0
    monitor_interval_s: float = 0.05  # how often deadlines and heartbeats are checked
    stop_grace_s: float = 2.0

    def __post_init__(self) -> None:
        positive = (
            "heartbeat_s",
            "heartbeat_timeout_s",
            "hello_timeout_s",
            "max_json_bytes",
            "max_volunteers",
            "rate_msgs_per_s",
            "rate_msgs_burst",
            "rate_bytes_per_s",
            "rate_bytes_burst",
            "max_rate_violations",
            "rate_violation_window_s",
            "monitor_interval_s",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"GatewayConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.heartbeat_timeout_s <= self.heartbeat_s:
            raise ValueError(
                f"GatewayConfig.heartbeat_timeout_s ({self.heartbeat_timeout_s}) must exceed "
                f"heartbeat_s ({self.heartbeat_s})"
            )
        if self.rate_bytes_burst < self.frame_limit or self.rate_msgs_burst < 1:
            raise ValueError(
                f"GatewayConfig.rate_bytes_burst ({self.rate_bytes_burst}) must hold one full "
                f"frame ({self.frame_limit} bytes) and rate_msgs_burst one message"
            )
        json.dumps(dict(self.volunteer_config), allow_nan=False)  # must be sendable

    @property
    def frame_limit(self) -> int:
        """The largest gRPC message either side accepts: one frame's data plus its metadata."""
        per_chunk = MAX_NAME_CHARS + 11 * self.limits.max_ndim + 64
        return (
            self.limits.chunk_bytes
            + 2 * self.max_json_bytes
            + MAX_ERROR_CHARS * 4
            + self.limits.max_tensors * per_chunk
            + 4096
        )


# ---------------------------------------------------------------------- checks


def _json_object(text: str, max_bytes: int, what: str) -> dict[str, Any]:
    """Parse untrusted JSON that must be a small object; WorkRejected otherwise."""
    size = len(text.encode())
    if size > max_bytes:
        raise WorkRejected(f"{what} is {size} bytes, over the bound of {max_bytes}", "oversized")

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not allowed")

    try:
        value = json.loads(text or "{}", parse_constant=no_constants)
    except (ValueError, RecursionError) as e:
        raise WorkRejected(f"{what} is not valid JSON: {str(e)[:200]}", "malformed") from None
    if not isinstance(value, dict):
        raise WorkRejected(f"{what} must be a JSON object", "malformed")
    return value


ExpectSpec = Mapping[str, tuple[torch.dtype | str, tuple[int | None, ...] | None]]


def relative_difference(mine: torch.Tensor, truth: torch.Tensor) -> float:
    """``|mine - truth| / |truth|`` (L2): how far an untrusted result is from the trusted one
    (a spot check passes below ``gateway.spot_check_rtol``)."""
    diff = float(torch.linalg.vector_norm(mine.float() - truth.float()))
    return diff / (float(torch.linalg.vector_norm(truth.float())) + 1e-12)


def check_result(
    tensors: Mapping[str, torch.Tensor],
    expect: ExpectSpec | None = None,
    max_norm: float | None = None,
) -> None:
    """Raise WorkRejected unless ``tensors`` is what a caller may use.

    ``expect``: ``{name: (dtype, shape)}``, the exact set of names; a shape
    of None accepts any shape, a None dim any size. Every floating tensor
    must be finite, and with ``max_norm`` have an L2 norm at most that.
    """
    if expect is not None:
        missing = sorted(set(expect) - set(tensors))
        extra = sorted(set(tensors) - set(expect))
        if missing or extra:
            raise WorkRejected(
                f"tensors {sorted(tensors)[:20]} do not match the expected {sorted(expect)[:20]}"
                f" (missing {missing[:10]}, unexpected {extra[:10]})",
                "names",
            )
        for name, (dtype, shape) in expect.items():
            t = tensors[name]
            want = ALLOWED_DTYPES[dtype] if isinstance(dtype, str) else dtype
            if t.dtype != want:
                raise WorkRejected(
                    f"{name!r} is {dtype_name(t.dtype)}, expected {dtype_name(want)}", "dtype"
                )
            if shape is not None and (
                len(shape) != t.dim()
                or any(w is not None and w != d for w, d in zip(shape, t.shape, strict=True))
            ):
                raise WorkRejected(
                    f"{name!r} has shape {list(t.shape)}, expected {list(shape)}", "shape"
                )
    for name, t in tensors.items():
        if not t.is_floating_point():
            continue
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise WorkRejected(f"{name!r} has {bad} non-finite values (NaN or inf)", "non_finite")
        if max_norm is not None:
            norm = float(torch.linalg.vector_norm(t.float()))
            if norm > max_norm:
                raise WorkRejected(f"{name!r} has norm {norm:.4g} > max_norm {max_norm}", "norm")


class TokenBucket:
    """``rate`` per second, at most ``burst`` saved up; ``take`` never blocks."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self._clock = rate, burst, clock
        self._level = burst
        self._t = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._level = min(self.burst, self._level + (now - self._t) * self.rate)
        self._t = now

    def take(self, amount: float) -> bool:
        self._refill()
        if amount <= self._level:
            self._level -= amount
            return True
        return False

    def wait_time(self, amount: float) -> float:
        """Seconds until ``take(amount)`` would succeed (0 if it would now)."""
        self._refill()
        return max(0.0, (min(amount, self.burst) - self._level) / self.rate)


# ---------------------------------------------------------------------- state


@dataclass(frozen=True)
class VolunteerInfo:
    """One volunteer as the caller sees it (``volunteers()``)."""

    volunteer_id: str
    name: str
    role: str
    connected: bool
    connected_since: float | None  # time.time() of the current connection
    work_done: int
    work_rejected: int  # results that failed the checks
    work_failed: int  # the volunteer's handler raised
    messages_rejected: int  # replays, unknown nonces, rate-limited or malformed frames
    rejections: dict[str, int]  # by kind, work and messages together
    credit: float
    banned: str | None
    capabilities: dict[str, Any]
    peer: str


@dataclass
class _Work:
    nonce: bytes
    method: str
    step: int
    deadline_s: float
    deadline: float  # monotonic
    future: Future
    expect: ExpectSpec | None
    max_norm: float | None
    next_part: int = 0
    assembler: Assembler | None = None
    args_json: str = ""
    error: str = ""


class _Stream:
    """One Stream RPC: the frames queued for it and whether it has ended."""

    END = object()

    def __init__(self, peer: str):
        self.peer = peer
        self.out: queue.Queue = queue.Queue()
        self.closed = False
        self.hello = threading.Event()
        self.refused: tuple[grpc.StatusCode, str] | None = None
        self.volunteer: _Volunteer | None = None

    def send(self, frame: pb.GatewayFrame) -> None:
        if not self.closed:
            self.out.put(frame)


@dataclass
class _Volunteer:
    volunteer_id: str
    token: str  # kept to re-check revocation on heartbeats
    name: str = ""
    role: str = "volunteer"
    capabilities: dict[str, Any] = field(default_factory=dict)
    peer: str = ""
    session_key: bytes = b""
    seq_last: int = 0
    stream: _Stream | None = None
    connected_since: float | None = None
    last_seen: float = 0.0
    work_done: int = 0
    work_rejected: int = 0
    work_failed: int = 0
    messages_rejected: int = 0
    rejections: Counter = field(default_factory=Counter)
    credit: float = 0.0
    banned: str | None = None
    outstanding: dict[bytes, _Work] = field(default_factory=dict)
    finished: OrderedDict = field(default_factory=OrderedDict)  # nonce -> how it ended
    msg_bucket: TokenBucket | None = None
    byte_bucket: TokenBucket | None = None
    violations: deque = field(default_factory=deque)  # monotonic times of dropped frames
    rate_limited: bool = False  # in a rate-limited episode (audited once per episode)

    def remember(self, nonce: bytes, how: str) -> None:
        self.finished[nonce] = how
        while len(self.finished) > _REMEMBERED_NONCES:
            self.finished.popitem(last=False)

    def info(self) -> VolunteerInfo:
        return VolunteerInfo(
            volunteer_id=self.volunteer_id,
            name=self.name,
            role=self.role,
            connected=self.stream is not None,
            connected_since=self.connected_since if self.stream is not None else None,
            work_done=self.work_done,
            work_rejected=self.work_rejected,
            work_failed=self.work_failed,
            messages_rejected=self.messages_rejected,
            rejections=dict(self.rejections),
            credit=self.credit,
            banned=self.banned,
            capabilities=dict(self.capabilities),
            peer=self.peer,
        )


class _Effects:
    """What a locked section decided, carried out after the lock is released.

    Futures are settled and callbacks run outside the gateway's lock, so a
    callback may call back into the gateway.
    """

    def __init__(self) -> None:
        self.settle: list[tuple[Future, Any, BaseException | None]] = []
        self.audits: list[tuple[str, dict[str, Any]]] = []
        self.joined: list[VolunteerInfo] = []
        self.left: list[tuple[VolunteerInfo, str]] = []

    def fail(self, work: _Work, error: BaseException) -> None:
        self.settle.append((work.future, None, error))

    def resolve(self, work: _Work, value: Any) -> None:
        self.settle.append((work.future, value, None))

    def audit(self, event: str, **fields: Any) -> None:
        self.audits.append((event, fields))


# ---------------------------------------------------------------------- gateway


class VolunteerGateway:
    """The gRPC gateway for volunteers (see the module docstring for the protocol).

    ``audit(event, **fields)`` receives every event; it must not block for long.
    """

    def __init__(self, config: GatewayConfig, audit: Callable[..., None] | None = None):
        self.config = config
        self._audit = audit
        self._lock = threading.RLock()
        self._volunteers: dict[str, _Volunteer] = {}
        self._on_join: list[Callable[[VolunteerInfo], None]] = []
        self._on_leave: list[Callable[[VolunteerInfo, str], None]] = []
        self._server: grpc.Server | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._monitor: threading.Thread | None = None
        self._stopping = threading.Event()
        self.port: int | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> int:
        """Serve (TLS only) on ``config.host:config.port``; returns the bound port."""
        if self._server is not None:
            raise RuntimeError("the gateway is already started")
        cfg = self.config
        slots = cfg.max_volunteers + 8  # a thread per stream, plus Register/Leave and strays
        options = [
            ("grpc.max_receive_message_length", cfg.frame_limit),
            ("grpc.max_send_message_length", cfg.frame_limit),
            ("grpc.so_reuseport", 0),  # no other process may share the port
        ]
        executor = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="gateway-rpc")
        server = grpc.server(
            executor,
            options=options,
            maximum_concurrent_rpcs=slots,
        )
        pb_grpc.add_GatewayServicer_to_server(_Servicer(self), server)
        creds = grpc.ssl_server_credentials(
            [(cfg.credentials.server_key_pem, cfg.credentials.server_cert_pem)],
            require_client_auth=False,
        )
        port = server.add_secure_port(f"{cfg.host}:{cfg.port}", creds)
        if port == 0:
            executor.shutdown(wait=False)
            raise OSError(f"the volunteer gateway cannot bind {cfg.host}:{cfg.port}")
        server.start()
        self._stopping.clear()
        self._server, self._executor, self.port = server, executor, port
        self._monitor = threading.Thread(target=self._monitor_loop, name="gateway-monitor")
        self._monitor.daemon = True
        self._monitor.start()
        log.info("volunteer gateway for job %s on %s:%d (TLS)", cfg.job_id, cfg.host, port)
        return port

    def stop(self, grace_s: float | None = None, final: bool = False) -> None:
        """Say goodbye to every volunteer, fail all work, stop.

        ``final``: the job is over, so volunteers are told not to reconnect;
        otherwise (a gateway restarting) they may.
        """
        if self._server is None:
            return
        self._stopping.set()
        fx = _Effects()
        with self._lock:
            for vol in self._volunteers.values():
                if vol.stream is not None:
                    why = "the job has ended" if final else "the gateway is stopping"
                    self._detach(vol, vol.stream, "disconnected", why, fx, retry=not final)
                vol.session_key = b""
        self._run(fx)
        grace = self.config.stop_grace_s if grace_s is None else grace_s
        self._server.stop(grace).wait(grace + 5.0)
        if self._monitor is not None:
            self._monitor.join(timeout=5.0)
        if self._executor is not None:
            self._executor.shutdown(wait=False)
        self._server, self._executor, self._monitor = None, None, None

    # ------------------------------------------------------------ caller API

    def volunteers(self) -> list[VolunteerInfo]:
        """Every volunteer seen since start, connected or not."""
        with self._lock:
            return [v.info() for v in self._volunteers.values()]

    def on_join(self, callback: Callable[[VolunteerInfo], None]) -> None:
        """Call ``callback(info)`` whenever a volunteer's stream opens (it can take work)."""
        with self._lock:
            self._on_join.append(callback)

    def on_leave(self, callback: Callable[[VolunteerInfo, str], None]) -> None:
        """Call ``callback(info, why)`` whenever a volunteer leaves, is lost, banned or revoked."""
        with self._lock:
            self._on_leave.append(callback)

    def credit(self, volunteer_id: str, amount: float) -> float:
        """Add ``amount`` to the volunteer's credit (reported to it in acks); the new total."""
        with self._lock:
            vol = self._get(volunteer_id)
            vol.credit += float(amount)
            return vol.credit

    def set_role(self, volunteer_id: str, role: str) -> None:
        with self._lock:
            self._get(volunteer_id).role = role

    def ban(self, volunteer_id: str, reason: str) -> None:
        """Disconnect the volunteer and refuse its token until ``unban``."""
        fx = _Effects()
        with self._lock:
            vol = self._get(volunteer_id)
            vol.banned = reason
            vol.session_key = b""
            if vol.stream is not None:  # audited as "banned" there
                self._detach(vol, vol.stream, "banned", reason, fx, retry=False)
            else:
                fx.audit("banned", volunteer_id=volunteer_id, name=vol.name, why=reason)
        self._run(fx)

    def unban(self, volunteer_id: str) -> None:
        fx = _Effects()
        with self._lock:
            vol = self._get(volunteer_id)
            vol.banned = None
            fx.audit("unbanned", volunteer_id=volunteer_id, name=vol.name)
        self._run(fx)

    def submit(
        self,
        volunteer_id: str,
        method: str,
        tensors: Mapping[str, torch.Tensor],
        args: Mapping[str, Any],
        step: int,
        deadline_s: float,
        expect: ExpectSpec | None = None,
        max_norm: float | None = None,
    ) -> Future:
        """Send one work item; the future resolves to ``(tensors, args)`` of an accepted result.

        It raises ``VolunteerLost`` (not connected, or gone before answering),
        ``WorkTimeout`` (no answer within ``deadline_s``), ``WorkRejected``
        (the result failed ``check_result(expect, max_norm)`` or the wire
        bounds) or ``WorkFailed`` (the volunteer's handler raised). A bad
        request (disallowed dtype, too large, args not JSON) raises ValueError
        here. The future cannot be cancelled: the deadline ends it.
        """
        cfg = self.config
        if not isinstance(method, str) or not 0 < len(method) <= MAX_METHOD_CHARS:
            raise ValueError(f"method must be 1..{MAX_METHOD_CHARS} characters, got {method!r}")
        if not deadline_s > 0:
            raise ValueError(f"deadline_s must be > 0, got {deadline_s}")
        check_tensors(tensors, cfg.limits)
        args_json = json.dumps(dict(args), allow_nan=False)
        if len(args_json.encode()) > cfg.max_json_bytes:
            raise ValueError(f"args are {len(args_json)} bytes of JSON, over {cfg.max_json_bytes}")
        if expect is not None:
            for name, (dtype, _) in expect.items():
                if isinstance(dtype, str) and dtype not in ALLOWED_DTYPES:
                    raise ValueError(f"expect[{name!r}]: unknown dtype {dtype!r}")
        nonce = secrets.token_bytes(16)
        header = pb.Header(job_id=cfg.job_id, step=int(step), nonce=nonce)
        groups = list(pack_chunks(tensors, cfg.limits.chunk_bytes))
        frames = [
            pb.GatewayFrame(
                work=pb.WorkItem(
                    header=header,
                    method=method if i == 0 else "",
                    args_json=args_json if i == 0 else "",
                    deadline_s=deadline_s,
                    part=i,
                    last=i == len(groups) - 1,
                    chunks=group,
                )
            )
            for i, group in enumerate(groups)
        ]
        future: Future = Future()
        future.set_running_or_notify_cancel()
        with self._lock:
            vol = self._volunteers.get(volunteer_id)
            if vol is None or vol.stream is None:
                future.set_exception(VolunteerLost(f"volunteer {volunteer_id!r} is not connected"))
                return future
            vol.outstanding[nonce] = _Work(
                nonce=nonce,
                method=method,
                step=int(step),
                deadline_s=deadline_s,
                deadline=time.monotonic() + deadline_s,
                future=future,
                expect=expect,
                max_norm=max_norm,
            )
            for frame in frames:
                vol.stream.send(frame)
        return future

    # ------------------------------------------------------------ internals

    def _get(self, volunteer_id: str) -> _Volunteer:
        vol = self._volunteers.get(volunteer_id)
        if vol is None:
            raise KeyError(f"no volunteer {volunteer_id!r} (known: {sorted(self._volunteers)})")
        return vol

    def _run(self, fx: _Effects) -> None:
        for future, value, error in fx.settle:
            if future.done():
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(value)
        if self._audit is not None:
            for event, fields in fx.audits:
                try:
                    self._audit(event, **fields)
                except Exception:
                    log.exception("the gateway's audit callback failed on %s", event)
        with self._lock:
            joins, leaves = list(self._on_join), list(self._on_leave)
        for info in fx.joined:
            for cb in joins:
                try:
                    cb(info)
                except Exception:
                    log.exception("an on_join callback failed")
        for info, why in fx.left:
            for cb in leaves:
                try:
                    cb(info, why)
                except Exception:
                    log.exception("an on_leave callback failed")

    def _detach(
        self, vol: _Volunteer, stream: _Stream, event: str, why: str, fx: _Effects, retry: bool
    ) -> None:
        """End ``stream`` (idempotent); if it is the volunteer's, it is disconnected.

        Its outstanding work fails with VolunteerLost; ``event`` is audited.
        Call with the lock held.
        """
        if stream.closed:
            return
        stream.send(pb.GatewayFrame(goodbye=pb.Goodbye(reason=f"{event}: {why}", retry=retry)))
        stream.closed = True
        stream.out.put(_Stream.END)
        if vol.stream is not stream:
            return
        vol.stream = None
        lost = VolunteerLost(f"volunteer {vol.volunteer_id!r} ({vol.name}) {event}: {why}")
        for work in vol.outstanding.values():
            vol.remember(work.nonce, "lost")
            fx.fail(work, lost)
        vol.outstanding.clear()
        fx.audit(event, volunteer_id=vol.volunteer_id, name=vol.name, peer=stream.peer, why=why)
        fx.left.append((vol.info(), f"{event}: {why}"))

    def _reject_message(
        self, vol: _Volunteer, stream: _Stream, kind: str, why: str, fx: _Effects
    ) -> None:
        vol.messages_rejected += 1
        vol.rejections[kind] += 1
        fx.audit("rejected", volunteer_id=vol.volunteer_id, name=vol.name, kind=kind, why=why)
        stream.send(pb.GatewayFrame(ack=self._ack(vol, None, False, why)))

    def _reject_work(
        self, vol: _Volunteer, stream: _Stream, work: _Work, error: WorkRejected, fx: _Effects
    ) -> None:
        if vol.outstanding.pop(work.nonce, None) is None:
            return  # expired or lost meanwhile
        vol.remember(work.nonce, "rejected")
        vol.work_rejected += 1
        vol.rejections[error.kind] += 1
        text = (
            f"volunteer {vol.volunteer_id!r} ({vol.name}): result of {work.method} "
            f"(step {work.step}) rejected: {error}"
        )
        fx.fail(work, WorkRejected(text, error.kind))
        fx.audit(
            "rejected",
            volunteer_id=vol.volunteer_id,
            name=vol.name,
            kind=error.kind,
            why=str(error),
            method=work.method,
            step=work.step,
            nonce=work.nonce.hex(),
        )
        stream.send(pb.GatewayFrame(ack=self._ack(vol, work, False, str(error))))

    def _ack(self, vol: _Volunteer, work: _Work | None, accepted: bool, reason: str) -> pb.Ack:
        header = pb.Header(job_id=self.config.job_id)
        if work is not None:
            header.step, header.nonce = work.step, work.nonce
        return pb.Ack(
            header=header,
            accepted=accepted,
            reason=reason[:MAX_ERROR_CHARS],
            credit=vol.credit,
            work_done=vol.work_done,
            work_rejected=vol.work_rejected,
        )

    def _monitor_loop(self) -> None:
        cfg = self.config
        while not self._stopping.wait(cfg.monitor_interval_s):
            now = time.monotonic()
            fx = _Effects()
            with self._lock:
                for vol in self._volunteers.values():
                    if vol.stream is not None and now - vol.last_seen > cfg.heartbeat_timeout_s:
                        why = f"nothing received for {cfg.heartbeat_timeout_s}s (missed heartbeats)"
                        self._detach(vol, vol.stream, "lost", why, fx, retry=True)
                    for work in [w for w in vol.outstanding.values() if now > w.deadline]:
                        del vol.outstanding[work.nonce]
                        vol.remember(work.nonce, "expired")
                        fx.fail(
                            work,
                            WorkTimeout(
                                f"volunteer {vol.volunteer_id!r} ({vol.name}) did not answer "
                                f"{work.method} (step {work.step}) within {work.deadline_s}s"
                            ),
                        )
                        if vol.stream is not None:
                            header = pb.Header(job_id=cfg.job_id, step=work.step, nonce=work.nonce)
                            vol.stream.send(pb.GatewayFrame(cancel=pb.Cancel(header=header)))
            self._run(fx)

    # ------------------------------------------------------------ RPCs

    def _register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> pb.Welcome:
        cfg = self.config
        peer = context.peer()
        if request.protocol_version != PROTOCOL_VERSION:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol version {request.protocol_version} is not supported "
                f"(this gateway speaks {PROTOCOL_VERSION})",
            )
        token = lookup_token(cfg.run_dir, request.token)
        if token is None or token.revoked is not None:
            why = "unknown token" if token is None else f"token {token.name!r} is revoked"
            self._run_audit("rejected", kind="token", why=why, peer=peer)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"registration refused: {why}")
        name = request.name.strip()
        if not 0 < len(name) <= 64 or not name.isprintable():
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "name must be 1..64 printable chars")
        try:
            caps = _json_object(request.capabilities_json, cfg.max_json_bytes, "capabilities")
        except WorkRejected as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        fx = _Effects()
        refusal: tuple[grpc.StatusCode, str] | None = None
        with self._lock:
            vol = self._volunteers.get(token.name)
            connected = sum(v.stream is not None for v in self._volunteers.values())
            if vol is not None and vol.banned is not None:
                refusal = (
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"registration refused: volunteer {token.name!r} is banned: {vol.banned}",
                )
            elif connected >= cfg.max_volunteers and (vol is None or vol.stream is None):
                refusal = (
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the gateway is full ({cfg.max_volunteers} volunteers connected)",
                )
            else:
                if vol is None:
                    vol = _Volunteer(volunteer_id=token.name, token=request.token)
                    self._volunteers[token.name] = vol
                if vol.stream is not None:
                    self._detach(
                        vol, vol.stream, "lost", "replaced by a new registration", fx, True
                    )
                role = caps.get("role")
                vol.token, vol.name, vol.capabilities, vol.peer = request.token, name, caps, peer
                vol.role = role if isinstance(role, str) and 0 < len(role) <= 32 else vol.role
                vol.session_key = secrets.token_bytes(32)
                vol.seq_last = secrets.randbits(62)
                session_key, seq_start = vol.session_key, vol.seq_last
        self._run(fx)
        if refusal is not None:
            self._run_audit("rejected", kind="register", why=refusal[1], peer=peer)
            context.abort(*refusal)
        limits = cfg.limits
        return pb.Welcome(
            volunteer_id=token.name,
            session_key=session_key,
            seq_start=seq_start,
            job_id=cfg.job_id,
            config_json=json.dumps(dict(cfg.volunteer_config)),
            heartbeat_s=cfg.heartbeat_s,
            heartbeat_timeout_s=cfg.heartbeat_timeout_s,
            frame_bytes=limits.chunk_bytes,
            max_message_bytes=limits.max_message_bytes,
            max_tensor_bytes=limits.max_tensor_bytes,
            max_tensor_elements=limits.max_tensor_elements,
            rate_msgs_per_s=cfg.rate_msgs_per_s,
            rate_msgs_burst=cfg.rate_msgs_burst,
            rate_bytes_per_s=cfg.rate_bytes_per_s,
            rate_bytes_burst=cfg.rate_bytes_burst,
            protocol_version=PROTOCOL_VERSION,
        )

    def _run_audit(self, event: str, **fields: Any) -> None:
        fx = _Effects()
        fx.audit(event, **fields)
        self._run(fx)

    def _session(self, volunteer_id: str, session_key: bytes) -> _Volunteer | None:
        """The volunteer whose live session this is, or None. Call with the lock held."""
        vol = self._volunteers.get(volunteer_id)
        if vol is None or not vol.session_key or vol.banned is not None:
            return None
        return vol if secrets.compare_digest(vol.session_key, session_key) else None

    def _leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.LeaveReply:
        fx = _Effects()
        with self._lock:
            vol = self._session(request.volunteer_id, request.session_key)
            if vol is not None:
                why = request.reason[:200] or "the volunteer left"
                if vol.stream is not None:
                    self._detach(vol, vol.stream, "left", why, fx, retry=False)
                vol.session_key = b""
        self._run(fx)
        if vol is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "leave refused: unknown session")
        return pb.LeaveReply()

    def _stream(self, request_iterator: Any, context: grpc.ServicerContext) -> Any:
        stream = _Stream(context.peer())
        context.add_callback(lambda: self._stream_ended(stream, "the connection closed"))
        reader = threading.Thread(
            target=self._read_loop, args=(stream, request_iterator), name="gateway-reader"
        )
        reader.daemon = True
        reader.start()
        if not stream.hello.wait(self.config.hello_timeout_s):
            stream.closed = True
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no Hello within hello_timeout_s")
        if stream.refused is not None:
            context.abort(*stream.refused)
        while True:
            try:
                item = stream.out.get(timeout=0.25)
            except queue.Empty:
                if not context.is_active():
                    return
                continue
            if item is _Stream.END:
                return
            yield item

    def _stream_ended(self, stream: _Stream, why: str) -> None:
        fx = _Effects()
        with self._lock:
            vol = stream.volunteer
            if vol is not None:
                self._detach(vol, stream, "lost", f"{why} without Leave", fx, retry=True)
            else:
                stream.closed = True
                stream.out.put(_Stream.END)
        self._run(fx)

    def _hello(self, stream: _Stream, frame: pb.VolunteerFrame) -> _Volunteer | None:
        if frame.WhichOneof("kind") != "hello":
            stream.refused = (grpc.StatusCode.INVALID_ARGUMENT, "a stream must start with Hello")
            return None
        fx = _Effects()
        with self._lock:
            vol = self._session(frame.hello.volunteer_id, frame.hello.session_key)
            if vol is None:
                stream.refused = (
                    grpc.StatusCode.UNAUTHENTICATED,
                    "stream refused: unknown or ended session (register again)",
                )
                return None
            if vol.stream is not None:
                self._detach(vol, vol.stream, "lost", "replaced by a new stream", fx, retry=True)
            cfg = self.config
            vol.stream, stream.volunteer = stream, vol
            vol.peer = stream.peer
            vol.connected_since = time.time()
            vol.last_seen = time.monotonic()
            vol.msg_bucket = TokenBucket(cfg.rate_msgs_per_s, cfg.rate_msgs_burst)
            vol.byte_bucket = TokenBucket(cfg.rate_bytes_per_s, cfg.rate_bytes_burst)
            vol.violations.clear()
            vol.rate_limited = False
            fx.audit(
                "joined",
                volunteer_id=vol.volunteer_id,
                name=vol.name,
                role=vol.role,
                peer=stream.peer,
                capabilities=vol.capabilities,
            )
            fx.joined.append(vol.info())
        self._run(fx)
        return vol

    def _read_loop(self, stream: _Stream, request_iterator: Any) -> None:
        why = "the stream ended"
        try:
            first = next(request_iterator, None)
            vol = None if first is None else self._hello(stream, first)
            if vol is None:
                if stream.refused is None:
                    stream.refused = (grpc.StatusCode.INVALID_ARGUMENT, "no Hello")
                stream.hello.set()
                return
            stream.hello.set()
            for frame in request_iterator:
                if stream.closed:
                    break
                self._on_frame(vol, stream, frame)
        except Exception as e:  # the RPC was cancelled or broke: the volunteer is gone
            why = f"the stream broke ({type(e).__name__})"
        finally:
            stream.hello.set()
            self._stream_ended(stream, why)

    def _on_frame(self, vol: _Volunteer, stream: _Stream, frame: pb.VolunteerFrame) -> None:
        cfg = self.config
        kind = frame.WhichOneof("kind")
        size = frame.ByteSize()
        fx = _Effects()
        result_work: _Work | None = None
        accepted = False
        with self._lock:
            if stream.closed:
                return
            now = time.monotonic()
            vol.last_seen = now
            assert vol.msg_bucket is not None and vol.byte_bucket is not None
            header = None
            if kind == "heartbeat":
                header = frame.heartbeat.header
            elif kind == "result":
                header = frame.result.header
            if not (vol.msg_bucket.take(1) and vol.byte_bucket.take(size)):
                self._rate_limited(vol, stream, frame, now, fx)
            elif header is None:
                self._reject_message(vol, stream, "malformed", f"unexpected frame {kind!r}", fx)
            elif header.job_id != cfg.job_id:
                why = f"job id {header.job_id[:64]!r} is not this job's"
                self._reject_message(vol, stream, "job_id", why, fx)
            elif header.seq <= vol.seq_last:
                why = f"seq {header.seq} not above {vol.seq_last} (a replayed frame?)"
                self._reject_message(vol, stream, "seq", why, fx)
            else:
                accepted = True
                vol.rate_limited = False
                vol.seq_last = header.seq
                if kind == "heartbeat":
                    stream.send(pb.GatewayFrame(ack=self._ack(vol, None, True, "")))
                else:
                    result_work = self._result_part(vol, stream, frame.result, fx)
        self._run(fx)
        if accepted and kind == "heartbeat":
            self._recheck_token(vol, stream)
        elif result_work is not None:
            self._assemble(vol, stream, result_work, frame.result)

    def _rate_limited(
        self, vol: _Volunteer, stream: _Stream, frame: pb.VolunteerFrame, now: float, fx: _Effects
    ) -> None:
        cfg = self.config
        vol.violations.append(now)
        while vol.violations and now - vol.violations[0] > cfg.rate_violation_window_s:
            vol.violations.popleft()
        if not vol.rate_limited:
            vol.rate_limited = True
            fx.audit(
                "rate_limited",
                volunteer_id=vol.volunteer_id,
                name=vol.name,
                why=f"over {cfg.rate_msgs_per_s} messages/s or {cfg.rate_bytes_per_s} bytes/s",
            )
        work = None
        if frame.WhichOneof("kind") == "result":
            work = vol.outstanding.get(frame.result.header.nonce)
        if work is not None:  # a part of a result: that work item fails (and is counted)
            err = WorkRejected("rate limit exceeded", "rate_limited")
            self._reject_work(vol, stream, work, err, fx)
        else:  # dropped without an ack: a flood gets no answers to add to it
            vol.messages_rejected += 1
            vol.rejections["rate_limited"] += 1
        if len(vol.violations) > cfg.max_rate_violations:
            why = (
                f"over the rate limit {len(vol.violations)} times within "
                f"{cfg.rate_violation_window_s}s"
            )
            fx.audit(
                "rate_limited",
                volunteer_id=vol.volunteer_id,
                name=vol.name,
                why=why,
                disconnected=True,
            )
            self._detach(vol, stream, "lost", why, fx, retry=True)

    def _result_part(
        self, vol: _Volunteer, stream: _Stream, r: pb.Result, fx: _Effects
    ) -> _Work | None:
        """Check a result frame against the outstanding work; the work to assemble into.

        Call with the lock held.
        """
        nonce = r.header.nonce
        work = vol.outstanding.get(nonce)
        if work is None:
            how = vol.finished.get(nonce)
            if how == "rejected" and r.part > 0:
                return None  # the tail of a result already rejected: dropped quietly
            if how in ("answered", "rejected", "failed"):
                kind, why = "replay", f"nonce {nonce.hex()[:32]} was already answered (replay)"
            elif how in ("expired", "lost"):
                kind, why = "late", f"nonce {nonce.hex()[:32]} is past its deadline or lost"
            else:
                kind, why = "unknown_nonce", f"nonce {nonce.hex()[:32]} names no work sent to you"
            self._reject_message(vol, stream, kind, why, fx)
            return None
        if r.header.step != work.step:
            err = WorkRejected(
                f"step {r.header.step} does not match the work's {work.step}", "step"
            )
            self._reject_work(vol, stream, work, err, fx)
            return None
        if r.part != work.next_part:
            err = WorkRejected(f"part {r.part} arrived, expected {work.next_part}", "malformed")
            self._reject_work(vol, stream, work, err, fx)
            return None
        if r.part == 0:
            work.assembler = Assembler(self.config.limits)
            work.args_json = r.args_json
            work.error = r.error[:MAX_ERROR_CHARS]
        work.next_part += 1
        return work

    def _assemble(self, vol: _Volunteer, stream: _Stream, work: _Work, r: pb.Result) -> None:
        """Copy a result frame's chunks (outside the lock) and, on its last part, check it."""
        assert work.assembler is not None
        fx = _Effects()
        try:
            for chunk in r.chunks:
                work.assembler.add(chunk)
            if not r.last:
                return
            tensors = work.assembler.finish()
            args = _json_object(work.args_json, self.config.max_json_bytes, "result args")
            if not work.error:
                check_result(tensors, work.expect, work.max_norm)
        except (WireError, WorkRejected) as e:
            err = e if isinstance(e, WorkRejected) else WorkRejected(str(e), e.kind)
            with self._lock:
                self._reject_work(vol, stream, work, err, fx)
            self._run(fx)
            return
        with self._lock:
            if vol.outstanding.pop(work.nonce, None) is None:
                return  # expired or lost while it was being checked
            if work.error:
                vol.remember(work.nonce, "failed")
                vol.work_failed += 1
                fx.fail(
                    work,
                    WorkFailed(
                        f"volunteer {vol.volunteer_id!r} ({vol.name}) failed {work.method} "
                        f"(step {work.step}): {work.error}"
                    ),
                )
                stream.send(pb.GatewayFrame(ack=self._ack(vol, work, False, "error recorded")))
            else:
                vol.remember(work.nonce, "answered")
                vol.work_done += 1
                fx.resolve(work, (tensors, args))
                stream.send(pb.GatewayFrame(ack=self._ack(vol, work, True, "")))
        self._run(fx)

    def _recheck_token(self, vol: _Volunteer, stream: _Stream) -> None:
        """Disconnect a live volunteer whose token was revoked (checked on each heartbeat)."""
        info = lookup_token(self.config.run_dir, vol.token)
        if info is not None and info.revoked is None:
            return
        fx = _Effects()
        with self._lock:
            vol.session_key = b""
            self._detach(vol, stream, "revoked", "its token was revoked", fx, retry=False)
        self._run(fx)


class _Servicer(pb_grpc.GatewayServicer):
    """The generated service's methods, handed to the gateway."""

    def __init__(self, gateway: VolunteerGateway):
        self._gateway = gateway

    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> pb.Welcome:
        return self._gateway._register(request, context)

    def Stream(self, request_iterator: Any, context: grpc.ServicerContext) -> Any:
        return self._gateway._stream(request_iterator, context)

    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.LeaveReply:
        return self._gateway._leave(request, context)
