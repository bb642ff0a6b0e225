"""The driver of a shoal job submitted to Ray's job service: ``python -m orchestrator.job_driver``.

``shoal submit`` (and a KubeRay ``RayJob``) runs this as the job's
entrypoint on the cluster. It composes the job from the overrides, as
``shoal run`` does, but for the cluster it runs in: ``cluster.address=auto``
and, without ``run_dir=``, the run folder ``$SHOAL_RUNS_ROOT/<job id>``
(default ``~/shoal-runs``; a relative ``run_dir`` is taken under that root
too, never under the job's temporary working directory). It starts the job
through ``orchestrator.api.submit`` — the job's controller is the named
actor ``shoal-<job id>`` in namespace ``shoal`` — and writes to stdout, which
Ray keeps as the job's logs:

- a progress line every ``train.log_every`` steps and one per membership
  event, for people (``shoal jobs logs ID --follow``);
- ``SHOAL_STATUS {...}`` on every change of state and every progress line,
  ``SHOAL_RECORD {...}`` per step and ``SHOAL_EVENT {...}`` per event, for
  ``shoal jobs ls``, ``shoal status ID`` and ``RemoteJobHandle``
  (``orchestrator/remote_jobs.py``), which read nothing but the logs.

``shoal jobs stop`` makes Ray send SIGTERM: the job is cancelled at the next
step boundary if that comes within the few seconds Ray waits; either way the
driver exits, and Ray ends every actor of the job with it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from orchestrator.remote_jobs import (
    EVENT_MARK,
    RECORD_MARK,
    RUNS_ROOT_DEFAULT,
    RUNS_ROOT_ENV,
    STATUS_MARK,
)

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_CANCELLED = 0, 1, 2, 130
POLL_S = 0.5
# Ray waits RAY_JOB_STOP_WAIT_TIME_S (3 s by default) after SIGTERM before SIGKILL.
STOP_GRACE_S = 2.0


def _say(text: str) -> None:
    print(text, flush=True)


def _submission_id() -> str | None:
    """The Ray job's submission id, from the job config Ray hands its driver."""
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
        return config.get("metadata", {}).get("job_submission_id")
    except (ValueError, AttributeError):
        return None


def cluster_overrides(overrides: list[str], job_id: str) -> list[str]:
    """The overrides as this cluster runs them: its own address, a run folder that stays."""
    key = lambda o: o.lstrip("+~").split("=", 1)[0]  # noqa: E731
    out = [o for o in overrides if key(o) not in ("cluster.address", "run_dir")]
    out.append("cluster.address=auto")
    root = Path(os.environ.get(RUNS_ROOT_ENV) or RUNS_ROOT_DEFAULT).expanduser()
    given = [o.split("=", 1)[1] for o in overrides if key(o) == "run_dir" and "=" in o]
    run_dir = Path(given[-1]).expanduser() if given and given[-1] else Path(job_id)
    out.append(f"run_dir={run_dir if run_dir.is_absolute() else root / run_dir}")
    return out


class Stop:
    """SIGTERM/SIGINT (``shoal jobs stop``): noted, and acted on by the follow loop."""

    def __init__(self) -> None:
        self.asked = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.asked = True


def _progress(job_id: str, r: dict[str, Any], total: int, workers: int, epoch: int) -> str:
    parts = [f"shoal[{job_id}] step {r['step'] + 1}/{total}", f"loss {r['loss']:.4f}"]
    if "tokens_per_s" in r:
        parts.append(f"tok/s {r['tokens_per_s']:,.0f}")
    elif "samples_per_s" in r:
        parts.append(f"samples/s {r['samples_per_s']:,.0f}")
    parts.append(f"step {r['step_time_s']:.3f}s")
    for key, fmt in (("accuracy", ".1%"), ("eval_loss", ".4f")):
        if key in r:
            parts.append(f"{key} {r[key]:{fmt}}")
    parts += [f"workers {workers}", f"epoch {epoch}"]
    return "  ".join(parts)


def _event_text(job_id: str, e: dict[str, Any]) -> str:
    details = " ".join(f"{k}={v}" for k, v in e.items() if k not in ("time", "event", "held"))
    return f"shoal[{job_id}] event {e.get('event')} {details}".rstrip()


class Follower:
    """Prints a job's progress, status, records and events as they come."""

    def __init__(self, handle: Any):
        self.handle = handle
        self.job_id = handle.job_id
        self.total = handle.spec.train.steps
        self.every = handle.spec.train.log_every
        self.seen = 0
        self.seen_events: set[tuple[float, str]] = set()
        self.last_key: tuple | None = None
        self.status: Any = None

    def poll(self, final: Any = None) -> None:
        status = final if final is not None else self.handle.status()
        if final is None and status.state.finished and not self.handle.done():
            return  # the controller is being restarted: its answer is not the job's
        self.status = status
        self._events()
        progress = False
        for record in self.handle.metrics(since=self.seen):
            self.seen += 1
            _say(RECORD_MARK + json.dumps(record, separators=(",", ":")))
            step = record["step"] + 1
            if step % self.every == 0 or step == self.total:
                _say(_progress(self.job_id, record, self.total, len(status.workers), status.epoch))
                progress = True
        key = (status.state, status.epoch, status.failures_survived, len(status.workers))
        if progress or key != self.last_key or final is not None:
            self.last_key = key
            _say(STATUS_MARK + status.to_json().replace("\n", ""))

    def _events(self) -> None:
        try:
            events = self.handle.events()
        except Exception:  # noqa: BLE001 - the controller may be restarting; next poll
            return
        for e in events:
            key = (e.get("time", 0.0), str(e.get("event")))
            if key not in self.seen_events:
                self.seen_events.add(key)
                _say(EVENT_MARK + json.dumps(e, separators=(",", ":"), default=str))
                _say(_event_text(self.job_id, e))


def _failed_line(job_id: str, error: str) -> None:
    from orchestrator.status import JobState, JobStatus

    status = JobStatus(job_id, JobState.FAILED, run_dir="", error=error)
    _say(STATUS_MARK + status.to_json().replace("\n", ""))


def run(job_id: str, overrides: list[str]) -> int:
    from orchestrator.api import submit
    from orchestrator.report import summary
    from orchestrator.spec import ConfigError, JobSpec
    from orchestrator.status import JobState

    try:
        spec = JobSpec.from_overrides(cluster_overrides(overrides, job_id), job_id=job_id)
        _say(f"shoal[{job_id}]: run folder {spec.run_dir} (on the cluster), starting")
        handle = submit(spec)
    except ConfigError as e:
        _say(f"shoal[{job_id}]: bad configuration: {e}")
        _failed_line(job_id, f"bad configuration: {e}")
        return EXIT_CONFIG
    stop = Stop()  # after submit(): ray.init installs its own SIGTERM handler
    follower = Follower(handle)
    _say(f"shoal[{job_id}]: controller shoal-{job_id} (namespace shoal) started")
    while not handle.done():
        if stop.asked:
            _say(f"shoal[{job_id}]: stop requested: cancelling at the next step boundary")
            handle.cancel()
            deadline = time.monotonic() + STOP_GRACE_S
            while not handle.done() and time.monotonic() < deadline:
                time.sleep(0.1)
            if not handle.done():
                follower.poll()
                return EXIT_CANCELLED  # Ray ends the job's actors with this process
            break
        try:
            follower.poll()
        except Exception as e:  # noqa: BLE001 - a slow answer during a restart; try again
            _say(f"shoal[{job_id}]: waiting for the controller ({type(e).__name__})")
        time.sleep(POLL_S)
    final = handle.wait()
    follower.poll(final=final)
    print(summary(final, handle.metrics()), flush=True)
    if final.state == JobState.SUCCEEDED:
        return EXIT_OK
    return EXIT_CANCELLED if final.state == JobState.CANCELLED else EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m orchestrator.job_driver",
        description=(
            "Run a shoal job inside a Ray job (the entrypoint `shoal submit` and KubeRay "
            "RayJobs use). Overrides as for `shoal run`; cluster.address is always this cluster."
        ),
    )
    p.add_argument("--job-id", help="shoal's job id (default: the Ray submission id)")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides")
    args = p.parse_args(argv)
    from orchestrator.spec import new_job_id

    job_id = args.job_id or _submission_id() or new_job_id()
    # A user's own model or dataset is imported from the working directory (the job's).
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    return run(job_id, args.overrides)


if __name__ == "__main__":
    sys.exit(main())
