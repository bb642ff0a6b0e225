"""The job's workers and its epochs: membership, failures, joins and drains.

One **epoch** is one fixed membership with one process group. Any change —
a worker dies (its actor is gone, or it misses ``elastic.step_timeout_s``), a
new worker has been placed by Ray, a worker is drained — ends the epoch at a
step boundary: the survivors leave the process group, the planner makes a
new plan (shards, ranks), the training state moves to its new owners, and
the next epoch continues from the newest step whose state is complete.

Where the state comes from (``orchestrator/recovery.py``): the workers' own
live state, their snapshots, and their buddies' replicas (host memory), so a
single failure loses no step; only when a shard and its replica are both
gone does the controller fall back to the last checkpoint.

The group only carries decisions out; which step runs and when to save stay
with the controller.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import ray

from collectives.optim import OptimizerSpec
from collectives.process_group import Rendezvous, default_backend
from orchestrator.events import EventLog
from orchestrator.recovery import Holding, RecoveryPlan, plan_recovery
from orchestrator.shard_plan import shard_bounds, weights_from_memory
from orchestrator.spec import JobSpec

# glibc keeps freed large buffers in its heap, so a worker's RSS would hide
# what sharding saves; with this threshold, buffers of 64 KiB and more are
# mmap-ed and returned to the OS when freed, and RSS tracks what is held
# (cluster.return_freed_memory=true). Every step then pays for fresh pages.
RETURN_FREED_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
_POLL_S = 0.25
# After the first error of a step, how long to wait for the other ranks'
# calls to end. A dead peer makes gloo fail within milliseconds, and a
# survivor blocked on another survivor is freed as soon as that one severs
# its connections (collectives/gloo_sockets.py), so this is a safety bound.
_SETTLE_S = 10.0
# How long a survivor may take to leave its epoch before it is counted as
# stuck and killed (its state has been exported by then). With severing, no
# survivor has stayed stuck in the chaos runs; this is the fallback should
# one ever block outside a collective (e.g. in user code).
_LEAVE_S = 20.0
# How long a control call (holdings, export) may take: it runs on the
# worker's control thread, beside whatever the training thread is doing.
_CONTROL_S = 60.0
# Error texts of a collective whose peer went away: the rank that reports
# one is a survivor, not the cause.
_PEER_FAILURE_MARKERS = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Connection refused",
    "Broken pipe",
    "Socket Timeout",
    "Timed out waiting",
    "timed out",
    "transport/tcp",
    "peer failure earlier in this epoch",
    "DistBackendError",
    "NCCL",
)


@dataclass
class Member:
    """A worker actor; ``rank`` is its rank in the current epoch."""

    worker_id: int
    actor: Any
    pid: int | None = None
    available_memory: int = 0
    node_id: str | None = None  # Ray's node id (hex), known once placed
    rank: int = -1
    info: dict[str, Any] = field(default_factory=dict)


class WorkerError(RuntimeError):
    """A worker raised or died; the message says which, where, and why."""

    def __init__(self, rank: int, pid: int | None, what: str, cause: Exception):
        where = f"worker {rank}" + (f" (pid {pid})" if pid else "")
        if isinstance(cause, ray.exceptions.RayTaskError):
            inner = cause.cause if getattr(cause, "cause", None) is not None else cause
            detail = f"{type(inner).__name__}: {inner}"
            # Keep the end of the remote traceback: where in the worker it failed.
            tail = str(cause).strip().splitlines()[-12:]
            msg = f"{where} raised during {what}: {detail.splitlines()[0]}\n" + "\n".join(tail)
        elif isinstance(
            cause, ray.exceptions.ActorDiedError | ray.exceptions.ActorUnavailableError
        ):
            first_line = str(cause).splitlines()[0]
            msg = f"{where} died during {what} (process killed or node lost): {first_line}"
        else:
            msg = f"{where} failed during {what}: {type(cause).__name__}: {cause}"
        super().__init__(msg)
        self.rank = rank
        self.cause = cause


class MembershipLost(Exception):
    """Workers were lost during ``what``; the job can continue after a recovery."""

    def __init__(self, what: str, dead: list[Member], first: WorkerError, reason: str):
        super().__init__(f"{len(dead)} worker(s) lost during {what}: {reason}")
        self.what = what
        self.dead = dead
        self.first = first  # the first error seen (often a survivor's lost-peer error)
        self.reason = reason  # why the dead ones are considered lost


def is_peer_failure(cause: Exception) -> bool:
    """Whether a worker's error only reports that a peer went away."""
    if isinstance(cause, ray.exceptions.ActorDiedError | ray.exceptions.ActorUnavailableError):
        return True
    text = f"{type(getattr(cause, 'cause', None) or cause).__name__}: {cause}"
    return any(marker in text for marker in _PEER_FAILURE_MARKERS)


class WorkerGroup:
    """Spawns workers, forms epochs, gathers results, and recovers from lost workers."""

    def __init__(self, spec: JobSpec, tokens_ref: ray.ObjectRef, numel: int, events: EventLog):
        self.spec = spec
        self._tokens_ref = tokens_ref
        self.numel = numel
        self.events = events
        self.members: list[Member] = []
        self.pending: list[tuple[Member, ray.ObjectRef]] = []
        self.bounds: list[tuple[int, int]] | None = None
        self.epoch = 0
        self.target = spec.cluster.workers
        self.failures = 0
        self.last_holdings: list[str] = []  # what the survivors held at the last recovery
        self._next_id = 0

    # -- spawning ------------------------------------------------------------

    @property
    def actors(self) -> list[Any]:
        return [m.actor for m in self.members]

    def spawn(self, n: int) -> None:
        """Ask Ray for ``n`` more workers; they join once placed (see ``admit_ready``)."""
        from actors.worker import DataParallelWorker

        cl = self.spec.cluster
        env = {"env_vars": RETURN_FREED_MEMORY_ENV} if cl.return_freed_memory else None
        for _ in range(n):
            wid = self._next_id
            self._next_id += 1
            actor = DataParallelWorker.options(
                num_cpus=cl.cpus_per_worker,
                num_gpus=cl.gpus_per_worker,
                name=f"shoal-{self.spec.job_id}-w{wid}",
                runtime_env=env,
            ).remote(self.spec, wid, self._tokens_ref)
            self.pending.append((Member(wid, actor), actor.probe.remote()))
        self._request_capacity()

    def _request_capacity(self) -> None:
        """Tell Ray's autoscaler how many worker-sized bundles the job wants."""
        cl = self.spec.cluster
        bundle = {"CPU": cl.cpus_per_worker}
        if cl.gpus_per_worker:
            bundle["GPU"] = cl.gpus_per_worker
        try:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[bundle] * self.target)
        except Exception:  # noqa: BLE001 - no autoscaler (a local instance): nothing to ask
            pass

    def admit_ready(self, timeout: float = 0.0) -> list[Member]:
        """Pending workers that Ray has placed and started (waiting up to ``timeout``)."""
        if not self.pending:
            return []
        refs = [ref for _, ref in self.pending]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        admitted, still = [], []
        for member, ref in self.pending:
            if ref not in ready:
                still.append((member, ref))
                continue
            try:
                probe = ray.get(ref)
            except ray.exceptions.RayError:
                continue  # died before joining: forget it
            member.pid = probe["pid"]
            member.available_memory = probe["available_memory"]
            member.node_id = probe.get("node_id")
            admitted.append(member)
        self.pending = still
        return admitted

    def ready_joiners(self) -> int:
        """How many pending workers Ray has placed and started (without waiting)."""
        if not self.pending:
            return 0
        refs = [ref for _, ref in self.pending]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        return len(ready)

    def wait_for_members(
        self, have: list[Member], minimum: int, timeout: float, on_wait: Callable[[], None]
    ) -> list[Member]:
        """Admit pending workers until ``minimum`` are available, or raise after ``timeout``."""
        members = list(have)
        deadline = time.monotonic() + timeout
        waited = False
        while len(members) < minimum:
            if not waited:
                on_wait()
                self.events.emit("waiting-for-workers", have=len(members), need=minimum)
                waited = True
            if len(members) + len(self.pending) < minimum:
                self.spawn(minimum - len(members) - len(self.pending))
            members += self.admit_ready(
                timeout=min(_POLL_S * 4, max(0.0, deadline - time.monotonic()))
            )
            if time.monotonic() > deadline and len(members) < minimum:
                cl = self.spec.cluster
                free = ray.available_resources()
                raise RuntimeError(
                    f"only {len(members)} of the {minimum} workers needed (cluster.min_workers) "
                    f"could be placed within {timeout:g}s, each needing {cl.cpus_per_worker} CPU "
                    f"and {cl.gpus_per_worker} GPU (free now: {free.get('CPU', 0):g} CPU, "
                    f"{free.get('GPU', 0):g} GPU). Add nodes, or lower cluster.min_workers or "
                    "the per-worker resources."
                )
        return members

    # -- epochs --------------------------------------------------------------

    def form_epoch(self, members: list[Member]) -> None:
        """Give ``members`` ranks, plan their shards, and form the process group."""
        self.epoch += 1
        for rank, m in enumerate(members):
            m.rank = rank
        self.members = members
        self.bounds = self._plan_shards([m.available_memory for m in members])
        cl = self.spec.cluster
        host, port = ray.get(members[0].actor.host_rendezvous.remote(len(members)))
        rdzv = Rendezvous(
            host,
            port,
            len(members),
            default_backend(cl.gpus_per_worker > 0),
            cl.collective_timeout_s,
        )
        infos = self.gather(
            [m.actor.setup.remote(rdzv, self.bounds, m.rank) for m in members], "setup"
        )
        for m, info in zip(members, infos, strict=True):
            m.info = asdict(info)

    def _plan_shards(self, available_memory: list[int]) -> list[tuple[int, int]] | None:
        """ZeRO shard ranges from ``strategy.shard_weights`` (None for ddp: nothing is sharded)."""
        if self.spec.strategy.name == "ddp":
            return None
        weights = self.spec.strategy.shard_weights
        n = len(available_memory)
        if weights is None or (weights != "auto" and len(weights) != n):
            # Explicit weights describe the starting membership; after it
            # changes, shards are split evenly.
            weights = [1.0] * n
        elif weights == "auto":
            weights = weights_from_memory(available_memory)
        return shard_bounds(self.numel, list(weights))

    @property
    def _bytes_per_element(self) -> int:
        """Bytes a shard keeps per flat element: the fp32 parameter and the optimizer's state."""
        t = self.spec.train
        state = OptimizerSpec(name=t.optimizer, momentum=t.momentum).state_keys()
        return 4 * (1 + len(state))

    def describe(self, shares: list[int] | None = None) -> list[dict[str, Any]]:
        """Membership for the status: worker, rank, node, pid, shard and its bytes, batch share."""
        rows = []
        for m in self.members:
            lo, hi = self.bounds[m.rank] if self.bounds else (0, self.numel)
            row = dict(m.info)
            row.update(
                worker_id=m.worker_id,
                rank=m.rank,
                pid=m.pid,
                node_id=m.node_id,
                shard=[lo, hi],
                shard_bytes=(hi - lo) * self._bytes_per_element,
            )
            if shares is not None:
                row["batch_share"] = shares[m.rank]
            rows.append(row)
        return rows

    # -- calls and failures --------------------------------------------------

    def gather(self, refs: list[ray.ObjectRef], what: str, timeout: float | None = None) -> list:
        """Results of one call per member (in rank order).

        The first error stops the wait. A worker that raised something other
        than a lost-peer error (a bug, bad data) raises ``WorkerError`` at once:
        retrying would fail again. Otherwise, with elasticity on, the other
        calls are given ``_SETTLE_S`` to end and ``MembershipLost`` names the
        workers that are gone. Calls still running after ``timeout`` seconds
        (stragglers) count as lost.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=_POLL_S)
            for ref in ready:
                try:
                    ray.get(ref)
                except Exception as e:  # noqa: BLE001 - classified below
                    return self._failed(refs, refs.index(ref), e, what)
            if pending and deadline is not None and time.monotonic() > deadline:
                slow = [self.members[refs.index(r)] for r in pending]
                for m in slow:
                    ray.kill(m.actor, no_restart=True)
                error = WorkerError(
                    slow[0].rank, slow[0].pid, what, TimeoutError("missed elastic.step_timeout_s")
                )
                if not self.spec.elastic.enabled:
                    raise error
                self._settle(refs)
                raise MembershipLost(what, slow, error, "missed elastic.step_timeout_s (killed)")
        return ray.get(refs)

    def _failed(self, refs: list[ray.ObjectRef], index: int, cause: Exception, what: str):
        member = self.members[index] if index < len(self.members) else None
        rank, pid = (member.rank, member.pid) if member else (index, None)
        error = WorkerError(rank, pid, what, cause)
        if not self.spec.elastic.enabled or not is_peer_failure(cause):
            raise error
        outcomes = self._settle(refs)
        dead = [
            self.members[i]
            for i, outcome in enumerate(outcomes)
            if isinstance(
                outcome, ray.exceptions.ActorDiedError | ray.exceptions.ActorUnavailableError
            )
        ]
        # A user error on any rank is fatal even if another rank died.
        for i, outcome in enumerate(outcomes):
            if isinstance(outcome, Exception) and not is_peer_failure(outcome):
                raise WorkerError(self.members[i].rank, self.members[i].pid, what, outcome)
        reason = "process died (killed, crashed or its node lost)"
        if not dead:
            # Only lost-peer errors but no dead actor: a peer hung or its node
            # is unreachable. Those still running are the suspects.
            dead = [self.members[i] for i, o in enumerate(outcomes) if o is None]
            reason = "stopped responding while its peers reported a lost connection (killed)"
        if not dead:
            raise error
        for m in dead:
            ray.kill(m.actor, no_restart=True)
        raise MembershipLost(what, dead, error, reason)

    def _settle(self, refs: list[ray.ObjectRef]) -> list[Exception | Any | None]:
        """Each call's outcome after a failure: a result, an exception, or None if still running."""
        ray.wait(refs, num_returns=len(refs), timeout=_SETTLE_S)
        outcomes: list[Exception | Any | None] = []
        for ref in refs:
            ready, _ = ray.wait([ref], timeout=0)
            if not ready:
                outcomes.append(None)
                continue
            try:
                outcomes.append(ray.get(ref))
            except Exception as e:  # noqa: BLE001
                outcomes.append(e)
        return outcomes

    # -- moving state between epochs -----------------------------------------

    def collect_plan(
        self, survivors: list[Member], upto: int | None = None
    ) -> tuple[RecoveryPlan | None, list[Member]]:
        """Ask ``survivors`` what they hold and plan where the state comes from.

        Returns the plan (None: no complete state in memory) and the
        survivors that answered (one that fails to answer is treated as lost).
        ``upto``: prefer the newest step not after it, when the copies cover one.
        """
        answered, holdings = [], []
        for m, ref in [(m, m.actor.holdings.remote()) for m in survivors]:
            try:
                rows = ray.get(ref, timeout=_CONTROL_S)
            except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
                ray.kill(m.actor, no_restart=True)
                self.events.emit("died", worker_id=m.worker_id, rank=m.rank, pid=m.pid)
                continue
            answered.append(m)
            holdings += [Holding(**row) for row in rows]
        old_bounds = self.bounds or [(0, self.numel)]
        self.last_holdings = [
            f"{h.kind} of rank {h.owner} at step {h.done} on rank {h.holder}" for h in holdings
        ]
        plan = None
        if upto is not None:
            plan = plan_recovery(old_bounds, [h for h in holdings if h.done <= upto])
        return plan or plan_recovery(old_bounds, holdings), answered

    def export_pieces(
        self, plan: RecoveryPlan, holders: list[Member]
    ) -> list[tuple[int, int, list[ray.ObjectRef]]]:
        """Have the chosen holders hand their copies to Ray's object store (owned by us)."""
        by_rank = {m.rank: m for m in holders}
        pieces = []
        for h in plan.pieces:
            ref = by_rank[h.holder].actor.export_piece.remote(h.kind, h.owner, h.done)
            pieces.append((h.lo, h.hi, [ref]))
        ray.get([p[2][0] for p in pieces], timeout=_CONTROL_S)  # fail here, not mid-restore
        return pieces

    def leave(self, members: list[Member]) -> list[Member]:
        """End the epoch on ``members``; returns those that did (the rest are killed).

        A member whose training thread is still busy after ``_LEAVE_S`` is
        killed ("stuck"): its state has already been exported.
        """
        refs = [m.actor.leave_epoch.remote() for m in members]
        ray.wait(refs, num_returns=len(refs), timeout=_LEAVE_S)
        left = []
        for m, ref in zip(members, refs, strict=True):
            ready, _ = ray.wait([ref], timeout=0)
            ok = bool(ready)
            if ok:
                try:
                    ray.get(ref)
                except ray.exceptions.RayError:
                    ok = False
            if ok:
                left.append(m)
            else:
                ray.kill(m.actor, no_restart=True)
                self.events.emit("stuck", worker_id=m.worker_id, rank=m.rank, pid=m.pid)
        return left

    def restore(self, pieces: list[tuple[int, int, list[ray.ObjectRef]]], done: int) -> None:
        self.gather(
            [m.actor.restore_from_pieces.remote(pieces, done) for m in self.members], "restore"
        )

    def kill_all(self) -> None:
        for m in self.members + [m for m, _ in self.pending]:
            ray.kill(m.actor, no_restart=True)
        self.members, self.pending = [], []
