"""shoal jobs on a Ray cluster, through Ray's own job service (the dashboard's Jobs API).

``shoal submit`` and ``submit(spec, address="http://HEAD:8265")`` package a
job — its overrides (recomposed on the cluster from the same ``configs/``),
the user's working directory, and a ``runtime_env`` that ships shoal's own
packages — and hand it to ``ray.job_submission.JobSubmissionClient``. The
entrypoint is ``python -m orchestrator.job_driver`` (see there), which runs
the job on the cluster like ``shoal run`` and prints, besides its progress
lines, one machine-readable line per status change (``SHOAL_STATUS {...}``),
step record (``SHOAL_RECORD``) and membership event (``SHOAL_EVENT``).

Everything a remote client learns about a job comes from Ray's job service
over HTTP — its state and its logs — so ``shoal jobs ls``, ``shoal status ID``
and a :class:`RemoteJobHandle` work from any machine that reaches the
dashboard, with no Ray connection and after the job has ended.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import shlex
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from orchestrator.api import JobHandle
from orchestrator.capacity_book import BOOK_NAME
from orchestrator.spec import ConfigError, JobSpec
from orchestrator.status import JobState, JobStatus

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
DRIVER_MODULE = "orchestrator.job_driver"
# The packages shipped to the cluster with every job (py_modules): the cluster
# runs the submitter's shoal, whatever is installed there.
PACKAGES = ("orchestrator", "actors", "collectives", "storage", "configs")
# Never uploaded with the working directory (or shoal's packages).
EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "runs",
    "outputs",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
]
META_JOB_ID = "shoal_job_id"
# Where a submitted job's run folder goes on the cluster without run_dir=.
RUNS_ROOT_ENV = "SHOAL_RUNS_ROOT"
RUNS_ROOT_DEFAULT = "~/shoal-runs"
STATUS_MARK = "SHOAL_STATUS "
RECORD_MARK = "SHOAL_RECORD "
EVENT_MARK = "SHOAL_EVENT "
MARKS = (STATUS_MARK, RECORD_MARK, EVENT_MARK)
_ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


class DashboardUnreachable(ConnectionError):
    """No Ray job service answered at an address; the message says how to get one."""


class NotAShoalJob(LookupError):
    """The Ray job exists but is not a shoal job, or no job has that id."""


# --------------------------------------------------------------------------- connecting


def resolve_address(address: str | None) -> str:
    """``--address``, else ``RAY_API_SERVER_ADDRESS`` or ``RAY_ADDRESS``, else the local head.

    The same order as ``ray job``; a bare ``host:port`` is taken as the
    dashboard's (``http://`` is added).
    """
    for candidate in (address, *(os.environ.get(k) for k in _ADDRESS_ENV)):
        if candidate:
            if "://" not in candidate and candidate != "auto":
                return f"http://{candidate}"
            return candidate
    return DEFAULT_ADDRESS


def _start_hint(address: str) -> str:
    return (
        f"Start a head node with `ray start --head --dashboard-host 127.0.0.1` (its dashboard "
        f"listens on port 8265), or pass --address (or set RAY_ADDRESS) to your cluster's "
        f"dashboard, e.g. http://HEAD:8265. Tried: {address}"
    )


def _probe(address: str) -> None:
    """Fail in seconds, with what to do, if nothing listens at an http(s) address."""
    url = urlparse(address)
    if url.scheme not in ("http", "https"):
        return  # auto / ray:// / a GCS address: Ray resolves the dashboard itself
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "127.0.0.1", port), timeout=5):
            return
    except OSError as e:
        reason = e.strerror or type(e).__name__
    raise DashboardUnreachable(f"no Ray dashboard answers ({reason}). {_start_hint(address)}")


@contextmanager
def _explicit_address() -> Iterator[None]:
    """Ray's client lets RAY_ADDRESS override the address it is given; ours is already chosen."""
    saved = {k: os.environ.pop(k) for k in _ADDRESS_ENV if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str | None = None) -> tuple[Any, str]:
    """A ``JobSubmissionClient`` for ``address`` (see :func:`resolve_address`), and the address."""
    resolved = resolve_address(address)
    _probe(resolved)
    from ray.job_submission import JobSubmissionClient

    # Ray's client logs each package it uploads at INFO; shoal says what matters itself.
    logging.getLogger("ray.dashboard").setLevel(logging.WARNING)

    _use_auth_token()
    try:
        with _explicit_address():
            return JobSubmissionClient(resolved), resolved
    except Exception as e:  # noqa: BLE001 - requests/Ray raise many kinds; the message is one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if "Authentication" in first:
            raise DashboardUnreachable(
                f"the Ray cluster at {resolved} wants its auth token ({first}): put the head "
                "node's ~/.ray/auth_token here too, or set RAY_AUTH_TOKEN (`ray get-auth-token` "
                "on the head prints it)"
            ) from e
        raise DashboardUnreachable(
            f"the Ray job service did not answer: {first}. {_start_hint(resolved)}"
        ) from e


def _use_auth_token() -> None:
    """Send Ray's auth token if one is set up here, as ``ray.init`` and ``ray start`` do.

    Ray 2.60 clusters started where ``~/.ray/auth_token`` exists require it on
    every dashboard request; Ray's job client attaches it only once token mode
    is switched on in this process.
    """
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token authentication
        return
    quiet = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "token authentication is enabled": what the user set up
    try:
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        quiet.setLevel(level)


# --------------------------------------------------------------------------- packaging


@dataclass
class Package:
    """What is handed to ``JobSubmissionClient.submit_job``."""

    submission_id: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "submission_id": self.submission_id,
            "entrypoint": self.entrypoint,
            "runtime_env": self.runtime_env,
            "metadata": self.metadata,
        }


def _package_dirs() -> list[str]:
    return [str(Path(importlib.import_module(p).__file__).parent) for p in PACKAGES]


def _requirements() -> list[str]:
    """shoal's own dependencies, as installed here (for ``--pip``)."""
    from importlib.metadata import requires

    return [r for r in (requires("shoal") or []) if "extra ==" not in r]


def remote_overrides(overrides: list[str]) -> list[str]:
    """The overrides as the cluster runs them: ``cluster.address`` is the cluster's own."""
    given = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] == "cluster.address"]
    if given:
        raise ConfigError(
            f"cluster.address: a submitted job runs on the cluster it is submitted to "
            f"(got {given[0]!r}); choose the cluster with --address (its dashboard, "
            f"e.g. http://HEAD:8265)"
        )
    return list(overrides)


def package(
    spec: JobSpec,
    *,
    working_dir: str | None = ".",
    pip: bool = False,
    env: dict[str, str] | None = None,
) -> Package:
    """The job as Ray's job service takes it; ``spec`` must come from ``JobSpec.from_overrides``.

    The cluster recomposes the job from ``spec.overrides`` with the shipped
    ``configs/`` (the same resolution as here); a spec edited after
    composition would not survive that, so it is refused.
    """
    overrides = remote_overrides(spec.overrides)
    again = JobSpec.from_overrides(overrides, job_id=spec.job_id)
    if again.to_dict() != spec.to_dict():
        raise ConfigError(
            "this JobSpec was changed after JobSpec.from_overrides(...); a job for a cluster "
            "is sent as its overrides, so put every setting in the overrides list"
        )
    runtime_env: dict[str, Any] = {
        "py_modules": _package_dirs(),
        "excludes": list(EXCLUDES),
        "env_vars": {"PYTHONUNBUFFERED": "1", **(env or {})},
    }
    if working_dir is not None:
        folder = Path(working_dir).expanduser().resolve()
        if not folder.is_dir():
            raise ConfigError(f"--working-dir: {folder} is not a folder")
        runtime_env["working_dir"] = str(folder)
    if pip:
        runtime_env["pip"] = _requirements()
    entrypoint = shlex.join(["python", "-m", DRIVER_MODULE, "--job-id", spec.job_id, *overrides])
    metadata = {
        META_JOB_ID: spec.job_id,
        "shoal_overrides": json.dumps(overrides),
        "shoal_strategy": spec.strategy.name,
        "shoal_workers": str(spec.cluster.workers),
        "shoal_steps": str(spec.train.steps),
    }
    return Package(spec.job_id, entrypoint, runtime_env, metadata)


def submit_package(client: Any, pkg: Package) -> str:
    """Submit; returns the submission id (the shoal job id)."""
    return client.submit_job(
        entrypoint=pkg.entrypoint,
        submission_id=pkg.submission_id,
        runtime_env=pkg.runtime_env,
        metadata=pkg.metadata,
    )


# --------------------------------------------------------------------------- reading logs


@dataclass
class JobLog:
    """A shoal job's logs, split into what people read and what programs read."""

    lines: list[str] = field(default_factory=list)  # progress lines, worker output, ...
    status: JobStatus | None = None  # the newest SHOAL_STATUS
    records: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)


def is_machine_line(line: str) -> bool:
    return line.startswith(MARKS)


def parse_log(text: str) -> JobLog:
    out = JobLog()
    for line in text.splitlines():
        if line.startswith(STATUS_MARK):
            try:
                out.status = JobStatus.from_json(line[len(STATUS_MARK) :])
            except ValueError:
                continue  # a line cut short (the driver was killed mid-write)
        elif line.startswith(RECORD_MARK):
            record = _json_object(line[len(RECORD_MARK) :])
            if record is not None:
                # After a recovery steps are redone: a record replaces the later ones.
                step = record.get("step")
                if isinstance(step, int):
                    out.records = [r for r in out.records if r.get("step", -1) < step]
                out.records.append(record)
        elif line.startswith(EVENT_MARK):
            event = _json_object(line[len(EVENT_MARK) :])
            if event is not None:
                out.events.append(event)
        else:
            out.lines.append(line)
    return out


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


# --------------------------------------------------------------------------- one remote job


# Ray's job states, and what they mean for a shoal job whose last status says otherwise.
_RAY_ENDED = {"SUCCEEDED", "FAILED", "STOPPED"}


def _ray_state(info: Any) -> str:
    return str(getattr(info.status, "value", info.status))


def is_shoal_job(info: Any) -> bool:
    meta = info.metadata or {}
    return META_JOB_ID in meta or DRIVER_MODULE in (info.entrypoint or "")


def shoal_job_id(info: Any) -> str:
    return (info.metadata or {}).get(META_JOB_ID) or info.submission_id or info.job_id


class RemoteJob:
    """A shoal job known to a Ray job service: its Ray state, logs and shoal status."""

    def __init__(self, client: Any, job_id: str, address: str):
        self.client = client
        self.job_id = job_id
        self.address = address

    @classmethod
    def find(cls, job_id: str, address: str | None = None) -> RemoteJob:
        client, resolved = connect(address)
        job = cls(client, job_id, resolved)
        try:
            info = job.info()
        except RuntimeError as e:
            raise NotAShoalJob(
                f"no job {job_id!r} on the Ray cluster at {resolved} ({str(e).splitlines()[0]}); "
                "`shoal jobs ls` lists them"
            ) from None
        if not is_shoal_job(info):
            raise NotAShoalJob(f"Ray job {job_id!r} at {resolved} is not a shoal job")
        return job

    def info(self) -> Any:
        return self.client.get_job_info(self.job_id)

    def log(self) -> JobLog:
        return parse_log(self.client.get_job_logs(self.job_id))

    def status(self, info: Any | None = None, log: JobLog | None = None) -> JobStatus:
        """shoal's status of the job: its newest status line, squared with Ray's job state."""
        info = info if info is not None else self.info()
        log = log if log is not None else self.log()
        return merged_status(self.job_id, info, log)

    def done(self) -> bool:
        return _ray_state(self.info()) in _RAY_ENDED

    def stop(self) -> bool:
        """Ask Ray to stop the job: its driver gets SIGTERM (then SIGKILL), its actors go."""
        return bool(self.client.stop_job(self.job_id))

    def wait(self, timeout: float | None = None, poll_s: float = 1.0) -> JobStatus:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done():
            if deadline is not None and time.monotonic() >= deadline:
                break
            time.sleep(poll_s)
        return self.status()

    def follow(self, write: Callable[[str], None], raw: bool = False) -> None:
        """Stream the job's log lines to ``write`` until the job ends (Ray's log tail)."""

        async def tail() -> None:
            pending = ""
            async for chunk in self.client.tail_job_logs(self.job_id):
                pending += chunk
                *whole, pending = pending.split("\n")
                for line in whole:
                    if raw or not is_machine_line(line):
                        write(line)
            if pending and (raw or not is_machine_line(pending)):
                write(pending)

        asyncio.run(tail())

    def actors_alive(self) -> list[Any]:
        """The job's actors Ray still counts as alive (from the dashboard's state API)."""
        from ray.util.state import list_actors

        ray_job = self.info().job_id
        if not ray_job:
            return []  # the driver never started: no actor was ever made
        alive = list_actors(
            address=self.address,
            filters=[("job_id", "=", ray_job), ("state", "!=", "DEAD")],
            raise_on_missing_output=False,
        )
        # The cluster's capacity book outlives the job that happened to create it.
        return [a for a in alive if getattr(a, "name", None) != BOOK_NAME]


def merged_status(job_id: str, info: Any, log: JobLog) -> JobStatus:
    """The job's newest status line, corrected by what Ray knows once the driver has ended."""
    ray_state = _ray_state(info)
    status = log.status or JobStatus(job_id, JobState.PENDING, run_dir="")
    if ray_state in _RAY_ENDED and not status.state.finished:
        # The driver ended without its final line: stopped, killed, or it crashed.
        if ray_state == "STOPPED":
            status.state = JobState.CANCELLED
            status.error = status.error or "stopped through Ray's job service (`shoal jobs stop`)"
        elif ray_state == "FAILED":
            status.state = JobState.FAILED
            status.error = status.error or f"the Ray job failed: {info.message}"
        else:
            status.state = JobState.SUCCEEDED
    elif ray_state == "RUNNING" and status.state == JobState.PENDING:
        status.state = JobState.STARTING
    return status


class RemoteJobHandle(JobHandle):
    """``submit(spec, address=...)``'s handle: the same methods, answered by Ray's job service.

    ``run_dir`` is the run folder on the cluster. ``scale`` needs a Ray
    connection to the controller, which the job service does not offer: it
    raises, saying what to run instead.
    """

    def __init__(self, spec: JobSpec, job: RemoteJob):
        self.spec = spec
        self.job_id = spec.job_id
        self.remote = job
        self._final: JobStatus | None = None
        self._lock = None
        self._controller = None
        self._run_ref = None
        # On the cluster; its exact path is known once the job's first status line is out.
        given = any(o.split("=", 1)[0] == "run_dir" for o in spec.overrides)
        self.run_dir = Path(spec.run_dir) if given else Path(RUNS_ROOT_DEFAULT) / spec.job_id

    def status(self) -> JobStatus:
        if self._final is not None:
            return self._final
        status = self.remote.status()
        if status.run_dir:
            self.run_dir = Path(status.run_dir)
        if status.state.finished and self.remote.done():
            self._final = status
        return status

    def wait(self, timeout: float | None = None) -> JobStatus:
        if self._final is None:
            status = self.remote.wait(timeout)
            if status.state.finished and self.remote.done():
                self._final = status
            return status
        return self._final

    def done(self) -> bool:
        return self.remote.done()

    def metrics(self, since: int = 0) -> list[dict[str, Any]]:
        return self.remote.log().records[since:]

    def events(self) -> list[dict[str, Any]]:
        return self.remote.log().events

    def cancel(self) -> None:
        """Stop the job through Ray's job service (the driver cancels at a step boundary)."""
        self.remote.stop()

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.status().workers if isinstance(w.get("pid"), int)]

    def scale(self, workers: int) -> int:
        raise RuntimeError(
            f"scaling job {self.job_id} needs a Ray connection to its controller; on a machine "
            f"of the cluster run `shoal scale {self.job_id} {workers}` (or pass "
            "--address ray://HEAD:10001)"
        )

    def close(self) -> None:
        """Nothing to release here: Ray's job service frees the job's actors when it ends."""


def submit_remote(
    spec: JobSpec,
    address: str | None,
    *,
    working_dir: str | None = ".",
    pip: bool = False,
) -> RemoteJobHandle:
    """Package ``spec`` and submit it to the Ray job service at ``address``."""
    pkg = package(spec, working_dir=working_dir, pip=pip)
    client, resolved = connect(address)
    submit_package(client, pkg)
    return RemoteJobHandle(spec, RemoteJob(client, pkg.submission_id, resolved))
