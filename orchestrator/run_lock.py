"""One owner per run folder: an exclusive lock held while a job runs in it.

The lock is ``flock`` on ``<run_dir>/.shoal.lock``, taken without waiting.
The kernel releases it when the owning process exits or is killed, so a
stale lock from a killed run is never obeyed: the file stays, the lock does
not. The file's text (job id, pid, host) is only there to name the owner in
the refusal.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path

from orchestrator.spec import ConfigError

LOCK_FILE = ".shoal.lock"


class RunFolderBusy(ConfigError):
    """Another live process owns the run folder."""


class RunFolderLock:
    """Hold ``run_dir``'s lock from ``acquire()`` until ``release()`` (or process exit)."""

    def __init__(self, run_dir: Path, job_id: str):
        self.path = Path(run_dir) / LOCK_FILE
        self.job_id = job_id
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock now, or raise ``RunFolderBusy`` naming the owner."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _describe_owner(fd)
            os.close(fd)
            raise RunFolderBusy(
                f"run_dir: {self.path.parent} is in use by {owner}. Wait for it to end (or "
                "cancel it), or pick another run_dir"
            ) from None
        # Only the owner writes: the previous text may be a dead run's.
        os.ftruncate(fd, 0)
        owner = {"job_id": self.job_id, "pid": os.getpid(), "host": socket.gethostname()}
        os.write(fd, json.dumps(owner).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def _describe_owner(fd: int) -> str:
    try:
        owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"job {owner['job_id']} (pid {owner['pid']} on {owner['host']})"
    except (ValueError, KeyError, TypeError, OSError):
        return "another shoal run"
