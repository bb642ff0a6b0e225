"""The per-job controller: a Ray actor that drives the workers through the steps.

It owns the job's state machine (``JobState``, moved only through
``policies.transition``), carries out the decisions of the pure policies in
``orchestrator/policies.py`` (failures, scaling, drains, checkpoints), and
asks the job's training program (``orchestrator/program.py``) for everything
strategy-specific: what each member runs each step and how results reduce.
It holds no tensors: members compute; the controller writes ``status.json``
and hands step records to the reporter (``metrics.jsonl``, ``loss.png``,
``sample.txt``).

Steps are pipelined two deep: step ``s+1`` is queued on every worker before
the results of step ``s`` are collected, so Ray's per-call latency hides
behind computation. Actor calls from one caller run in order, and steps are
never queued past a checkpoint boundary, so a checkpoint always sees a
quiescent, fully committed step.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import ray
import torch

from actors.datasets import DataFacts
from actors.task import build_model
from collectives.flat import tied_aliases
from orchestrator.checkpoint_committer import CheckpointCommitter
from orchestrator.constants import CHECKPOINT_CALL_S, PIPELINE_DEPTH, START_GRACE_S
from orchestrator.events import EventLog
from orchestrator.metrics_export import MetricsExporter
from orchestrator.node_drain import DrainDecision, DrainingNodes, on_draining_nodes, plan_drain
from orchestrator.policies import (
    RecoverySource,
    checkpoint_due,
    decide_membership,
    decide_target,
    eval_due,
    give_up_reason,
    membership_change_wanted,
    queue_limit,
    recovery_source,
    transition,
)
from orchestrator.preflight import fresh_root_problem, nothing_left, resume_mismatch
from orchestrator.program import TrainingProgram, job_roles, program_for
from orchestrator.reporter import RunReporter
from orchestrator.restart import after_restart
from orchestrator.schedule import lr_at
from orchestrator.spec import ConfigError, JobSpec
from orchestrator.standing_roles import StandingRoles
from orchestrator.status import JobState, JobStatus, write_status
from orchestrator.worker_group import (
    Member,
    MembershipLost,
    WorkerError,
    WorkerGroup,
    withdraw_capacity,
)
from storage.checkpoint import (
    DEFAULT_SPACE,
    MANIFEST,
    CorruptCheckpointError,
    Manifest,
    ShardRecord,
    all_step_dirs,
    check_objects,
    committed_steps,
    read_manifest,
    resolve,
    step_dir,
)
from storage.object_store import ObjectStore, StoreError, open_store

ERROR_LOG = "error.log"  # the full traceback of an unexpected controller error


class JobCancelled(Exception):
    pass


class JobController:
    """Runs one job. ``run()`` blocks until the job ends; ``status``/``metrics``/``cancel``
    may be called concurrently (the actor is threaded)."""

    def __init__(
        self,
        spec: JobSpec,
        data_ref: list[ray.ObjectRef],
        facts: DataFacts,
        driver_pid: int | None = None,
        submitted_at: float | None = None,
        ray_ready_s: float | None = None,
        group_factory: Callable[..., Any] = WorkerGroup,
        program: TrainingProgram | None = None,
        data_fingerprint: str | None = None,
    ):
        # Restarted by Ray (its process or node lost): continue from the last committed step.
        restart = after_restart(spec)
        spec = restart.spec if restart is not None else spec
        self.spec = spec
        # Wrapped in a list so Ray passes the reference, not the array, to us:
        # the controller never holds the data, it hands the reference to workers.
        self._data_ref = data_ref[0]
        self._facts = facts  # what the model factory is given (vocabulary, classes, ...)
        # How members are made: Ray actors (WorkerGroup); the controller's
        # unit tests pass a group of in-process members instead.
        self._group_factory = group_factory
        self.run_dir = spec.run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._reporter = RunReporter(self.run_dir, tensorboard=spec.train.tensorboard)
        if spec.resume is None:
            # A fresh run owns the folder (run_lock): an earlier run's records
            # would otherwise be read as this one's.
            self._reporter.start_fresh()
            for name in ("events.jsonl", ERROR_LOG):
                (self.run_dir / name).unlink(missing_ok=True)
        self._group: WorkerGroup | None = None  # the training role's members
        self._events = EventLog(self.run_dir / "events.jsonl")
        self._standing = StandingRoles([], self._events, spec.elastic.max_failures)
        self._scale_to: int | None = None
        self._draining = DrainingNodes()
        self._drain_noticed: set[int] = set()  # worker ids announced as on a draining node
        # The lineage this run's checkpoints belong to: its own id, or that of
        # the run it resumed (retention only ever counts its own lineage).
        self._lineage = spec.job_id
        self._tied: dict[str, str] = {}
        self._flops_per_token: int | None = None
        # The data's (computed once by the driver): recorded in checkpoints, checked on resume.
        self._fingerprint = data_fingerprint
        # How this job trains (strategy-specific); everything here is shared.
        # Tests may pass a program of their own; jobs get theirs by strategy.
        self._program = program or program_for(spec)
        self._status = JobStatus(
            job_id=spec.job_id,
            state=JobState.PENDING,
            run_dir=str(self.run_dir),
            total_steps=spec.train.steps,
            driver_pid=driver_pid,
        )
        self._started = time.time()
        self._submitted_at = submitted_at or self._started
        if ray_ready_s is not None:
            self._status.startup_s["ray"] = round(ray_ready_s, 3)
        if restart is not None:
            restart.carry_over(self._status, self._events)
        self._metrics = MetricsExporter(spec.job_id)  # ray.util.metrics, tagged by job_id
        self._phase("controller")
        self._write_status()

    # -- queries (called concurrently with run) ------------------------------

    def status(self) -> JobStatus:
        with self._lock:
            self._status.elapsed_s = time.time() - self._started
            return self._status

    def metrics(self, since: int = 0) -> list[dict[str, Any]]:
        return self._reporter.since(since)

    def cancel(self) -> None:
        self._cancel.set()

    def worker_pids(self) -> list[int]:
        """Process ids of the current members, in rank order."""
        return [m.pid for m in self._group.members] if self._group else []

    def events(self) -> list[dict[str, Any]]:
        return self._events.all()

    def scale(self, workers: int) -> int:
        """Ask for ``workers`` workers (clamped to the training role's [minimum, maximum]:
        cluster.min_workers..max_workers); applied at the next step boundary. Returns the new
        target."""
        role = self._program.roles()[0]
        decision = decide_target(workers, role.minimum, role.maximum)
        self._scale_to = decision.target
        return decision.target

    @property
    def _workers(self) -> list[Any]:
        """The current members' actors, in rank order."""
        return self._group.actors if self._group else []

    # -- the job -------------------------------------------------------------

    def run(self) -> JobStatus:
        try:
            self._set(state=JobState.STARTING, checkpoints_failed=0, checkpoints_committed=0)
            store = self._checkpoint_store()
            store.check()  # a bad bucket or credentials fail now, not at the first checkpoint
            self._claim_checkpoint_root(store)
            self._start_workers()
            start_step = self._restore(self.spec.resume)
            self._gather(self._group.call("begin", start_step), "start")
            self._phase("state_ready")
            self._set(state=JobState.RUNNING, step=start_step)
            self._train(start_step, store)
            self._finish()
            self._set(state=JobState.SUCCEEDED)
        except JobCancelled:
            # Checkpoints still uploading commit first, so the summary names the newest.
            self._forget_checkpoint_committer()
            self._set(state=JobState.CANCELLED, error="cancelled by the user")
        except Exception as e:  # noqa: BLE001 - every failure becomes the job's error
            self._set(state=JobState.FAILED, error=self._describe(e))
        finally:
            self._stop_workers()
            self._reporter.close()
            self._write_status()
        return self.status()

    def _claim_checkpoint_root(self, store: ObjectStore) -> None:
        """A fresh run starts only over a root without another run's checkpoints.

        The driver checks this before Ray starts (``orchestrator.preflight``);
        a job submitted from another machine is held to it here. With
        ``checkpoint.overwrite=true`` the earlier checkpoints are deleted.
        """
        problem = fresh_root_problem(store, self.spec)
        if problem:
            raise ConfigError(problem)
        if self.spec.resume is None and self.spec.checkpoint.overwrite:
            for step in sorted(all_step_dirs(store)):
                self._clear_old_checkpoint(store, step)

    def _start_workers(self) -> None:
        """Ask Ray for every role's members; start once the minimum of each is placed.

        The program's first role trains (``cluster.workers`` of them, at
        least ``cluster.min_workers``); the others are standing roles
        (``orchestrator/standing_roles.py``), seated before the first epoch.
        """
        cl = self.spec.cluster
        training, *standing = job_roles(self._program)
        make = self._group_factory
        group = make(self.spec, self._program, training, self._data_ref, 0, self._events)
        self._group = group
        self._standing = StandingRoles(
            [
                make(self.spec, self._program, r, self._data_ref, 0, self._events, standing=True)
                for r in standing
            ],
            self._events,
            self.spec.elastic.max_failures,
        )
        group.spawn(training.count + group.spares)
        self._standing.spawn()
        # The planner needs the parameter count; it is worked out while the
        # workers start. On the meta device (shapes only, no memory), whose
        # first initializer call imports torch._dynamo: ~1 s worth hiding.
        with torch.device("meta"):
            model = build_model(self.spec.model, self._facts)
            group.numel = self._program.trained_layout(model).numel
            self._tied = tied_aliases(model)
            # Training FLOPs per token, for the achieved TFLOP/s (and MFU) of each step.
            flops = getattr(model, "flops_per_token", None)
            self._flops_per_token = flops() if callable(flops) else None
        members = group.admit_ready(
            timeout=min(START_GRACE_S, cl.start_timeout_s), limit=group.target
        )
        members = group.wait_for_members(
            members,
            training.minimum,
            cl.start_timeout_s,
            on_wait=lambda: self._set(state=JobState.WAITING_FOR_WORKERS),
        )
        self._phase("workers_placed")
        self._standing.seat_all(
            cl.start_timeout_s, on_wait=lambda: self._set(state=JobState.WAITING_FOR_WORKERS)
        )
        self._standing_changed()
        group.form_epoch(members)
        self._phase("group_formed")
        for m in members:
            self._events.emit("joined", worker_id=m.worker_id, rank=m.rank, pid=m.pid)
        self._set(state=JobState.STARTING, workers=self._member_rows(), epoch=group.epoch)

    def _restore(self, resume: str | None) -> int:
        """Load the checkpoint named by ``resume``; returns the first step to run.

        ``resume=<URI>/step-N`` loads exactly that checkpoint: a missing,
        truncated or corrupt shard is an error naming the object.
        ``resume=latest`` tries the committed checkpoints newest first and
        falls back past any that are damaged (manifest unreadable, a shard
        missing or of the wrong size, or a chunk checksum that fails while the
        workers load it), logs each one skipped, and says so in the status
        (``resume_note``). The workers' load is the checksum verification: each
        rank checks every chunk it reads, and together they read every byte
        of the checkpoint's tensors, so nothing is downloaded twice.
        """
        if resume is None:
            return 0
        s = self.spec.storage
        options = {"endpoint_url": s.endpoint_url, "region": s.region, "path_style": s.path_style}
        fallback = resume == "latest"
        if fallback:
            store = open_store(self.spec.checkpoint.uri, **options)
            candidates = list(reversed(committed_steps(store)))
        else:
            store, manifest = resolve(resume, **options)
            candidates = [manifest.step]
        layout = self._group.ask_first("layout_json")
        skipped: list[str] = []
        for step in candidates:
            uri = f"{store.uri}/{step_dir(step)}"
            try:
                manifest = read_manifest(store, step)
                check_objects(store, manifest)
            except CorruptCheckpointError as e:
                if not fallback:
                    raise
                self._skip_checkpoint(skipped, uri, str(e))
                continue
            mismatch = resume_mismatch(manifest, layout, self.spec, uri, self._fingerprint)
            if mismatch:
                raise ConfigError(mismatch)
            results = self._gather(
                self._group.call("load_checkpoint", store.uri, manifest.to_json()),
                "restore",
            )
            holders = self._standing.state_holders() or []
            if holders:
                text = manifest.to_json()
                results += self._group.get(
                    [m.handle.load_checkpoint.remote(store.uri, text) for m in holders],
                    timeout=self.spec.cluster.collective_timeout_s,
                )
            bad = [r["error"] for r in results if not r["ok"]]
            if bad:
                if not fallback:
                    raise CorruptCheckpointError(bad[0])
                self._skip_checkpoint(skipped, uri, bad[0])
                continue
            # Checked once loaded: a damaged checkpoint past the end is skipped, not refused.
            done_already = nothing_left(manifest, self.spec, uri)
            if done_already:
                raise ConfigError(done_already)
            note = None
            if skipped:
                note = f"resume=latest fell back to {uri}, skipping: " + "; ".join(skipped)
                logging.getLogger("shoal.checkpoint").warning(note)
            self._reporter.keep_before(manifest.step)
            self._lineage = manifest.lineage or self._lineage
            self._set(
                resumed_from=uri,
                last_checkpoint=uri,
                resume_note=note,
                resume_bytes_read=[r["bytes_read"] for r in results],
                resume_s=max(r["seconds"] for r in results),
            )
            return manifest.step
        if not skipped:
            raise StoreError(
                f"resume=latest: no committed checkpoint under {store.uri}. Point run_dir= at "
                "the earlier run's folder (see `shoal status`), or pass resume=<checkpoint URI>."
            )
        raise CorruptCheckpointError(
            f"resume=latest: no valid checkpoint under {store.uri}: " + "; ".join(skipped)
        )

    def _skip_checkpoint(self, skipped: list[str], uri: str, reason: str) -> None:
        """Record (and log) a checkpoint that ``resume=latest`` passes over."""
        skipped.append(f"{uri} ({reason})")
        logging.getLogger("shoal.checkpoint").warning(
            "resume=latest: skipping damaged checkpoint %s: %s", uri, reason
        )

    def _train(self, start_step: int, store) -> None:
        """Run the steps from ``start_step`` on, checkpointing and surviving membership changes.

        A lost worker (``MembershipLost``) ends the epoch: ``_recover`` rebuilds
        the state in a new epoch and the loop continues from the step it
        returns. Joins and drains (``_rebalance_membership``) happen only at
        step boundaries with no step in flight.
        """
        t, every = self.spec.train, self.spec.checkpoint.every
        total = t.steps
        step_timeout = self.spec.elastic.step_timeout_s
        program = self._program
        program.begin_epoch(self._group.plan)

        inflight: deque[tuple[int, float, list[ray.ObjectRef]]] = deque()
        next_step = done = start_step
        last_done = time.perf_counter()
        while next_step < total or inflight:
            if self._standing.tend():
                self._standing_changed()
                self._set(workers=self._member_rows())
            spares = self._group.standing_by()
            if spares != self._status.spares:
                self._set(spares=spares)
            # A join or drain waits for the steps in flight, then runs between steps.
            change = self._membership_change_wanted()
            # Or the same members with a fresh plan (e.g. stages re-cut to measured speeds).
            replan = not change and done < total and program.replan_wanted()
            if (change or replan) and not inflight:
                if change and self._rebalance_membership(done):
                    program.begin_epoch(self._group.plan)
                elif replan:
                    self._move_state(done, list(self._group.members), [], [], [])
                    program.begin_epoch(self._group.plan)
                change = replan = False
            # Never queue past the next checkpoint or evaluation: each must see a quiescent step.
            boundary = min(queue_limit(done, every, total), queue_limit(done, t.eval_every, total))
            while (
                not (change or replan) and next_step < boundary and len(inflight) < PIPELINE_DEPTH
            ):
                lr = lr_at(next_step, t)
                refs = self._group.call_items(program.work_items(next_step, lr))
                inflight.append((next_step, lr, refs))
                next_step += 1
            step, lr, refs = inflight.popleft()
            try:
                results = self._group.gather(refs, f"step {step}", timeout=step_timeout)
                program.observe(results)
                record = program.reduce(step, lr, results, time.perf_counter() - last_done)
                record.update(epoch=self._group.epoch, elapsed_s=time.time() - self._started)
                record.update(self._throughput(record, len(self._group.members)))
                if not inflight and eval_due(step + 1, t.eval_every, total):
                    record.update(self._evaluate())
                with self._lock:
                    for key, value in program.status_fields().items():
                        setattr(self._status, key, value)
                    for row, fields in zip(
                        self._status.workers, program.member_fields(record), strict=False
                    ):
                        row.update(fields)
                self._record(record, done=step + 1)
                last_done = time.perf_counter()
                done = step + 1
                if not inflight and checkpoint_due(done, every, total):
                    self._checkpoint(done, store)
            except MembershipLost as lost:
                inflight.clear()
                next_step = done = self._recover(lost, done)
                program.begin_epoch(self._group.plan)
                last_done = time.perf_counter()
                continue
            if self._cancel.is_set():
                # Let queued steps finish (they are already running), then stop.
                for _, _, queued in inflight:
                    self._gather(queued, "drain")
                raise JobCancelled()

    # -- membership ----------------------------------------------------------

    def _recover(self, lost: MembershipLost, committed: int) -> int:
        """Replace lost workers and rebuild the state; returns the step to continue from.

        The state comes from the survivors' memory (own state, snapshots,
        buddies' replicas) when it is complete there, else from the newest
        valid checkpoint.
        """
        start = time.perf_counter()
        g, e = self._group, self.spec.elastic
        g.failures += len(lost.dead)
        for m in lost.dead:
            self._events.emit(
                "died",
                worker_id=m.worker_id,
                rank=m.rank,
                pid=m.pid,
                during=lost.what,
                reason=lost.reason,
            )
        give_up = give_up_reason(g.failures, e.max_failures, lost.reason)
        if give_up:
            raise RuntimeError(give_up)
        self._set(state=JobState.RECOVERING)
        survivors = [m for m in g.members if m not in lost.dead]
        # A step that every rank applied but whose result was lost with a worker
        # is redone from the copies of the step before (they are double-
        # buffered) rather than kept: kept, it would have no metrics record.
        # Seconds spent in each phase, in the recovery's event: where recovery time goes.
        phases: dict[str, float] = {}
        mark = time.perf_counter()

        def phase(name: str) -> None:
            nonlocal mark
            now = time.perf_counter()
            phases[name] = round(now - mark, 4)
            mark = now

        plan, survivors = g.collect_plan(survivors, upto=committed)
        phase("holdings")
        # None also when a holder died while exporting: the checkpoint is used then.
        pieces = g.export_pieces(plan, survivors) if plan is not None else None
        phase("export")
        answered = len(survivors)
        survivors = g.leave(survivors)
        stuck = answered - len(survivors)  # exported, then killed: lost too
        g.failures += stuck
        phase("leave")
        self._forget_checkpoint_committer()
        phase("committer")
        # A spare (elastic.spares) is placed and started already: it joins at once.
        members = survivors + g.admit_ready(limit=g.target - len(survivors))
        missing = g.target + g.spares - len(members) - len(g.pending)
        if missing > 0:
            g.spawn(missing)
        members = g.wait_for_members(
            members,
            g.role.minimum,
            e.wait_timeout_s,
            on_wait=lambda: self._set(state=JobState.WAITING_FOR_WORKERS),
        )
        phase("members")
        g.form_epoch(members)
        phase("epoch")
        for m in members:
            if m not in survivors:  # a replacement placed in time for this epoch
                self._events.emit("joined", worker_id=m.worker_id, rank=m.rank, pid=m.pid)
        if recovery_source(pieces is not None) is RecoverySource.BUDDIES:
            g.restore(pieces, plan.done)
            done = plan.done
            phase("restore")
            self._events.emit(
                "restored-from-buddy",
                step=done,
                epoch=g.epoch,
                from_replicas=plan.from_replicas,
                phases_s=phases,
            )
        else:
            done = self._restore("latest")
            self._gather(self._group.call("begin", done), "start")
            phase("restore")
            self._events.emit(
                "restored-from-checkpoint",
                phases_s=phases,
                step=done,
                epoch=g.epoch,
                reason="no step at which every shard has a copy in memory",
                held=g.last_holdings,
            )
        redone = max(0, committed - done)
        self._reporter.keep_before(done)
        self._events.emit("replanned", epoch=g.epoch, workers=len(members), step=done)
        with self._lock:
            st = self._status
            st.failures_survived += len(lost.dead) + stuck
            st.steps_redone += redone
            st.recovery_s += time.perf_counter() - start
        self._set(state=JobState.RUNNING, epoch=g.epoch, step=done, workers=self._member_rows())
        return done

    def _membership_change_wanted(self) -> bool:
        g = self._group
        ready = g.ready_joiners()
        draining = len(self._drain_decision(joining=ready).leaving)
        return membership_change_wanted(len(g.members), g.target, self._scale_to, ready, draining)

    def _drain_decision(self, joining: int, admitted: int = 0) -> DrainDecision:
        """Which members on draining nodes would leave now; announces newly seen ones.

        ``joining``: ready replacements that would join at this boundary,
        ``admitted`` of them already taken out of the pending list. A member
        first seen on a draining node gets a replacement spawned at once, so
        that it can start (elsewhere: Ray places nothing on a draining node)
        while the member trains on.
        """
        g = self._group
        draining = self._draining.current()
        on_draining = on_draining_nodes(g.members, draining)
        new = [m for m in on_draining if m.worker_id not in self._drain_noticed]
        for m in new:
            self._drain_noticed.add(m.worker_id)
            self._events.emit(
                "node-draining",
                worker_id=m.worker_id,
                rank=m.rank,
                node_id=m.node_id,
                deadline_ms=draining[m.node_id],
            )
        if new:
            staying = len(g.members) - len(on_draining)
            missing = g.target - staying - len(g.pending) - admitted
            if missing > 0:
                g.spawn(missing)
        return plan_drain(g.members, draining, joining, g.role.minimum)

    def _rebalance_membership(self, done: int) -> bool:
        """At a quiescent step boundary: admit placed joiners, drain workers that must go.

        Workers go when they are above the target (``shoal scale`` down) or
        on a node Ray is draining. Their state moves to the remaining and
        joining workers first, as in a recovery but from live state, so no
        step is lost. Returns whether the membership changed (a new epoch).
        """
        g = self._group
        if self._scale_to is not None:
            g.target, self._scale_to = self._scale_to, None
        draining = self._draining.current()
        joiners = []
        for m in g.admit_ready():
            if m.node_id in draining:  # placed just before its node was marked
                g.remove([m])
            else:
                joiners.append(m)
        drain = self._drain_decision(joining=len(joiners), admitted=len(joiners))
        decision = decide_membership(
            g.members, drain.leaving, joiners, g.target, len(g.pending), g.spares
        )
        g.remove(list(decision.surplus))  # more were placed than the target and spares need
        g.stand_by(list(decision.standby))
        if decision.changed:
            self._move_state(
                done,
                list(decision.staying),
                list(decision.joining),
                list(decision.drained + decision.scaled_down),
                list(decision.drained),
            )
        if decision.spawn:
            g.spawn(decision.spawn)
        return decision.changed

    def _move_state(
        self,
        done: int,
        staying: list[Member],
        joiners: list[Member],
        leaving: list[Member],
        from_draining_nodes: list[Member],
    ) -> None:
        """End the epoch at step ``done`` and start the next one on ``staying + joiners``."""
        g = self._group
        plan, answered = g.collect_plan(list(g.members))
        lost = [m for m in staying if m not in answered]
        if plan is None or plan.done != done or lost:
            raise RuntimeError(
                f"cannot move the state of step {done}: "
                + (f"{len(lost)} staying worker(s) did not answer" if lost else "no complete copy")
            )
        pieces = g.export_pieces(plan, answered)
        # A leaving worker that is already gone (its node went before its
        # deadline) has nothing left to do: its state came from its buddy.
        left = g.leave(answered)
        if any(m not in left for m in staying):
            raise RuntimeError("a worker did not leave its epoch at a step boundary")
        self._forget_checkpoint_committer()
        g.remove(leaving)
        for m in leaving:
            reason = "node draining" if m in from_draining_nodes else "scaled down"
            self._events.emit(
                "drained", worker_id=m.worker_id, rank=m.rank, pid=m.pid, step=done, reason=reason
            )
        members = staying + joiners
        g.form_epoch(members)
        g.restore(pieces, done)
        for m in joiners:
            self._events.emit("joined", worker_id=m.worker_id, rank=m.rank, pid=m.pid, step=done)
        self._events.emit("replanned", epoch=g.epoch, workers=len(members), step=done)
        self._set(epoch=g.epoch, workers=self._member_rows())

    def _checkpoint(self, step: int, store: ObjectStore) -> None:
        """Start checkpoint ``step``; commit it once every worker's upload has succeeded.

        Each worker snapshots its shard to host memory and returns (waiting
        first for its previous upload, if that is still running: the policy
        of ``storage.async_saver``); uploads continue in the background while
        training goes on. A ``CheckpointCommitter`` thread collects the
        outcomes and writes the manifest, in step order, only when every rank
        succeeded; a failed upload makes the checkpoint count as failed
        (``checkpoints_failed`` in the status, a warning in the log) and
        training continues. The run's last checkpoint (``step == train.steps``)
        waits for the uploads: the run is not over before its final state is
        safe, or has failed to be saved.

        The time training was blocked goes into the record of the step just
        completed: ``checkpoint_blocked_s`` (wall time on the controller),
        and per rank ``checkpoint_wait_s`` (waiting for the previous upload)
        and ``checkpoint_copy_s`` (the snapshot).
        """
        start = time.perf_counter()
        committer = self._checkpoint_committer(store)
        if step in committer.preexisting:
            self._clear_old_checkpoint(store, step)
        workers = list(self._workers)  # the members of this epoch save, and are asked
        # Unique object keys per save attempt: an abandoned attempt's late
        # upload can never overwrite, or be named by, this one's manifest.
        save_id = uuid.uuid4().hex[:12]
        holders = self._standing.state_holders()
        if holders is None and step == self.spec.train.steps:
            holders = self._wait_for_state_holders()  # the final state must be saved whole
        if holders is None:
            self._checkpoint_outcome(
                step, None, "a standing member that holds state is being replaced"
            )
            return
        tickets = self._gather(
            self._group.call("save_shard", step, save_id), "checkpoint", timeout=CHECKPOINT_CALL_S
        )
        try:
            if holders:
                tickets += self._group.get(
                    [m.handle.save_shard.remote(step, save_id) for m in holders],
                    timeout=CHECKPOINT_CALL_S,
                )
        except ray.exceptions.RayError as e:  # a standing member died: this checkpoint fails
            self._checkpoint_outcome(step, None, f"a standing member's save failed: {e}")
            return
        blocked = time.perf_counter() - start
        committer.submit(step, workers + [m.handle for m in holders], save_id=save_id)
        fields: dict[str, Any] = {
            "checkpoint_blocked_s": round(blocked, 5),
            "checkpoint_wait_s": [round(t["wait_s"], 5) for t in tickets],
            "checkpoint_copy_s": [round(t["copy_s"], 5) for t in tickets],
        }
        if step == self.spec.train.steps:
            drain_start = time.perf_counter()
            if not committer.drain(CheckpointCommitter.FINAL_TIMEOUT_S):
                self._checkpoint_outcome(
                    step,
                    None,
                    f"uploads still running after {CheckpointCommitter.FINAL_TIMEOUT_S:g}s",
                )
            fields["checkpoint_drain_s"] = round(time.perf_counter() - drain_start, 5)
        self._reporter.amend_last(step, fields)
        self._metrics.checkpoint(fields)
        self._reporter.plot_soon()

    def _checkpoint_committer(self, store: ObjectStore) -> CheckpointCommitter:
        """The job's committer thread, started at the first checkpoint."""
        committer = getattr(self, "_committer", None)
        if committer is None:
            layout = self._group.ask_first("layout_json")
            t = self.spec.train

            def manifest_for(step: int, records: list[ShardRecord]) -> Manifest:
                # The training role's records; standing members' are of other spaces.
                dp = [r for r in records if r.space == DEFAULT_SPACE]
                return Manifest(
                    step=step,
                    world_size=len(dp),
                    strategy=self.spec.strategy.name,
                    numel=max(r.hi for r in dp),
                    layout=layout,
                    optimizer={"name": t.optimizer, "step_count": step},
                    shards=records,
                    data={
                        "position": step,
                        "seed": t.seed,
                        "global_batch": t.global_batch,
                        "fingerprint": self._fingerprint,
                    },
                    config=self.spec.to_dict(),
                    tied=self._tied,
                    lineage=self._lineage,
                )

            try:
                preexisting = all_step_dirs(store)
            except StoreError:
                preexisting = set()
            committer = CheckpointCommitter(
                store,
                manifest_for,
                keep=self.spec.checkpoint.keep,
                on_outcome=self._checkpoint_outcome,
                preexisting=preexisting,
                get=self._group.get,
            )
            self._committer = committer
        return committer

    def _clear_old_checkpoint(self, store: ObjectStore, step: int) -> None:
        """Remove an earlier run's checkpoint at ``step`` before this run saves over it.

        A resume that went back past it (e.g. falling back from a damaged
        checkpoint) reaches the same step again. The old manifest goes first:
        a manifest must never describe shards that are being replaced.
        """
        try:
            store.delete(f"{step_dir(step)}/{MANIFEST}")
            store.delete_prefix(step_dir(step) + "/")
        except StoreError as e:
            # The new save will fail too if the store is down; that is counted there.
            logging.getLogger("shoal.checkpoint").warning(
                "could not remove the old checkpoint at step %d: %s", step, e
            )

    def _forget_checkpoint_committer(self) -> None:
        """Before a membership change: let in-flight checkpoints settle, then start afresh.

        The committer polls the workers of the epoch that saved; a lost
        worker's upload fails its checkpoint (counted, like any failed one).
        Closing it guarantees it writes no manifest later: a step it had not
        committed is counted as failed. A new committer, for the new members,
        starts at the next checkpoint.
        """
        committer = getattr(self, "_committer", None)
        if committer is not None:
            committer.drain(60.0)
            if not committer.close(timeout=60.0):
                logging.getLogger("shoal.checkpoint").warning(
                    "the previous epoch's checkpoint committer did not stop within 60s"
                )
            self._committer = None

    def _checkpoint_outcome(self, step: int, uri: str | None, error: str | None) -> None:
        """Called by the committer: checkpoint ``step`` was committed at ``uri``, or failed."""
        log = logging.getLogger("shoal.checkpoint")
        if uri is not None:
            with self._lock:
                committed = getattr(self._status, "checkpoints_committed", 0) + 1
            self._set(last_checkpoint=uri, checkpoints_committed=committed)
            return
        with self._lock:
            failed = getattr(self._status, "checkpoints_failed", 0) + 1
        warning = f"checkpoint at step {step} failed, training continues: {error}"
        log.warning(warning)
        self._set(checkpoints_failed=failed, checkpoint_warning=warning)

    def _finish(self) -> None:
        memory = self._group.ask_all("memory_report")
        t = self.spec.train
        sample = None
        if t.sample_tokens > 0:
            texts = self._gather(
                self._group.call("generate", t.sample_prompt, t.sample_tokens, 0.8, t.seed),
                "sample",
            )
            sample = texts[0]  # None: the task produces no text (e.g. classification)
            if sample is not None:
                self._reporter.write_sample(sample)
        self._set(memory=memory, sample=sample)

    # -- helpers ---------------------------------------------------------------

    def _gather(
        self, refs: list[ray.ObjectRef], what: str, timeout: float | None = None
    ) -> list[Any]:
        """Results of one call per member; see ``WorkerGroup.gather`` for failures.

        Bounded: by ``timeout``, else by ``cluster.collective_timeout_s`` (the
        calls gathered here may run collectives, or a checkpoint load).
        """
        bound = timeout if timeout is not None else self.spec.cluster.collective_timeout_s
        return self._group.gather(refs, what, timeout=bound)

    def _evaluate(self) -> dict[str, float]:
        """The program's eval metrics on the held-out split, after a quiescent step."""
        items = self._program.eval_items()
        if items is None:
            return {}
        results = self._group.gather(
            self._group.call_items(items), "evaluate", timeout=self.spec.elastic.step_timeout_s
        )
        return self._program.reduce_eval(results)

    def _stop_workers(self) -> None:
        if self._group is not None:
            self._group.kill_all()
        self._standing.kill_all()
        with self._lock:
            self._status.spares = []
        withdraw_capacity(self.spec)
        o = self.spec.offload
        if o.optimizer == "nvme":
            from storage.tiers import remove_job_files

            # Killed workers leave their offload files; this node's go now, others' at the
            # next start of a tier there (storage/tiers.py).
            remove_job_files(o.nvme_path, self.spec.job_id)

    def _wait_for_state_holders(self) -> list[Member] | None:
        """Replace dead standing members that hold state, for up to ``cluster.start_timeout_s``."""
        deadline = time.monotonic() + self.spec.cluster.start_timeout_s
        while time.monotonic() < deadline:
            if self._standing.tend(force=True):
                self._standing_changed()
                self._set(workers=self._member_rows())
            holders = self._standing.state_holders()
            if holders is not None:
                return holders
            time.sleep(0.2)
        return None

    def _standing_changed(self) -> None:
        """Tell the program who its standing members are now (e.g. the live expert hosts).

        Then send them what the program asks of them after such a change.
        """
        for g in self._standing.groups:
            self._program.standing_changed(g.role.name, list(g.members))
        self._standing.call_items(self._program.standing_items())

    def _member_rows(self) -> list[dict[str, Any]]:
        """Every member's status row: the training role's in rank order, then standing roles'."""
        return self._group.describe() + self._standing.describe()

    def _checkpoint_store(self):
        s = self.spec.storage
        return open_store(
            self.spec.checkpoint.uri,
            endpoint_url=s.endpoint_url,
            region=s.region,
            path_style=s.path_style,
        )

    def _record(self, record: dict[str, Any], done: int) -> None:
        self._phase("first_step")
        self._reporter.add(record)
        with self._lock:
            self._status.step = done
            self._status.loss = record["loss"]
            self._status.tokens_per_s = record.get("tokens_per_s")
            self._status.samples_per_s = record.get("samples_per_s")
            for key in ("eval_loss", "accuracy", "perplexity"):
                if key in record:
                    setattr(self._status, key, record[key])
            self._metrics.step(record, self._status)
        if done % self.spec.train.log_every == 0 or done == self.spec.train.steps:
            self._write_status()

    def _throughput(self, record: dict[str, Any], workers: int) -> dict[str, float]:
        """Achieved model TFLOP/s of a step and, given the devices' peak, MFU (as nanoGPT)."""
        if not self._flops_per_token or "tokens_per_s" not in record:
            return {}
        tflops = record["tokens_per_s"] * self._flops_per_token / 1e12
        out = {"tflops": round(tflops, 6)}
        peak = self.spec.cluster.peak_tflops_per_worker
        if peak:
            out["mfu"] = round(tflops / (peak * workers), 6)
        return out

    def _phase(self, name: str) -> None:
        """Note when a start-up phase ended, in seconds since the job was submitted."""
        with self._lock:
            if name not in self._status.startup_s:
                self._status.startup_s[name] = round(time.time() - self._submitted_at, 3)

    def _set(self, **fields: Any) -> None:
        with self._lock:
            if "state" in fields:  # every state change goes through the one transition function
                fields["state"] = transition(self._status.state, fields["state"])
            for k, v in fields.items():
                setattr(self._status, k, v)
        self._write_status()

    def _write_status(self) -> None:
        with self._lock:
            self._status.elapsed_s = time.time() - self._started
            write_status(self.run_dir, self._status)

    def _describe(self, e: Exception) -> str:
        """The job's error: the message of a user-facing error; for anything else, one line.

        A worker's error keeps the end of its remote traceback (where the
        user's code failed). The full traceback of anything unexpected goes
        to ``error.log`` in the run folder, which the message names.
        """
        if isinstance(e, WorkerError | ConfigError | StoreError | CorruptCheckpointError):
            return str(e)
        path = self.run_dir / ERROR_LOG
        path.write_text("".join(traceback.format_exception(e)))
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"{type(e).__name__}: {first} (traceback in {path})"


# How often Ray restarts a lost controller (and re-sends its pending ``run()``), per job.
CONTROLLER_RESTARTS = 3


def controller_actor_class():
    """The Ray actor class, created lazily so importing this module does not need Ray started.

    Restartable: a controller lost with its process or node takes its members
    with it (it owns them), and Ray starts it again; ``orchestrator/restart.py``
    says how the new one continues, and why this beats re-submitting the job.
    """
    return ray.remote(
        num_cpus=0,
        max_concurrency=8,
        max_restarts=CONTROLLER_RESTARTS,
        max_task_retries=CONTROLLER_RESTARTS,
    )(JobController)
