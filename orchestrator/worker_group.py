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

A group holds the members of one role. The job's training role (the
program's first) has epochs as above. A **standing** role's members (expert
hosts, federated clients) stand alone: each takes a slot (``rank`` is the
slot, 0..count-1), is set up without a rendezvous (``seat``), and when one
dies (``lost_members``, found without waiting) a replacement takes its slot;
nothing else stops.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

import ray

from actors.member import MemberActor, RuntimeHandle, load_runtime
from collectives.errors import PeerLostError
from collectives.process_group import Rendezvous, default_backend
from orchestrator.capacity_book import file_request
from orchestrator.constants import CONTROL_S, LEAVE_S, POLL_S, SETTLE_S
from orchestrator.events import EventLog
from orchestrator.policies import order_for_buddies
from orchestrator.program import Capacity, RoleSpec, TrainingProgram, WorkItem
from orchestrator.recovery import Holding, StatePlan, plan_recovery_spaces
from orchestrator.spec import JobSpec

# (job id, role) -> the bundles that role wants, for the job's one autoscaler request.
_WANTED: dict[tuple[str, str], list[dict[str, float]]] = {}


def job_bundles(job_id: str) -> list[dict[str, float]]:
    """Every role's bundles of job ``job_id`` that this controller process wants."""
    return [b for (job, _), wanted in _WANTED.items() if job == job_id for b in wanted]


def withdraw_capacity(spec: JobSpec) -> None:
    """The job is over: its request leaves the cluster's book (an embedded Ray has none)."""
    for key in [k for k in _WANTED if k[0] == spec.job_id]:
        del _WANTED[key]
    if spec.cluster.address is not None:
        file_request(spec.job_id, [])


@dataclass
class Member:
    """A member actor of one role; ``rank`` is its rank in the current epoch.

    ``actor`` is the Ray actor (to kill it); ``handle`` calls its runtime's methods.
    """

    worker_id: int
    actor: Any
    handle: RuntimeHandle
    role: str
    pid: int | None = None
    available_memory: int = 0
    node_id: str | None = None  # Ray's node id (hex), known once placed
    # What the runtime measured about itself for the planner (a program's own
    # format, e.g. a pipeline stage's per-layer costs); None if nothing.
    profile: Any = None
    rank: int = -1
    info: dict[str, Any] = field(default_factory=dict)


def _info_dict(info: Any) -> dict[str, Any]:
    """What a runtime's ``setup`` says about itself (a dataclass or a dict), for the status."""
    return asdict(info) if is_dataclass(info) else dict(info or {})


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
    """Whether a member's error only reports that a peer went away (by type, not by message).

    A dead actor is lost; a live one that raised ``PeerLostError`` survived
    a peer's loss (its runtime classified the error where it was raised).
    Anything else is the member's own failure: a bug that a retry would repeat.
    """
    if isinstance(cause, ray.exceptions.ActorDiedError | ray.exceptions.ActorUnavailableError):
        return True
    return isinstance(cause, PeerLostError) or isinstance(
        getattr(cause, "cause", None), PeerLostError
    )


class WorkerGroup:
    """The members of one role: spawns them, forms epochs, gathers results, recovers losses.

    What each member runs and how its epoch is planned come from the
    program (``orchestrator/program.py``); the group only carries it out.
    """

    def __init__(
        self,
        spec: JobSpec,
        program: TrainingProgram,
        role: RoleSpec,
        data_ref: ray.ObjectRef,
        numel: int,
        events: EventLog,
        standing: bool = False,
    ):
        self.spec = spec
        self.program = program
        self.role = role
        self.standing = standing
        runtime = load_runtime(role.runtime)
        self._control_methods = frozenset(runtime.CONTROL_METHODS)
        self._serve_methods = frozenset(getattr(runtime, "SERVE_METHODS", ()))
        self._data_ref = data_ref
        self.numel = numel
        self.events = events
        self.members: list[Member] = []
        self.pending: list[tuple[Member, ray.ObjectRef]] = []
        self.plan: Any = None  # the program's plan for the current epoch
        self.epoch = 0
        self.target = role.count
        self.spares = role.spares  # started beyond the target, idle until one is needed
        self.failures = 0
        self.last_holdings: list[str] = []  # what the survivors held at the last recovery
        self._next_id = 0
        self._pings: dict[int, ray.ObjectRef] = {}  # standing: worker_id -> alive() in flight

    # -- spawning ------------------------------------------------------------

    @property
    def actors(self) -> list[RuntimeHandle]:
        """The current members' runtimes, in rank order."""
        return [m.handle for m in self.members]

    def spawn(self, n: int) -> None:
        """Ask Ray for ``n`` more members; they join once placed (see ``admit_ready``)."""
        role = self.role
        env = {"env_vars": dict(role.env_vars)} if role.env_vars else None
        for _ in range(n):
            wid = self._next_id
            self._next_id += 1
            actor = MemberActor.options(
                num_cpus=role.cpus,
                num_gpus=role.gpus,
                name=f"shoal-{self.spec.job_id}-{role.name}{wid}",
                runtime_env=env,
            ).remote(role.runtime, self.spec, wid, self._data_ref, role=role.name)
            handle = RuntimeHandle(actor, self._control_methods, self._serve_methods)
            self.pending.append((Member(wid, actor, handle, role.name), handle.probe.remote()))
        self._request_capacity()

    def _request_capacity(self) -> None:
        """Tell Ray's autoscaler how many member-sized bundles the job wants, all roles together
        (through the cluster's ``CapacityBook``, which adds up every job's request)."""
        bundle = {"CPU": self.role.cpus}
        if self.role.gpus:
            bundle["GPU"] = self.role.gpus
        _WANTED[(self.spec.job_id, self.role.name)] = [bundle] * (self.target + self.spares)
        if self.spec.cluster.address is None:
            return  # an embedded local Ray: no autoscaler can add nodes to it
        file_request(self.spec.job_id, job_bundles(self.spec.job_id))

    def admit_ready(self, timeout: float = 0.0, limit: int | None = None) -> list[Member]:
        """Pending workers that Ray has placed and started (waiting up to ``timeout`` for
        ``limit`` of them, or all); at most ``limit``, the rest stay pending (spares)."""
        if not self.pending or (limit is not None and limit <= 0):
            return []
        refs = [ref for _, ref in self.pending]
        want = len(refs) if limit is None else min(limit, len(refs))
        ready, _ = ray.wait(refs, num_returns=want, timeout=timeout)
        ready = set(ready) if limit is None else set(_ready_now(refs)[:limit])
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
            member.profile = probe.get("profile")
            admitted.append(member)
        self.pending = still
        return admitted

    def standing_by(self) -> list[dict[str, Any]]:
        """Status rows of the pending members Ray has placed and started (spares, and
        joiners not admitted yet); their probes are read once."""
        if not self.pending:
            return []
        ready = set(_ready_now([ref for _, ref in self.pending]))
        rows = []
        for m, ref in self.pending:
            if ref not in ready:
                continue
            if m.pid is None:
                try:
                    probe = ray.get(ref)
                except ray.exceptions.RayError:
                    continue  # died before joining: admit_ready forgets it
                m.pid, m.node_id = probe["pid"], probe.get("node_id")
            rows.append(
                {"role": m.role, "worker_id": m.worker_id, "pid": m.pid, "node_id": m.node_id}
            )
        return rows

    def stand_by(self, members: list[Member]) -> None:
        """Put admitted members back among the pending, placed and idle (spares)."""
        for m in members:
            probe = {
                "pid": m.pid,
                "available_memory": m.available_memory,
                "node_id": m.node_id,
                "profile": m.profile,
            }
            self.pending.append((m, ray.put(probe)))

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
                timeout=min(POLL_S * 4, max(0.0, deadline - time.monotonic())),
                limit=self.target - len(members),
            )
            if time.monotonic() > deadline and len(members) < minimum:
                role, free = self.role, ray.available_resources()
                needed = (
                    f"{role.name} members needed"
                    if self.standing
                    else "workers needed (cluster.min_workers)"
                )
                lower = "the role's size" if self.standing else "cluster.min_workers"
                raise RuntimeError(
                    f"only {len(members)} of the {minimum} {needed} could be placed within "
                    f"{timeout:g}s, each needing {role.cpus:g} CPU and {role.gpus:g} GPU (free "
                    f"now: {free.get('CPU', 0):g} CPU, {free.get('GPU', 0):g} GPU). Add nodes, "
                    f"or lower {lower} or the per-member resources."
                )
        return members

    # -- epochs --------------------------------------------------------------

    def form_epoch(self, members: list[Member]) -> None:
        """Give ``members`` ranks, have the program plan the epoch, and form the process group."""
        self.epoch += 1
        # Neighbouring ranks on different nodes: each rank's buddy (the next
        # rank) then holds its replica on another node whenever one exists.
        members = [members[i] for i in order_for_buddies([m.node_id for m in members])]
        for rank, m in enumerate(members):
            m.rank = rank
        self.members = members
        capacities = [
            Capacity(m.available_memory, m.node_id, m.profile, m.worker_id) for m in members
        ]
        self.plan = self.program.plan(capacities, self.numel)
        cl = self.spec.cluster
        host, port = ray.get(
            members[0].handle.host_rendezvous.remote(len(members)), timeout=CONTROL_S
        )
        rdzv = Rendezvous(
            host,
            port,
            len(members),
            default_backend(cl.gpus_per_worker > 0),
            cl.collective_timeout_s,
            subgroups=self.program.subgroups(self.plan),
            epoch=self.epoch,
        )
        infos = self.gather(
            [
                m.handle.setup.remote(rdzv, *self.program.setup_args(self.plan, m.rank))
                for m in members
            ],
            "setup",
            timeout=cl.collective_timeout_s,
        )
        for m, info in zip(members, infos, strict=True):
            m.info = _info_dict(info)

    # -- standing roles ------------------------------------------------------

    def seat(self, members: list[Member]) -> list[Member]:
        """Standing role: give ``members`` the free slots and set each up alone.

        Returns those now seated; one that died on the way is dropped (its
        slot stays free for the next replacement). One that raised fails
        the job: a set-up error would repeat.
        """
        taken = {m.rank for m in self.members}
        free = (slot for slot in itertools.count() if slot not in taken)
        for m in members:
            m.rank = next(free)
        program, name = self.program, self.role.name
        refs = [
            m.handle.setup.remote(None, *program.role_setup_args(name, m.rank)) for m in members
        ]
        ray.wait(refs, num_returns=len(refs), timeout=self.spec.cluster.collective_timeout_s)
        seated = []
        for m, ref in zip(members, refs, strict=True):
            try:
                m.info = _info_dict(ray.get(ref, timeout=0))
            except (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError):
                self.events.emit("died", role=name, worker_id=m.worker_id, pid=m.pid)
                continue
            except ray.exceptions.GetTimeoutError:  # hung in set-up: replaced like a dead one
                ray.kill(m.actor, no_restart=True)
                self.events.emit("stuck", role=name, worker_id=m.worker_id, pid=m.pid)
                continue
            except ray.exceptions.RayTaskError as e:
                raise WorkerError(m.rank, m.pid, f"{name} setup", e) from None
            seated.append(m)
        self.members = sorted(self.members + seated, key=lambda m: m.rank)
        return seated

    def lost_members(self) -> list[Member]:
        """Standing members found dead, without waiting; they leave the group.

        Every member has one ``alive()`` call in flight (answered on its
        control thread, so a busy member still answers); a finished call is
        renewed, a failed one means the actor is gone.
        """
        for m in self.members:
            if m.worker_id not in self._pings:
                self._pings[m.worker_id] = m.actor.alive.remote()
        refs = list(self._pings.values())
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        lost = []
        for m in self.members:
            ref = self._pings.get(m.worker_id)
            if ref is None or ref not in ready:
                continue
            del self._pings[m.worker_id]
            try:
                ray.get(ref, timeout=0)
            except ray.exceptions.RayError:
                lost.append(m)
        self.members = [m for m in self.members if m not in lost]
        return lost

    def describe(self) -> list[dict[str, Any]]:
        """Membership for the status: role, worker, rank, node, pid and the program's share."""
        rows = []
        for m in self.members:
            row = dict(m.info)
            if self.standing:  # a slot: no share of the epoch's plan
                share = {"standing": True}
            else:
                share = self.program.member_row(self.plan, m.rank, self.numel)
            row.update(
                role=m.role,
                worker_id=m.worker_id,
                rank=m.rank,
                pid=m.pid,
                node_id=m.node_id,
                **share,
            )
            rows.append(row)
        return rows

    # -- calls and failures --------------------------------------------------

    def call(self, method: str, *args: Any) -> list[ray.ObjectRef]:
        """Call ``method(*args)`` on every member's runtime (rank order); gather the result."""
        return [getattr(m.handle, method).remote(*args) for m in self.members]

    def call_items(self, items: list[WorkItem]) -> list[ray.ObjectRef]:
        """One work item per member, in rank order."""
        return [
            getattr(m.handle, item.method).remote(*item.args)
            for m, item in zip(self.members, items, strict=True)
        ]

    def ask_first(self, method: str, *args: Any) -> Any:
        """The result of ``method(*args)`` on rank 0 (a query every rank would answer alike)."""
        return ray.get(getattr(self.members[0].handle, method).remote(*args), timeout=CONTROL_S)

    def ask_all(self, method: str, *args: Any) -> list[Any]:
        """Results of a query on every member, in rank order (no collectives: bounded)."""
        return ray.get(self.call(method, *args), timeout=CONTROL_S)

    def remove(self, members: list[Member]) -> None:
        """Stop these members' actors (they leave the job)."""
        for m in members:
            ray.kill(m.actor, no_restart=True)

    @staticmethod
    def get(refs: list[ray.ObjectRef], timeout: float | None = None) -> list[Any]:
        """Fetch results of calls made through this group (for the checkpoint committer)."""
        return ray.get(refs, timeout=timeout)

    def gather(self, refs: list[ray.ObjectRef], what: str, timeout: float | None = None) -> list:
        """Results of one call per member (in rank order).

        The first error stops the wait. A worker that raised something other
        than a lost-peer error (a bug, bad data) raises ``WorkerError`` at once:
        retrying would fail again. Otherwise, with elasticity on, the other
        calls are given ``SETTLE_S`` to end and ``MembershipLost`` names the
        workers that are gone. Calls still running after ``timeout`` seconds
        (stragglers) count as lost.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
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
        ray.wait(refs, num_returns=len(refs), timeout=SETTLE_S)
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
    ) -> tuple[StatePlan | None, list[Member]]:
        """Ask ``survivors`` what they hold and plan where each state space comes from.

        Returns the plan (None: no complete state in memory) and the
        survivors that answered (one that fails to answer is treated as lost).
        ``upto``: prefer the newest step not after it, when the copies cover one.
        """
        answered, holdings = [], []
        for m, ref in [(m, m.handle.holdings.remote()) for m in survivors]:
            try:
                rows = ray.get(ref, timeout=CONTROL_S)
            except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
                ray.kill(m.actor, no_restart=True)
                self.events.emit("died", worker_id=m.worker_id, rank=m.rank, pid=m.pid)
                continue
            answered.append(m)
            holdings += [Holding(**row) for row in rows]
        spaces = self.program.state_spaces(self.plan, self.numel)
        self.last_holdings = [
            f"{h.kind} of rank {h.owner}'s {h.space} at step {h.done} on rank {h.holder}"
            for h in holdings
        ]
        bounds = {s.name: list(s.bounds) for s in spaces}
        return plan_recovery_spaces(bounds, holdings, upto=upto), answered

    def export_pieces(
        self, plan: StatePlan, holders: list[Member]
    ) -> dict[str, list[tuple[int, int, list[ray.ObjectRef]]]] | None:
        """Have the chosen holders hand their copies to Ray's object store (owned by us).

        Returns, per state space, ``(lo, hi, [ref])`` pieces covering it. None
        if a holder died or timed out meanwhile: the state must then come from
        the checkpoint.
        """
        by_rank = {m.rank: m for m in holders}
        pieces: dict[str, list[tuple[int, int, list[ray.ObjectRef]]]] = {}
        for space, space_plan in plan.by_space.items():
            pieces[space] = []
            for h in space_plan.pieces:
                handle = by_rank[h.holder].handle
                ref = handle.export_piece.remote(h.kind, h.owner, h.done, space)
                pieces[space].append((h.lo, h.hi, [ref]))
        refs = [ref for space_pieces in pieces.values() for _, _, (ref,) in space_pieces]
        try:
            ray.get(refs, timeout=CONTROL_S)  # fail here, not mid-restore
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            return None
        return pieces

    def leave(self, members: list[Member]) -> list[Member]:
        """End the epoch on ``members``; returns those that did (the rest are killed).

        A member whose training thread is still busy after ``LEAVE_S`` is
        killed ("stuck"): its state has already been exported.
        """
        refs = [m.handle.leave_epoch.remote() for m in members]
        ray.wait(refs, num_returns=len(refs), timeout=LEAVE_S)
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

    def restore(
        self, pieces: dict[str, list[tuple[int, int, list[ray.ObjectRef]]]], done: int
    ) -> None:
        """Every member loads its space's state of step ``done`` from the exported pieces."""
        self.gather(
            [m.handle.restore_from_pieces.remote(pieces, done) for m in self.members],
            "restore",
            timeout=CONTROL_S,
        )

    def kill_all(self, goodbye_s: float = 0.0) -> None:
        """Kill every member; with ``goodbye_s``, first let the seated ones run their runtime's
        ``shutdown`` (``MemberActor.goodbye``) for up to that long."""
        if goodbye_s > 0 and self.members:
            refs = [m.actor.goodbye.remote() for m in self.members]
            ray.wait(refs, num_returns=len(refs), timeout=goodbye_s)
        for m in self.members + [m for m, _ in self.pending]:
            ray.kill(m.actor, no_restart=True)
        self.members, self.pending = [], []


def _ready_now(refs: list[ray.ObjectRef]) -> list[ray.ObjectRef]:
    """Those of ``refs`` that are ready now, in their order (ray.wait's order is its own)."""
    ready = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0])
    return [r for r in refs if r in ready]
