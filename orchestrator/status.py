"""A job's state as plain data, and its ``status.json`` in the run folder.

``status.json`` is rewritten (atomically) on every state change and every
logged step, so ``shoal status`` can report on a run from another terminal,
and after the process that ran it has gone.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
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
    tokens_per_s: float | None = None
    elapsed_s: float = 0.0
    error: str | None = None
    last_checkpoint: str | None = None  # URI of the newest committed checkpoint
    resumed_from: str | None = None
    # Membership of the current epoch: worker_id, rank, pid, node_ip, node_id, shard,
    # shard_bytes (parameters + optimizer state owned), batch_share, compute_s.
    workers: list[dict[str, Any]] = field(default_factory=list)
    epoch: int = 0
    batch_shares: list[int] = field(default_factory=list)
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
        d = json.loads(text)
        d["state"] = JobState(d["state"])
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in known})


def write_status(run_dir: Path, status: JobStatus) -> None:
    status.updated_at = time.time()
    tmp = run_dir / ".status.json.tmp"
    tmp.write_text(status.to_json())
    os.replace(tmp, run_dir / "status.json")


def read_status(run_dir: Path) -> JobStatus | None:
    try:
        return JobStatus.from_json((run_dir / "status.json").read_text())
    except (FileNotFoundError, ValueError, KeyError):
        return None
