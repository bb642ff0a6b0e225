"""The programmatic job API: ``submit(spec) -> JobHandle``.

    from orchestrator import JobSpec, submit
    handle = submit(JobSpec.from_overrides(["cluster.workers=2", "train.steps=100"]))
    final = handle.wait()
    print(final.state, final.loss, handle.run_dir)

``submit`` connects to Ray (or starts an embedded local instance when
``cluster.address`` is null), loads the dataset once and puts it in Ray's
object store, writes the resolved ``config.yaml`` to the run folder, and
starts the job's controller actor. It returns at once; the job runs in the
background.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray

from actors.datasets import fingerprint_of
from orchestrator.controller import controller_actor_class
from orchestrator.preflight import run_preflight
from orchestrator.run_lock import RunFolderLock
from orchestrator.spec import ConfigError, JobSpec
from orchestrator.status import JobState, JobStatus, read_status

NAMESPACE = "shoal"


def ensure_ray(spec: JobSpec) -> None:
    """Connect to ``cluster.address``, or start a local Ray sized for the job's workers."""
    if ray.is_initialized():
        return
    cl = spec.cluster
    kwargs: dict[str, Any] = {
        "namespace": NAMESPACE,
        "logging_level": logging.WARNING,
        "log_to_driver": True,
    }
    if cl.address is None:
        # Enough logical CPUs for cluster.max_workers, even on a small machine:
        # workers then share cores (slower) rather than wait forever, and
        # `shoal scale` can grow the job up to its maximum.
        # The program's standing roles (expert hosts, ...) count too.
        from orchestrator.program import job_roles, program_for

        training, *standing = job_roles(program_for(spec))
        needed = int(
            np.ceil(
                (training.maximum + training.spares) * training.cpus
                + sum(r.count * r.cpus for r in standing)
            )
        )
        # address="local": always a new instance of our own, never a cluster
        # that happens to run on this machine.
        kwargs.update(
            address="local", num_cpus=max(os.cpu_count() or 1, needed), include_dashboard=False
        )
        # A user's own model, dataset or loss (`model._target_=mypkg.nets.Net`)
        # is imported from the working directory, by the workers too.
        path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)
        kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": path}}
        if cl.gpus_per_worker > 0:
            import torch

            kwargs["num_gpus"] = torch.cuda.device_count()
    else:
        from orchestrator.ray_connect import connect_ray

        # Bounded: ray.init alone retries a dead address for many minutes. A
        # refused port fails within seconds; start_timeout_s bounds the rest.
        connect_ray(
            cl.address,
            timeout_s=cl.start_timeout_s,
            setting="cluster.address (null: a local Ray)",
            **kwargs,
        )
        return
    ray.init(**kwargs)


class JobHandle:
    """A submitted job. Methods are cheap calls to the job's controller actor."""

    offload_plan: Any = None  # orchestrator.offload_plan.OffloadPlan when offload is configured

    def __init__(
        self,
        spec: JobSpec,
        controller: Any,
        run_ref: ray.ObjectRef,
        lock: RunFolderLock | None = None,
    ):
        self.spec = spec
        self.job_id = spec.job_id
        self.run_dir: Path = spec.run_dir
        self._controller = controller
        self._run_ref = run_ref
        self._final: JobStatus | None = None
        # The run folder's lock, held until the job has ended (released by
        # wait() or close(), or by the kernel when this process exits).
        self._lock = lock

    def status(self) -> JobStatus:
        """The job's current state, step, loss, workers and error (if any)."""
        if self._final is not None:
            return self._final
        try:
            return ray.get(self._controller.status.remote(), timeout=30)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
            return self._lost(e)

    def wait(self, timeout: float | None = None) -> JobStatus:
        """Block until the job ends (or ``timeout`` seconds pass); returns its status.

        A failed job does not raise here: check ``status.state`` and ``status.error``.
        """
        ready, _ = ray.wait([self._run_ref], timeout=timeout)
        if not ready:
            return self.status()
        try:
            self._final = ray.get(self._run_ref)
        except ray.exceptions.RayError as e:
            self._final = self._lost(e)
        self._release_run_dir()
        return self._final

    def done(self) -> bool:
        ready, _ = ray.wait([self._run_ref], timeout=0)
        return bool(ready)

    def metrics(self, since: int = 0) -> list[dict[str, Any]]:
        """Per-step records (step, loss, lr, grad_norm, step_time_s, tokens_per_s, ...)."""
        try:
            return ray.get(self._controller.metrics.remote(since), timeout=30)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return _read_metrics(self.run_dir)[since:]

    def cancel(self) -> None:
        """Ask the job to stop at the next step boundary; ``wait()`` then returns CANCELLED."""
        self._controller.cancel.remote()

    def worker_pids(self) -> list[int]:
        """Process ids of the workers (for operators and fault-injection tests)."""
        return ray.get(self._controller.worker_pids.remote(), timeout=30)

    def scale(self, workers: int) -> int:
        """Ask for ``workers`` workers (clamped to [cluster.min_workers, cluster.max_workers]).

        New workers join, or surplus ones are drained, at the next step
        boundary. Returns the target actually set.
        """
        return ray.get(self._controller.scale.remote(workers), timeout=30)

    def events(self) -> list[dict[str, Any]]:
        """Membership events so far (also in the run folder's ``events.jsonl``)."""
        return ray.get(self._controller.events.remote(), timeout=30)

    def close(self) -> None:
        """Release the controller actor (after the job has ended) and the run folder."""
        ray.kill(self._controller, no_restart=True)
        self._release_run_dir()

    def _release_run_dir(self) -> None:
        if self._lock is not None:
            self._lock.release()

    def _lost(self, e: Exception) -> JobStatus:
        last = read_status(self.run_dir)
        status = last or JobStatus(self.job_id, JobState.FAILED, str(self.run_dir))
        status.state = JobState.FAILED
        status.error = f"the job's controller is gone: {type(e).__name__}: {str(e).splitlines()[0]}"
        return status


def _read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    import json

    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def controller_name(job_id: str) -> str:
    """The Ray actor name of a job's controller (in the driver's namespace)."""
    return f"shoal-{job_id}"


def scale_job(job_id: str, workers: int, address: str = "auto") -> int:
    """``shoal scale``: reach a running job's controller through Ray and set its target size."""
    if not ray.is_initialized():
        from orchestrator.ray_connect import connect_ray

        # A live cluster answers in seconds (a ray:// client server may first
        # start a process for us); past 30 s nobody is there.
        connect_ray(
            address,
            timeout_s=30.0,
            namespace=NAMESPACE,
            setting="shoal scale --address",
            logging_level=logging.WARNING,
        )
    controller = ray.get_actor(controller_name(job_id), namespace=NAMESPACE)
    return ray.get(controller.scale.remote(workers), timeout=30)


def load_data(spec: JobSpec):
    """The job's dataset, checked against the job; a ``ConfigError`` naming ``data`` if unusable."""
    from actors.datasets import DataError
    from actors.task import TaskError, build_dataset, make_task

    try:
        data = build_dataset(spec.data, run_dir=str(spec.run_dir))
    except Exception as e:  # noqa: BLE001 - a user's dataset may raise anything
        cause = e.__cause__ or e
        raise ConfigError(f"data: cannot load {spec.data._target_}: {cause}") from None
    try:
        task = make_task(spec.task, data, spec.seq_len)
        data.check(spec.train.global_batch, task.seq_len)
    except (DataError, TaskError) as e:
        raise ConfigError(f"data: {e}" if isinstance(e, DataError) else str(e)) from None
    t = spec.train
    first_eval = next(iter(data.eval_batches(t.global_batch, task.seq_len, 1)), None)
    if t.eval_every and first_eval is None:
        raise ConfigError(
            f"train.eval_every: the dataset ({spec.data._target_}) has no held-out samples to "
            "evaluate on; set train.eval_every=0, or use a dataset with a held-out split "
            "(data=ray_dataset: held-out files in data.eval_uri)"
        )
    return data


def submit(spec: JobSpec, address: str | None = None) -> JobHandle:
    """Start ``spec`` in the background and return its handle.

    With ``address`` (a Ray cluster's dashboard, ``http://HEAD:8265``) the job
    is submitted to that cluster's job service instead, as ``shoal submit``
    does, and the handle answers through it (``orchestrator/remote_jobs.py``);
    ``spec`` must then come from ``JobSpec.from_overrides``, whose overrides
    are what is sent.

    Raises ``ConfigError`` (before Ray starts, where the information
    allows) if the run folder is owned by another live run, the checkpoint
    root holds another run's checkpoints, ``resume`` names nothing usable,
    the model cannot fit, or the dataset cannot be loaded; a rejected job
    changes nothing in the run folder. Everything that goes wrong after the
    job has started is reported by ``JobHandle.status()``.
    """
    if address is not None:
        from orchestrator.remote_jobs import submit_remote

        return submit_remote(spec, address)
    submitted_at = time.time()
    lock = RunFolderLock(spec.run_dir, spec.job_id)
    lock.acquire()
    try:
        # The model is sized from the data's facts (vocabulary, classes, input
        # shape), so the data is read first; both before Ray starts.
        data = load_data(spec)
        fingerprint = fingerprint_of(data)
        shape = run_preflight(
            spec, local=spec.cluster.address is None, facts=data.facts, fingerprint=fingerprint
        )
        ensure_ray(spec)
        ray_ready_s = time.time() - submitted_at
        # Written only once every check passed: a refused run leaves the folder as it was.
        (spec.run_dir / "config.yaml").write_text(spec.to_yaml())
        if shape.offload is not None:
            (spec.run_dir / "offload_plan.txt").write_text("\n".join(shape.offload.lines()) + "\n")
        data_ref = ray.put(data)  # every worker maps it from Ray's object store
        controller = (
            controller_actor_class()
            .options(name=controller_name(spec.job_id))
            .remote(
                spec,
                [data_ref],
                data.facts,
                os.getpid(),
                submitted_at,
                ray_ready_s,
                data_fingerprint=fingerprint,
            )
        )
        run_ref = controller.run.remote()
    except BaseException:
        lock.release()
        raise
    handle = JobHandle(spec, controller, run_ref, lock)
    handle.offload_plan = (
        shape.offload
    )  # where the state lives (None: no offload); printed by the CLI
    # Owned here for as long as the handle lives: a controller that Ray restarts
    # (orchestrator/restart.py) gets the same reference again, and only the owner keeps it.
    handle.data_ref = data_ref
    return handle


def run(spec: JobSpec, poll_s: float = 1.0) -> JobStatus:
    """Submit and wait: the simplest way to train from Python."""
    handle = submit(spec)
    while not handle.done():
        time.sleep(poll_s)
    return handle.wait()
