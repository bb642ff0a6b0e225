"""The program seam: how a strategy trains, behind one interface the controller drives.

A **program** is *how* a job trains (data parallelism and ZeRO today;
pipeline stages, expert hosts and federated rounds later). The controller
(``orchestrator/controller.py``) is shared and knows no strategy by name: it
starts members, forms epochs, pipelines steps, checkpoints, recovers and
scales, and asks the program for everything strategy-specific:

- ``roles()``: which members the job has (role name, runtime class,
  resources, how many). The first role is the job's **training role**: its
  members form each epoch's process group, run the steps, own the state
  that checkpoints and recovery move, and are what ``cluster.workers``,
  ``shoal scale`` and node drains count. Any further role is a **standing
  role** (expert hosts, federated clients, a gateway): its members stand
  alone (no process group), are set up with ``role_setup_args``, listed in
  the status, and replaced when they die, without ending the epoch;
- ``plan(capacities, numel)``: a pure function from the members' measured
  capacities to a frozen plan value (shard bounds, batch shares, stage
  partition, client sample...);
- ``setup_args(plan, rank)`` and ``subgroups(plan)``: the member's epoch
  set-up, and the named process sub-groups (data-parallel, pipeline,
  expert) built from the epoch's one rendezvous;
- ``begin_epoch(plan)`` and ``work_items(step, lr)``: each step's calls, one
  per member in rank order; ``observe(results)`` and ``reduce(...)``: the
  results folded into the step record;
- ``state_spaces(plan)``: the state it owns, by named space with owner
  ranges, which checkpoints, replication and recovery handle alike.

Programs are found by ``strategy.name`` in ``orchestrator/programs``; adding
one touches no other program's file.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.programs import PROGRAMS
from orchestrator.spec import JobSpec


@dataclass(frozen=True)
class RoleSpec:
    """One kind of member: ``count`` actors each hosting ``runtime`` ("module:Class")."""

    name: str  # "worker" today; "stage", "expert_host", "client", "gateway" later
    runtime: str
    count: int
    cpus: float
    gpus: float
    env_vars: tuple[tuple[str, str], ...] = ()
    # The fewest members the job runs with (None: ``count``). A standing role
    # below it waits for replacements before the job starts.
    min_count: int | None = None
    # The most members it may grow to (None: ``count``): ``shoal scale`` and
    # joins stay within [minimum, maximum].
    max_count: int | None = None
    # A standing role whose members each own a range of a state space (an
    # expert host's experts): they save it with every checkpoint and load it
    # on resume, beside the training role's members.
    saves_state: bool = False
    # Members started beyond the count and kept idle (the training role's
    # elastic.spares): a lost member is replaced by one at once.
    spares: int = 0

    @property
    def minimum(self) -> int:
        return self.count if self.min_count is None else self.min_count

    @property
    def maximum(self) -> int:
        return self.count if self.max_count is None else self.max_count


def training_role(
    spec: JobSpec, name: str, runtime: str, env_vars: tuple[tuple[str, str], ...] = ()
) -> RoleSpec:
    """The job's training role: ``cluster.workers`` members with the cluster's resources each.

    Between ``cluster.min_workers`` and ``cluster.max_workers`` as the job scales.
    """
    cl = spec.cluster
    return RoleSpec(
        name=name,
        runtime=runtime,
        count=cl.workers,
        cpus=cl.cpus_per_worker,
        gpus=cl.gpus_per_worker,
        env_vars=env_vars,
        min_count=cl.min_workers,
        max_count=cl.max_workers,
        spares=spec.elastic.spares if spec.elastic.enabled else 0,
    )


@dataclass(frozen=True)
class Capacity:
    """What a member measured about itself before its epoch: the planner's input."""

    available_memory: int
    node_id: str | None = None
    # The runtime's own measurements from ``probe()["profile"]`` (a pipeline
    # stage's per-layer costs); None when its runtime measures nothing more.
    profile: Any = None
    # The member's id, stable across epochs (its rank is not): lets a program
    # remember what it measured about a member from one epoch to the next.
    worker_id: int | None = None


@dataclass(frozen=True)
class StateSpace:
    """A named piece of training state and which rank owns which range of it."""

    name: str  # "dp", later "stage/2", "expert/1.7", "server"
    # Owner range of each rank; a replicated space has one range, held by all.
    bounds: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class WorkItem:
    """One call on one member: ``method(*args)`` of its runtime."""

    method: str
    args: tuple[Any, ...] = ()


class TrainingProgram(ABC):
    """How a strategy trains; the controller drives it (see the module docstring)."""

    def __init__(self, spec: JobSpec):
        self.spec = spec

    @abstractmethod
    def roles(self) -> list[RoleSpec]:
        """The members this job needs, by role."""

    @abstractmethod
    def plan(self, capacities: Sequence[Capacity], numel: int) -> Any:
        """A frozen plan for members with these capacities (rank order); pure."""

    @abstractmethod
    def setup_args(self, plan: Any, rank: int) -> tuple[Any, ...]:
        """Arguments of rank ``rank``'s ``setup(rendezvous, *args)`` for this epoch."""

    @abstractmethod
    def state_spaces(self, plan: Any, numel: int) -> list[StateSpace]:
        """The state this program owns under ``plan``, by space."""

    @abstractmethod
    def begin_epoch(self, plan: Any) -> None:
        """Reset per-epoch bookkeeping (e.g. batch shares) for a new membership."""

    @abstractmethod
    def work_items(self, step: int, lr: float) -> list[WorkItem]:
        """Step ``step``'s calls, one per member in rank order."""

    @abstractmethod
    def observe(self, results: list[Any]) -> None:
        """Learn from a step's results (e.g. measured throughput) before the next items."""

    @abstractmethod
    def reduce(self, step: int, lr: float, results: list[Any], step_time_s: float) -> dict:
        """The step's metrics record from its results (one per member, rank order)."""

    def role_setup_args(self, role: str, index: int) -> tuple[Any, ...]:
        """Arguments of ``setup(None, *args)`` for member ``index`` of a standing role.

        Standing roles (every role after the first) join no process group,
        hence the ``None`` rendezvous. None by default.
        """
        return ()

    def subgroups(self, plan: Any) -> dict[str, list[list[int]]] | None:
        """Named process sub-groups for this epoch, axis -> a partition of the ranks.

        Built by every member from the epoch's one rendezvous
        (``collectives.process_group.subgroup(axis)``); None: the default group only.
        """
        return None

    def standing_changed(self, role: str, members: Sequence[Any]) -> None:
        """A standing role's seated members changed (one died, or was seated).

        ``members``: its ``Member``s, by slot (``rank``), with their runtime
        ``handle``s, so the program can tell the training role whom to call
        (e.g. the live expert hosts). Nothing by default.
        """
        return None

    def standing_items(self) -> list[tuple[str, int, WorkItem]]:
        """Calls on standing members now, as ``(role, slot, item)``: asked after every change.

        Fire-and-forget instructions between steps (e.g. telling expert hosts
        which peer holds their replica); a member that dies meanwhile is
        found by the liveness checks. None by default.
        """
        return []

    def trained_layout(self, model: Any) -> Any:
        """The ``FlatLayout`` of the ``dp`` state the training role holds, for ``model``.

        The whole model's by default; a program whose training role holds
        only part of the model (the trunk, without the experts) says so.
        Checkpoints record it, and a resume must match it.
        """
        from collectives.flat import FlatLayout

        return FlatLayout.of(model)

    def replan_wanted(self) -> bool:
        """Whether the same members should start a new epoch with a fresh plan now.

        Asked at quiescent step boundaries; True makes the controller move the
        state into a new epoch (as for a join, from live state: no step is
        lost) and call ``plan`` again, e.g. when measured speeds no longer
        fit the plan. False by default.
        """
        return False

    def eval_items(self) -> list[WorkItem] | None:
        """Calls that evaluate the model on the held-out split, one per member (None: cannot)."""
        return None

    def reduce_eval(self, results: list[Any]) -> dict[str, float]:
        """Eval metrics (``eval_loss``; ``accuracy`` or ``perplexity``) from ``eval_items``.

        By default each result is a member's ``Task.evaluate`` sums.
        """
        from actors.task import eval_metrics

        return eval_metrics(results)

    @abstractmethod
    def min_worker_bytes(self, numel: int) -> int:
        """Bytes of training state one member holds at least, for a model of ``numel`` values."""

    def member_fields(self, record: dict) -> list[dict[str, Any]]:
        """Per-rank fields of the status's member rows after a step (none by default)."""
        return []

    def status_fields(self) -> dict[str, Any]:
        """Program fields of the job status after a step (none by default)."""
        return {}

    def member_row(self, plan: Any, rank: int, numel: int) -> dict[str, Any]:
        """What the status shows of rank ``rank``'s share of the state (none by default)."""
        return {}


GATEWAY_ROLE = "gateway"
GATEWAY_RUNTIME = "actors.gateway_actor:GatewayRuntime"


def job_roles(program: TrainingProgram) -> list[RoleSpec]:
    """Every role of a job: the program's, then (``gateway.enabled``) the volunteer gateway.

    The gateway is a standing role of any program: one actor serving
    volunteers over gRPC. The program learns of it through
    ``standing_changed`` and decides what volunteers do.
    """
    roles = program.roles()
    if program.spec.gateway.enabled:
        roles.append(
            RoleSpec(name=GATEWAY_ROLE, runtime=GATEWAY_RUNTIME, count=1, cpus=0.5, gpus=0)
        )
    return roles


def common_record(
    step: int, lr: float, losses: Sequence[Any], results: Sequence[Any], step_time_s: float
) -> dict[str, Any]:
    """The step record's fields every program has, from results with the ``StepResult`` fields.

    ``losses``: the results that carry the step's loss and samples (every
    data-parallel rank; a pipeline's last stages); ``results``: every member's.
    """
    record = {
        "step": step,
        "loss": sum(r.loss_sum for r in losses) / sum(r.n_units for r in losses),
        "lr": lr,
        "grad_norm": results[0].grad_norm,  # the global norm: the same on every rank
        "step_time_s": step_time_s,
        "samples_per_s": sum(r.n_samples for r in losses) / step_time_s,
        "compute_s": [round(r.compute_s, 5) for r in results],
        "comm_wait_s": [round(r.comm_wait_s, 5) for r in results],
        "peak_rss_mb": [round(r.peak_rss / 2**20, 1) for r in results],
    }
    tokens = sum(r.n_tokens for r in losses)
    if tokens:
        record["tokens_per_s"] = tokens / step_time_s
    record["data_wait_s"] = [round(getattr(r, "data_s", 0.0), 5) for r in results]
    io_wait = [getattr(r, "io_wait_s", None) for r in results]
    if any(w is not None for w in io_wait):  # offloaded optimizer state: waits on its tier
        record["offload_wait_s"] = [round(w or 0.0, 5) for w in io_wait]
    return record


def program_for(spec: JobSpec) -> TrainingProgram:
    """The program that runs ``spec.strategy.name``."""
    path = PROGRAMS.get(spec.strategy.name)
    if path is None:
        raise ValueError(f"no training program for strategy {spec.strategy.name!r}")
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)(spec)
