"""An in-process member group for driving the controller without Ray.

``InProcessGroup`` has the interface the controller uses of
``orchestrator.worker_group.WorkerGroup`` (spawn, admit, form epochs, call,
gather, recover, leave, remove), but its members are plain objects in this
process: ``ScriptedMember`` answers every runtime call at once, training
steps return made-up losses, and checkpoint shards are real objects in the
job's store (so commits, retention and resume run the real code). A test
scripts what happens (a member lost at step 5, a scale request, a drain, a
cancel) with hooks called before each step; the controller's decisions and
state transitions are what the test checks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Any

import torch

from collectives.ddp import split_evenly
from orchestrator.program import Capacity, RoleSpec, TrainingProgram, WorkItem
from orchestrator.recovery import Holding, RecoveryPlan, StatePlan
from orchestrator.spec import JobSpec
from orchestrator.worker_group import MembershipLost, WorkerError
from storage.checkpoint import snapshot_shard, upload_shard
from storage.object_store import open_store


class MemberLost(Exception):
    """What a scripted member's call "raises" when the member is lost."""


@dataclass(eq=False)
class ScriptedMember:
    """A member: its identity (as ``WorkerGroup.Member``) and a runtime answering at once."""

    worker_id: int
    spec: JobSpec
    role: str = "worker"
    rank: int = -1
    pid: int = 0
    node_id: str | None = "node-a"
    available_memory: int = 1 << 30
    info: dict[str, Any] = field(default_factory=dict)
    bounds: tuple[int, int] = (0, 0)
    applied: int = 0
    lost: bool = False
    numel: int = 0
    uploads: dict[int, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self):
        self.pid = 1000 + self.worker_id
        self.actor = self  # what WorkerGroup.remove kills; here, the member itself

    # -- the runtime's methods ------------------------------------------------

    def begin(self, done: int) -> None:
        self.applied = done

    def train_step(self, step: int, lr: float, lo: int, hi: int) -> SimpleNamespace:
        if self.lost:
            raise MemberLost(f"member {self.worker_id} is gone")
        self.applied = step + 1
        tokens = (hi - lo) * self.spec.seq_len
        return SimpleNamespace(
            rank=self.rank,
            loss_sum=tokens * 5.0 / (1 + step),
            n_units=tokens,
            n_samples=hi - lo,
            n_tokens=tokens,
            grad_norm=1.0,
            compute_s=0.01,
            comm_wait_s=0.0,
            peak_rss=1 << 20,
        )

    def layout_json(self) -> list[dict]:
        return [{"name": "flat", "shape": [self.numel], "offset": 0}]

    def save_shard(self, step: int, save_id: str = "") -> dict[str, float]:
        # A real shard object, so the manifest the controller commits is valid.
        lo, hi = self.bounds
        store = open_store(self.spec.checkpoint.uri)
        param = torch.full((hi - lo,), float(step))
        snapshot = snapshot_shard(self.rank, lo, hi, {"param": param}, save_id=save_id)
        record = upload_shard(store, step, snapshot)
        self.uploads[step] = {"ok": True, "error": None, "record": asdict(record)}
        return {"wait_s": 0.0, "copy_s": 0.0}

    def checkpoint_done(self, step: int, save_id: str | None = None) -> dict[str, Any] | None:
        return self.uploads.pop(step, None)  # the committer checks the record's save id

    def load_checkpoint(self, root_uri: str, manifest_json: str) -> dict[str, Any]:
        import json

        self.applied = json.loads(manifest_json)["step"]
        return {"ok": True, "step": self.applied, "bytes_read": 0, "seconds": 0.0}

    def memory_report(self) -> dict[str, int]:
        return {"params": 0, "grads": 0, "optimizer": 0, "peak_rss": 0}

    def generate(self, prompt: str, tokens: int, temperature: float, seed: int) -> str:
        return prompt + "x" * tokens


class _Handle:
    """``handle.method.remote(*args)`` runs the method now; a lost member returns, not raises."""

    def __init__(self, member: ScriptedMember):
        self._member = member

    def __getattr__(self, name: str):
        method = getattr(self._member, name)

        def run(*args: Any) -> Any:
            try:
                return method(*args)
            except MemberLost as e:
                return e

        return SimpleNamespace(remote=run)


class InProcessGroup:
    """The members of one role, in this process (see the module docstring)."""

    def __init__(
        self,
        spec: JobSpec,
        program: TrainingProgram,
        role: RoleSpec,
        data_ref: Any,
        numel: int,
        events: Any,
        standing: bool = False,
        *,
        holdings_cover: Callable[[], bool] = lambda: True,
    ):
        self.spec, self.program, self.role, self.events = spec, program, role, events
        self.standing = standing
        self.numel = numel
        self.members: list[ScriptedMember] = []
        self.pending: list[tuple[ScriptedMember, None]] = []
        self.plan: Any = None
        self.epoch = 0
        self.target = role.count
        self.spares = role.spares
        self.failures = 0
        self.last_holdings: list[str] = []
        self.removed: list[int] = []
        self.holdings_cover = holdings_cover
        self.before_step: list[Callable[[int], None]] = []
        self._next_id = 0

    # -- membership ---------------------------------------------------------------

    @property
    def actors(self) -> list[_Handle]:
        return [_Handle(m) for m in self.members]

    def spawn(self, n: int) -> None:
        for _ in range(n):
            member = ScriptedMember(self._next_id, self.spec, role=self.role.name)
            self._next_id += 1
            self.pending.append((member, None))

    def admit_ready(self, timeout: float = 0.0, limit: int | None = None) -> list[ScriptedMember]:
        n = len(self.pending) if limit is None else max(0, limit)
        admitted = [m for m, _ in self.pending[:n]]
        for m in admitted:
            m.numel = self.numel  # known once the controller has sized the model
        self.pending = self.pending[n:]
        return admitted

    def standing_by(self) -> list[dict]:
        return [
            {"role": m.role, "worker_id": m.worker_id, "pid": m.pid, "node_id": None}
            for m, _ in self.pending
        ]

    def stand_by(self, members: list[ScriptedMember]) -> None:
        self.pending += [(m, None) for m in members]

    def ready_joiners(self) -> int:
        return len(self.pending)

    def wait_for_members(self, have, minimum, timeout, on_wait) -> list[ScriptedMember]:
        members = list(have) + self.admit_ready(limit=self.target - len(have))
        if len(members) < minimum:
            raise RuntimeError(f"only {len(members)} of {minimum} members")
        return members

    def form_epoch(self, members: list[ScriptedMember]) -> None:
        self.epoch += 1
        for rank, m in enumerate(members):
            m.rank = rank
        self.members = members
        self.plan = self.program.plan([Capacity(m.available_memory) for m in members], self.numel)
        (space,) = self.program.state_spaces(self.plan, self.numel)
        for m in members:
            if len(space.bounds) == len(members):
                m.bounds = space.bounds[m.rank]
            else:  # replicated: the ranks split the writing evenly, as DDPEngine does
                m.bounds = split_evenly(self.numel, len(members))[m.rank]
            m.info = {"device": "cpu", "node_ip": "127.0.0.1", "host": "test"}

    # -- standing roles ------------------------------------------------------------

    def seat(self, members: list[ScriptedMember]) -> list[ScriptedMember]:
        """Free slots for ``members``, set up with the program's arguments for the role."""
        taken = {m.rank for m in self.members}
        free = (slot for slot in range(len(taken) + len(members)) if slot not in taken)
        for m in members:
            m.rank = next(free)
            m.info = {"setup": self.program.role_setup_args(self.role.name, m.rank)}
        self.members = sorted(self.members + members, key=lambda m: m.rank)
        return members

    def lost_members(self) -> list[ScriptedMember]:
        lost = [m for m in self.members if m.lost]
        self.members = [m for m in self.members if not m.lost]
        return lost

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                **m.info,
                "role": m.role,
                "worker_id": m.worker_id,
                "rank": m.rank,
                "pid": m.pid,
                **(
                    {"standing": True}
                    if self.standing
                    else self.program.member_row(self.plan, m.rank, self.numel)
                ),
            }
            for m in self.members
        ]

    # -- calls ---------------------------------------------------------------------

    def call(self, method: str, *args: Any) -> list[Any]:
        return [getattr(h, method).remote(*args) for h in self.actors]

    def call_items(self, items: list[WorkItem]) -> list[Any]:
        if items and items[0].method == "train_step":
            for hook in self.before_step:
                hook(items[0].args[0])
        return [
            getattr(h, item.method).remote(*item.args)
            for h, item in zip(self.actors, items, strict=True)
        ]

    def ask_first(self, method: str, *args: Any) -> Any:
        return getattr(self.members[0], method)(*args)

    def ask_all(self, method: str, *args: Any) -> list[Any]:
        return [getattr(m, method)(*args) for m in self.members]

    @staticmethod
    def get(values: list[Any], timeout: float | None = None) -> list[Any]:
        return list(values)

    def gather(self, results: list[Any], what: str, timeout: float | None = None) -> list[Any]:
        """Results in rank order; a lost member's result ends the epoch (``MembershipLost``)."""
        dead = [m for m, r in zip(self.members, results, strict=True) if isinstance(r, MemberLost)]
        if dead:
            error = WorkerError(dead[0].rank, dead[0].pid, what, MemberLost("lost"))
            raise MembershipLost(what, dead, error, "process died (scripted)")
        return results

    def remove(self, members: list[ScriptedMember]) -> None:
        self.removed += [m.worker_id for m in members]

    def kill_all(self, goodbye_s: float = 0.0) -> None:
        self.remove(self.members + [m for m, _ in self.pending])
        self.members, self.pending = [], []

    # -- recovery --------------------------------------------------------------------

    def collect_plan(self, survivors, upto=None) -> tuple[StatePlan | None, list]:
        """The survivors' copies cover step ``upto`` (as buddies' would) if the script says so."""
        if not self.holdings_cover():
            return None, survivors
        done = upto if upto is not None else max(m.applied for m in survivors)
        by_space = {}
        for space in self.program.state_spaces(self.plan, self.numel):
            pieces = tuple(
                Holding(survivors[0].rank, owner, done, "replica", lo, hi, space.name)
                for owner, (lo, hi) in enumerate(space.bounds)
            )
            by_space[space.name] = RecoveryPlan(done, pieces, space.name)
        return StatePlan(done, by_space), survivors

    def export_pieces(self, plan: StatePlan, holders) -> dict[str, list[tuple[int, int, list]]]:
        return {
            space: [(h.lo, h.hi, [None]) for h in p.pieces] for space, p in plan.by_space.items()
        }

    def leave(self, members: list[ScriptedMember]) -> list[ScriptedMember]:
        return list(members)

    def restore(self, pieces, done: int) -> None:
        for m in self.members:
            m.applied = done
