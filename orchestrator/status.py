"""A job's state as plain data, and its ``status.json`` in the run folder.

``status.json`` is rewritten (atomically) on every state change and every
logged step, so ``shoal status`` can report on a run from another terminal,
and after the process that ran it has gone.
"""

from __future__ import annotations

import json
import os
import time
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any


class JobState(str, Enum):
    PENDING = "pending"  # submitted; the controller has not started
    STARTING = "starting"  # placing workers, forming the process group, restoring
    WAITING_FOR_WORKERS = "waiting_for_workers"  # fewer than cluster.min_workers placed
    RUNNING = "running"
    RECOVERING = "recovering"  # a worker was lost; rebuilding the state in a new epoch
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass
class JobStatus:
    job_id: str
    state: JobState
    run_dir: str
    step: int = 0  # steps completed (the next step to run)
    total_steps: int = 0
    loss: float | None = None
    tokens_per_s: float | None = None  # language models
    samples_per_s: float | None = None
    # The newest evaluation on the held-out split (train.eval_every).
    eval_loss: float | None = None
    accuracy: float | None = None  # classification
    perplexity: float | None = None  # language models
    elapsed_s: float = 0.0
    error: str | None = None
    last_checkpoint: str | None = None  # URI of the newest committed checkpoint
    resumed_from: str | None = None
    # Membership of the current epoch: worker_id, rank, pid, node_ip, node_id, shard,
    # shard_bytes (parameters + optimizer state owned), batch_share, compute_s.
    workers: list[dict[str, Any]] = field(default_factory=list)
    epoch: int = 0
    # Placed workers standing by outside the epoch (elastic.spares): worker_id, pid, node_id.
    spares: list[dict[str, Any]] = field(default_factory=list)
    batch_shares: list[int] = field(default_factory=list)
    # The training program's own fields (e.g. a pipeline's stages, partition and
    # bubble); "summary" holds the lines `shoal status` shows for them.
    program: dict[str, Any] = field(default_factory=dict)
    failures_survived: int = 0
    steps_redone: int = 0  # committed steps computed again after a failure
    recovery_s: float = 0.0  # time spent recovering, all failures together
    checkpoints_committed: int = 0
    checkpoints_failed: int = 0
    checkpoint_warning: str | None = None
    resume_note: str | None = None  # e.g. which damaged checkpoints resume=latest skipped
    resume_bytes_read: list[int] = field(default_factory=list)
    resume_s: float | None = None
    memory: list[dict[str, int]] = field(default_factory=list)  # per rank, bytes
    # Seconds from submit() to the end of each start-up phase: ray (connected or
    # started), controller, workers_placed, group_formed, state_ready, first_step.
    startup_s: dict[str, float] = field(default_factory=dict)
    sample: str | None = None
    driver_pid: int | None = None
    updated_at: float = 0.0

    def to_json(self) -> str:
        d = asdict(self)
        d["state"] = self.state.value
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str) -> JobStatus:
        """Parse ``status.json``; a ``StatusError`` (a ``ValueError``) says what is wrong.

        Every field's type is checked here, so that code formatting a status
        (``shoal status``, the summary) never meets a string where a number goes.
        """
        try:
            d = json.loads(text)
        except ValueError as e:
            raise StatusError(f"not JSON ({e})") from None
        if not isinstance(d, dict):
            raise StatusError(f"expected a JSON object, found {_json_kind(d)}")
        missing = [f.name for f in fields(cls) if f.name in _REQUIRED and f.name not in d]
        if missing:
            raise StatusError(f"missing field(s): {', '.join(missing)}")
        try:
            d["state"] = JobState(d["state"])
        except (ValueError, TypeError):
            expected = ", ".join(s.value for s in JobState)
            raise StatusError(f"unknown state {d['state']!r} (one of {expected})") from None
        hints = _field_types()
        known = {k: v for k, v in d.items() if k in hints}
        bad = [k for k, v in known.items() if k != "state" and not _has_type(v, hints[k])]
        if bad:
            raise StatusError(
                "wrong type for " + ", ".join(f"{k} ({_json_kind(known[k])})" for k in bad)
            )
        return cls(**known)


class StatusError(ValueError):
    """A run folder's ``status.json`` cannot be used: ``problem`` says why, ``path`` where."""

    def __init__(self, problem: str, path: Path | None = None):
        super().__init__(f"{path}: {problem}" if path is not None else problem)
        self.problem = problem
        self.path = path


class StatusMissing(StatusError):
    """There is no ``status.json`` (not a run folder, or its run never started)."""


# Fields without a default: a status.json without them describes no run.
_REQUIRED = ("job_id", "state", "run_dir")


def _field_types() -> dict[str, Any]:
    # Resolved on use: the annotations are strings (``from __future__ import annotations``).
    return typing.get_type_hints(JobStatus)


def _has_type(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a field's annotation (one level into lists and dicts)."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_has_type(v, item) for v in value)
    if origin is dict:
        _, item = typing.get_args(hint)
        return isinstance(value, dict) and all(_has_type(v, item) for v in value.values())
    if hint is float:  # JSON writes 2.0 as 2
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _json_kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if type(value) in names:
        return names[type(value)]
    return f"the number {value}"


def write_status(run_dir: Path, status: JobStatus) -> None:
    status.updated_at = time.time()
    tmp = run_dir / ".status.json.tmp"
    tmp.write_text(status.to_json())
    os.replace(tmp, run_dir / "status.json")


def load_status(run_dir: Path) -> JobStatus:
    """The status in ``run_dir``; a ``StatusError`` naming the path and the problem if none.

    ``StatusMissing`` (a ``StatusError``) when there is no ``status.json`` at all.
    """
    path = run_dir / "status.json"
    if not run_dir.exists():
        raise StatusMissing("no such folder", run_dir)
    if not run_dir.is_dir():
        raise StatusMissing("a file, not a run folder", run_dir)
    try:
        text = path.read_text()
    except FileNotFoundError:
        problem = "no status.json (not a run folder, or its run never started)"
        raise StatusMissing(problem, run_dir) from None
    except (OSError, UnicodeDecodeError) as e:
        raise StatusError(f"unreadable ({_reason(e)})", path) from None
    try:
        return JobStatus.from_json(text)
    except StatusError as e:
        raise StatusError(e.problem, path) from None


def read_status(run_dir: Path) -> JobStatus | None:
    """The status in ``run_dir``, or None if there is none that can be used."""
    try:
        return load_status(run_dir)
    except StatusError:
        return None


def _reason(e: Exception) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return f"{type(e).__name__}: {e}"
