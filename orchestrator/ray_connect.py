"""Connecting to an existing Ray cluster, with every wait bounded.

``ray.init(address=...)`` to a dead or wrong address waits a long time: for
``host:port`` its GCS client retries for many minutes, and a ``ray://``
address ends in a traceback after 30 s. :func:`connect_ray` fails within
about ``timeout_s`` with one line naming the address and what to check.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from types import FrameType
from typing import Any

CLIENT_SCHEME = "ray://"
# A TCP connect to a live port takes milliseconds, even across regions; this
# bound is for addresses that silently drop packets (firewalls, dead hosts).
PROBE_TIMEOUT_S = 5.0


class ClusterUnreachable(ConnectionError):
    """No Ray cluster answered at an address; the message is one line saying what to check."""


def connect_ray(
    address: str,
    *,
    timeout_s: float,
    namespace: str,
    setting: str = "the address",
    **init_kwargs: Any,
) -> None:
    """``ray.init(address=address, namespace=namespace, ...)`` that fails within ``timeout_s``.

    ``address`` is ``"auto"``, ``"host:port"`` (a GCS) or ``"ray://host:port"``
    (a Ray client server). The port Ray will dial is probed first, so a refused
    or unroutable address fails in seconds; ``ray.init`` then gets the time
    left. ``setting`` names where the address came from, for the message.
    Raises :class:`ClusterUnreachable`.
    """
    deadline = time.monotonic() + timeout_s
    target = _dialed(address)
    if target is not None:
        _probe(address, target, min(PROBE_TIMEOUT_S, timeout_s), setting)
    _init_within(
        address,
        deadline - time.monotonic(),
        timeout_s,
        setting,
        probed=target is not None,
        namespace=namespace,
        **init_kwargs,
    )


def _split_host_port(text: str) -> tuple[str, int] | None:
    host, sep, port = text.rstrip("/").rpartition(":")
    host = host.strip("[]")  # IPv6 literals: [::1]:6379
    if not sep or not host or not port.isdigit():
        return None
    return host, int(port)


def _dialed(address: str) -> tuple[str, int] | None:
    """The (host, port) ``ray.init`` will connect to, or None if not known here."""
    if address.startswith(CLIENT_SCHEME):
        # The Ray client dials the address as written.
        return _split_host_port(address[len(CLIENT_SCHEME) :])
    if address == "auto" or "://" in address:
        # "auto" is resolved inside ray.init (RAY_ADDRESS, the last `ray start`);
        # the time bound on ray.init still applies.
        return None
    parsed = _split_host_port(address)
    if parsed is None:
        return None
    try:
        # Ray replaces a loopback host by this node's IP before dialing a GCS;
        # probing 127.0.0.1 instead could refuse a cluster Ray would reach.
        from ray._private.services import resolve_ip_for_localhost

        return resolve_ip_for_localhost(parsed[0]), parsed[1]
    except Exception:  # noqa: BLE001 - a private Ray helper: without it, skip the probe
        return None


def _hint(address: str) -> str:
    if address.startswith(CLIENT_SCHEME):
        return "Is `ray start --head` (client port 10001 by default) running there?"
    if address == "auto":
        return "Is `ray start --head` running here, or RAY_ADDRESS set?"
    return "Is `ray start --head` running there?"


def _probe(address: str, target: tuple[str, int], timeout_s: float, setting: str) -> None:
    """Fail fast, naming the address, if nothing accepts connections at ``target``."""
    try:
        with socket.create_connection(target, timeout=timeout_s):
            return
    except ConnectionRefusedError:
        reason = "connection refused"
    except TimeoutError:
        reason = "no answer (a firewall, or a host that is down?)"
    except socket.gaierror:
        reason = f"unknown host {target[0]!r}"
    except OSError as e:
        reason = e.strerror or str(e)
    host, port = target
    via = "" if address.endswith(f"{host}:{port}") else f" (Ray dials {host}:{port})"
    raise ClusterUnreachable(
        f"cannot reach a Ray cluster at {address}{via} within {timeout_s:g}s: {reason}. "
        f"{_hint(address)} Check {setting}"
    )


def _init_within(
    address: str,
    time_left_s: float,
    timeout_s: float,
    setting: str,
    *,
    probed: bool,
    **init_kwargs: Any,
) -> None:
    """Run ``ray.init`` in a daemon thread and stop waiting for it after ``time_left_s``.

    A thread because ray.init blocks in C++ (retrying a GCS for minutes) where
    nothing can interrupt it. If it does not finish, it is left running: the
    process should give up on Ray (a later ray.init in it would clash).
    """
    import ray

    outcome: list[BaseException | None] = []

    def init() -> None:
        try:
            ray.init(address=address, **init_kwargs)
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - handed over to the waiting thread
            outcome.append(e)

    # ray.init sets a SIGTERM handler only from the main thread, and warns from ours.
    on_main = threading.current_thread() is threading.main_thread()
    if on_main:
        _exit_on_sigterm()
    thread = threading.Thread(target=init, name="shoal-ray-connect", daemon=True)
    with _without_sigterm_warning() if on_main else nullcontext():
        thread.start()
        thread.join(max(time_left_s, 0.1))
    if not outcome:
        what = " (the port is open but Ray's handshake did not finish)" if probed else ""
        raise ClusterUnreachable(
            f"no Ray cluster answered at {address} within {timeout_s:g}s{what}. "
            f"{_hint(address)} Check {setting}"
        )
    error = outcome[0]
    if error is None:
        return
    if isinstance(error, OSError | RuntimeError | ValueError):
        first = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")
        raise ClusterUnreachable(
            f"cannot connect to a Ray cluster at {address}: {first}. Check {setting}"
        ) from error  # the cause stays for `shoal --debug`; the message is the one line
    raise error


def _exit_on_sigterm() -> None:
    """What ray.init does when called in the main thread.

    SIGTERM then exits through ``sys.exit``, so atexit handlers (ray.shutdown)
    still run.
    """

    def handler(signum: int, frame: FrameType | None) -> None:
        sys.exit(signum)

    signal.signal(signal.SIGTERM, handler)


class _DropSigtermWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


@contextmanager
def _without_sigterm_warning() -> Iterator[None]:
    """Hide ray.init's warning that it runs outside the main thread (handled above)."""
    logger = logging.getLogger("ray._private.worker")
    drop = _DropSigtermWarning()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)
