"""A job controller that Ray restarted continues the job from its last committed step.

Why Ray restarts the controller (``max_restarts`` on the actor class) rather
than the job driver re-submitting the job: the controller *owns* its member
actors, so when its process or node is lost Ray kills every member with it —
no orphaned worker or process group is left holding CPUs or a rendezvous
port — and Ray starts a new controller from the same creation arguments (the
spec, the data's object reference). With ``max_task_retries`` Ray also
re-sends the pending ``run()`` call to the new incarnation, so whoever waits
on it (``JobHandle.wait``, the Ray job's driver) gets the job's final status
as if nothing had happened. A driver that re-submitted would need a second
supervisor for itself, and two controllers of one job could briefly coexist.

What the new incarnation must do differently is small, and it is here: it
continues from the newest committed checkpoint of the job's own checkpoint
root (``resume=latest``) instead of starting afresh (which would also refuse
a root that holds checkpoints), keeps the metrics of the steps before it, and
carries the failure counters of ``status.json`` over. State in memory
(buddy replicas) died with the members, so the checkpoint is the only copy:
steps after it are computed again (``steps_redone``).
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass

from orchestrator.events import EventLog
from orchestrator.spec import JobSpec
from orchestrator.status import JobStatus, read_status

log = logging.getLogger("shoal.controller")


def was_restarted() -> bool:
    """Whether this process is a Ray actor that Ray has restarted after a failure."""
    try:
        import ray

        if not ray.is_initialized():
            return False
        with warnings.catch_warnings():  # Ray's property reads its own deprecated actor_id
            warnings.simplefilter("ignore")
            return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # noqa: BLE001 - not an actor (the unit tests' in-process controller)
        return False


@dataclass
class Restart:
    """How a restarted controller continues: ``spec`` to run, and what it had reached."""

    spec: JobSpec
    previous: JobStatus | None
    checkpoints: list[int]

    def carry_over(self, status: JobStatus, events: EventLog) -> None:
        """Put the counters of the lost incarnation into the new status, and log the restart."""
        prev = self.previous
        resumed_at = self.checkpoints[-1] if self.checkpoints else 0
        if prev is not None:
            status.failures_survived = prev.failures_survived + 1  # the controller itself
            status.steps_redone = prev.steps_redone + max(0, prev.step - resumed_at)
            status.recovery_s = prev.recovery_s
            status.startup_s = dict(prev.startup_s)
        else:
            status.failures_survived = 1
        reached = prev.step if prev is not None else None
        events.emit("controller-restarted", reached_step=reached, resume_step=resumed_at)
        log.warning(
            "job %s: the controller was restarted by Ray; continuing from step %d (%s)",
            self.spec.job_id,
            resumed_at,
            "its newest committed checkpoint" if self.checkpoints else "no checkpoint yet",
        )


def after_restart(spec: JobSpec) -> Restart | None:
    """None for a first start; for a restarted controller, the spec that continues the job."""
    if not was_restarted():
        return None
    from storage.checkpoint import committed_steps
    from storage.object_store import open_store

    s = spec.storage
    try:
        store = open_store(
            spec.checkpoint.uri,
            endpoint_url=s.endpoint_url,
            region=s.region,
            path_style=s.path_style,
        )
        steps = committed_steps(store)
    except Exception as e:  # noqa: BLE001 - the run will report the store's error itself
        log.warning("restarted controller cannot list checkpoints: %s", e)
        steps = []
    previous = read_status(spec.run_dir)
    resumed = copy.deepcopy(spec)
    # Only once the lost incarnation committed a checkpoint: until then the root may
    # still hold an earlier run's (checkpoint.overwrite=true deletes them only as the
    # job starts), and the job starts again exactly as it was submitted.
    if steps and previous is not None and previous.last_checkpoint:
        resumed.config.resume = "latest"
    else:
        steps = []
    return Restart(resumed, previous, steps)
