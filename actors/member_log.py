"""Structured logs per member: JSON lines in ``<run_dir>/logs/<role><worker_id>.jsonl``.

Every line is one JSON object with ``time``, ``level``, ``logger``,
``message`` and where it came from: ``job_id``, ``role``, ``worker``,
``epoch`` and ``rank`` (the rank, or a standing member's slot, of the
member's current epoch; null before its first set-up), plus ``traceback``
for an error. What is logged:

- the member's runtime calls: each method's first call, then per method at
  most one summary line every ``SUMMARY_EVERY_S`` seconds (``train_step:
  48 calls since the last line, 0.212 s each``), and every call that raised,
  with its traceback;
- whatever shoal's own modules log at INFO or above, and other libraries'
  warnings and errors.

The file is on the member's node (the run folder's path there), so
``jq 'select(.rank == 0)' runs/JOB/logs/*.jsonl`` follows one rank of a
local run across replacements.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOGS_DIR = "logs"
SUMMARY_EVERY_S = 10.0
OWN_PACKAGES = ("actors", "collectives", "storage", "orchestrator", "shoal")


@dataclass
class MemberContext:
    """Who is logging: fixed at start except ``epoch`` and ``rank``."""

    job_id: str
    role: str
    worker: int
    epoch: int | None = None
    rank: int | None = None


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per record, with the member's context."""

    def __init__(self, context: MemberContext):
        super().__init__()
        self.context = context

    def format(self, record: logging.LogRecord) -> str:
        c = self.context
        line: dict[str, Any] = {
            "time": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "job_id": c.job_id,
            "role": c.role,
            "worker": c.worker,
            "epoch": c.epoch,
            "rank": c.rank,
            "pid": os.getpid(),
        }
        if record.exc_info:
            line["traceback"] = "".join(traceback.format_exception(*record.exc_info))
        return json.dumps(line, default=str)


class _OwnInfoOthersWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name.split(".", 1)[0] in OWN_PACKAGES
        return record.levelno >= (logging.INFO if own else logging.WARNING)


@dataclass
class _Calls:
    count: int = 0
    seconds: float = 0.0
    since: float = field(default_factory=time.monotonic)


class MemberLog:
    """The member's structured log (see the module docstring)."""

    def __init__(self, run_dir: str | Path, context: MemberContext):
        self.context = context
        self.path = Path(run_dir) / LOGS_DIR / f"{context.role}{context.worker}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handler = logging.FileHandler(self.path)
        self._handler.setFormatter(JsonLinesFormatter(context))
        self._handler.addFilter(_OwnInfoOthersWarning())
        root = logging.getLogger()
        root.addHandler(self._handler)
        for package in OWN_PACKAGES:  # let shoal's INFO through to the handler
            logger = logging.getLogger(package)
            if logger.level == logging.NOTSET or logger.level > logging.INFO:
                logger.setLevel(logging.INFO)
        self.log = logging.getLogger("actors.member")
        self._calls: dict[str, _Calls] = {}
        self._lock = threading.Lock()  # serve and control threads call too

    def called(self, method: str, seconds: float) -> None:
        """A runtime call finished: logged the first time, then summarised."""
        now = time.monotonic()
        with self._lock:
            calls = self._calls.get(method)
            if calls is None:
                self._calls[method] = _Calls(since=now)
                first, summary = True, None
            else:
                first = False
                calls.count += 1
                calls.seconds += seconds
                summary = None
                if now - calls.since >= SUMMARY_EVERY_S:
                    summary = (calls.count, calls.seconds / calls.count)
                    self._calls[method] = _Calls(since=now)
        if first:
            self.log.info("%s: first call, %.3f s", method, seconds)
        elif summary is not None:
            self.log.info("%s: %d calls since the last line, %.3f s each", method, *summary)

    def failed(self, method: str) -> None:
        """A runtime call raised (call from the ``except`` block: the traceback is logged)."""
        self.log.exception("%s raised", method)

    def set_position(self, epoch: int | None, rank: int | None) -> None:
        self.context.epoch, self.context.rank = epoch, rank


def member_log(args: tuple[Any, ...], role: str) -> MemberLog | None:
    """The log of a member whose runtime takes ``(spec, worker_id, ...)``; None when the run
    folder cannot be written on this node (the member runs on without a log file)."""
    spec = args[0] if args else None
    run_dir, job_id = getattr(spec, "run_dir", None), getattr(spec, "job_id", None)
    if run_dir is None or job_id is None or len(args) < 2:
        return None
    try:
        return MemberLog(run_dir, MemberContext(str(job_id), role, int(args[1])))
    except OSError as e:
        logging.getLogger(__name__).warning("no member log in %s: %s", run_dir, e)
        return None


def position_of(runtime: Any, rdzv: Any) -> tuple[int | None, int | None]:
    """``(epoch, rank)`` after a runtime's set-up: the rendezvous' epoch (a standing member
    has none), its rank or slot."""
    rank = getattr(runtime, "rank", None)
    if rank is None or rank < 0:
        rank = getattr(runtime, "slot", None)
    return getattr(rdzv, "epoch", None), rank
