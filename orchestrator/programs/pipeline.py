"""Pipeline parallelism as a training program: ``strategy=pipeline``.

Every member is a ``stage`` (``actors.stage_runtime.StageRuntime``). With
``n`` members and ``strategy.stages = p``, the job runs ``n / p``
data-parallel replicas of a ``p``-stage pipeline; rank ``r * p + s`` is stage
``s`` of replica ``r``. The partition — which contiguous block of the
model's layers each stage owns — is planned every epoch from the layer costs
each member measured on itself (``orchestrator/stage_plan.py``), so a slower
worker gets fewer layers.

State: a stage's layers own a contiguous range of the model's flat vector,
so the program's state is the same ``dp`` space data parallelism shards, cut
at stage boundaries (and each stage's range split among its replicas for
writing and replication). Checkpoints therefore move between pipeline and
data-parallel runs, and between numbers of stages, with no conversion; a lost
stage is restored from its buddy's replica like a lost ZeRO shard.

When failures leave a member count that ``p`` does not divide, the epoch
runs with the largest number of stages that divides it (down to one stage:
plain data parallelism on the stage runtime), and returns to ``p`` stages
when replacements join.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from collectives.flat import split_evenly
from collectives.optim import OptimizerSpec
from collectives.pipeline_schedule import bubble_formula
from orchestrator.program import (
    Capacity,
    RoleSpec,
    StateSpace,
    TrainingProgram,
    WorkItem,
    common_record,
    training_role,
)
from orchestrator.report import human_bytes
from orchestrator.shard_plan import batch_shares
from orchestrator.stage_plan import (
    LayerCost,
    PartitionError,
    StageWorker,
    denoised_costs,
    plan_partition,
    stage_times,
)

RUNTIME = "actors.stage_runtime:StageRuntime"


@dataclass(frozen=True)
class PipelinePlan:
    """One epoch's pipeline: stages x replicas, each stage's layers and flat range."""

    stages: int
    replicas: int
    layer_names: tuple[str, ...]
    layer_bounds: tuple[tuple[int, int], ...]  # per stage, [first, last) layer
    stage_ranges: tuple[tuple[int, int], ...]  # per stage, its flat range
    pieces: tuple[tuple[int, int], ...]  # per rank, its piece of its stage's range
    predicted_s: tuple[float, ...]  # per stage, planned compute seconds per micro-batch
    rank_predicted_s: tuple[float, ...]  # per rank, its stage's layers on its worker
    rank_slowdown: tuple[float, ...]  # per rank, the measured slowdown the plan assumed

    def stage_of(self, rank: int) -> int:
        return rank % self.stages

    def replica_of(self, rank: int) -> int:
        return rank // self.stages

    def layers_of(self, stage: int) -> list[str]:
        a, b = self.layer_bounds[stage]
        return list(self.layer_names[a:b])


def stages_for(members: int, wanted: int) -> int:
    """The most stages, at most ``wanted``, that divide ``members`` into equal replicas."""
    return max(s for s in range(1, min(wanted, members) + 1) if members % s == 0)


# A re-cut must make the slowest stage at least this much faster (by the
# measured speeds) to be worth an epoch change; below it, noise would thrash.
REPLAN_GAIN = 0.15
# Bounds on a worker's measured slowdown against its profile (noise guard).
SLOWDOWN_RANGE = (0.2, 20.0)


class PipelineProgram(TrainingProgram):
    """Stages of one model on actors, under a GPipe or 1F1B schedule, replicated for data."""

    def __init__(self, spec):
        super().__init__(spec)
        self.plan_now: PipelinePlan | None = None
        self._last: dict[str, Any] = {}
        # worker_id -> measured compute time over profiled (1.0: as profiled).
        self._slowdown: dict[int, float] = {}
        self._capacities: list[Capacity] = []
        self._ids: list[int | None] = []
        self._busy: list[float] = []
        self._window = 0
        self._replan = False

    def roles(self) -> list[RoleSpec]:
        return [training_role(self.spec, "stage", RUNTIME)]

    def plan(self, capacities: Sequence[Capacity], numel: int) -> PipelinePlan:
        """Stages that divide the members; layers cut where the slowest stage is fastest."""
        st, t = self.spec.strategy, self.spec.train
        n = len(capacities)
        stages = stages_for(n, st.stages)
        replicas = n // stages
        profiles = [c.profile for c in capacities]
        self._capacities = list(capacities)
        self._ids = [c.worker_id for c in capacities]
        workers = self._stage_workers(stages, replicas)
        partition = plan_partition(
            workers,
            schedule=st.schedule,
            micro_batches=t.micro_batches,
            even=st.partition == "even",
        )
        flat = [tuple(row["flat"]) for row in profiles[0]]
        ranges = tuple((flat[a][0], flat[b - 1][1]) for a, b in partition.bounds)
        pieces = []
        for rank in range(n):
            lo, hi = ranges[rank % stages]
            a, b = split_evenly(hi - lo, replicas)[rank // stages]
            pieces.append((lo + a, lo + b))
        return PipelinePlan(
            stages=stages,
            replicas=replicas,
            layer_names=tuple(row["name"] for row in profiles[0]),
            layer_bounds=partition.bounds,
            stage_ranges=ranges,
            pieces=tuple(pieces),
            predicted_s=partition.stage_s,
            rank_predicted_s=tuple(
                sum(c.compute_s for c in workers[rank % stages][rank // stages].layers[a:b])
                for rank in range(n)
                for a, b in [partition.bounds[rank % stages]]
            ),
            rank_slowdown=tuple(self._slowdown.get(c.worker_id, 1.0) for c in capacities),
        )

    def _stage_workers(self, stages: int, replicas: int) -> list[list[StageWorker]]:
        """The planner's view of the members: profiles scaled by measured slowdowns."""
        times = denoised_costs([[row["compute_s"] for row in c.profile] for c in self._capacities])
        workers = []
        for c, row_times in zip(self._capacities, times, strict=True):
            factor = self._slowdown.get(c.worker_id, 1.0)
            costs = tuple(
                LayerCost(row["name"], t * factor, row["state_bytes"], row["activation_bytes"])
                for row, t in zip(c.profile, row_times, strict=True)
            )
            workers.append(StageWorker(costs, c.available_memory))
        return [[workers[r * stages + s] for r in range(replicas)] for s in range(stages)]

    def setup_args(self, plan: PipelinePlan, rank: int) -> tuple[Any, ...]:
        from actors.stage_runtime import StageSetup

        stage = plan.stage_of(rank)
        setup = StageSetup(
            stage=stage,
            stages=plan.stages,
            replica=plan.replica_of(rank),
            replicas=plan.replicas,
            layer_bounds=plan.layer_bounds,
            owned=plan.stage_ranges[stage],
            pieces=plan.pieces,
            schedule=self.spec.strategy.schedule,
        )
        return (setup, rank)

    def subgroups(self, plan: PipelinePlan) -> dict[str, list[list[int]]]:
        """``pp``: the stages of each replica; ``dp``: the replicas of each stage."""
        p, r = plan.stages, plan.replicas
        return {
            "pp": [[rep * p + s for s in range(p)] for rep in range(r)],
            "dp": [[rep * p + s for rep in range(r)] for s in range(p)],
        }

    def state_spaces(self, plan: PipelinePlan, numel: int) -> list[StateSpace]:
        return [StateSpace("dp", plan.pieces)]

    def begin_epoch(self, plan: PipelinePlan) -> None:
        self.plan_now = plan
        self._busy = [0.0] * (plan.stages * plan.replicas)
        self._window = 0
        self._replan = False
        shares = batch_shares(self.spec.train.global_batch, [1.0] * plan.replicas)
        starts = [sum(shares[:r]) for r in range(plan.replicas)]
        self._rows = [(lo, lo + n) for lo, n in zip(starts, shares, strict=True)]

    def work_items(self, step: int, lr: float) -> list[WorkItem]:
        plan = self.plan_now
        return [
            WorkItem("train_step", (step, lr, *self._rows[plan.replica_of(rank)]))
            for rank in range(plan.stages * plan.replicas)
        ]

    def observe(self, results: list[Any]) -> None:
        """Every ``strategy.rebalance_every`` steps: would a cut to measured speeds be faster?"""
        every = self.spec.strategy.rebalance_every
        if every <= 0 or self.spec.strategy.partition != "auto":
            return
        for r in results:
            self._busy[r.rank] += r.compute_s
        self._window += 1
        if self._window % every == 0:
            micro = min(self.spec.train.micro_batches, min(r.n_samples for r in results))
            self._replan = self._measure_slowdowns(micro * self._window)
            self._busy = [0.0] * len(self._busy)
            self._window = 0

    def _measure_slowdowns(self, micro_batches_run: int) -> bool:
        """Update each worker's slowdown from its busy time; whether a re-cut pays off."""
        plan = self.plan_now
        lo, hi = SLOWDOWN_RANGE
        for rank, busy in enumerate(self._busy):
            predicted = plan.rank_predicted_s[rank] * micro_batches_run
            wid = self._ids[rank]
            if predicted <= 0 or wid is None:
                continue
            # Relative to what the plan assumed (not to the latest estimate): a
            # steady error is then measured once, not compounded every window.
            self._slowdown[wid] = min(hi, max(lo, plan.rank_slowdown[rank] * busy / predicted))
        workers = self._stage_workers(plan.stages, plan.replicas)
        now = max(stage_times(workers, plan.layer_bounds))
        try:
            best = plan_partition(
                workers,
                schedule=self.spec.strategy.schedule,
                micro_batches=self.spec.train.micro_batches,
            )
        except PartitionError:
            return False
        return max(best.stage_s) < (1.0 - REPLAN_GAIN) * now

    def replan_wanted(self) -> bool:
        return self._replan

    def reduce(self, step: int, lr: float, results: list[Any], step_time_s: float) -> dict:
        plan = self.plan_now
        last = [r for r in results if r.stage == plan.stages - 1]
        busy = [0.0] * plan.stages
        activations = [0] * plan.stages
        for r in results:
            busy[r.stage] += r.compute_s / plan.replicas
            activations[r.stage] = max(activations[r.stage], r.peak_activation_bytes)
        span = max(r.span_s for r in results)
        m = min(self.spec.train.micro_batches, min(r.n_samples for r in results))
        record = common_record(step, lr, last, results, step_time_s)
        record.update(
            stage_busy_s=[round(b, 5) for b in busy],
            bubble=round(1.0 - sum(busy) / (plan.stages * span), 4) if span > 0 else 0.0,
            bubble_formula=round(bubble_formula(plan.stages, m), 4),
            activation_bytes=activations,
        )
        self._last = record
        return record

    def eval_items(self) -> list[WorkItem]:
        plan = self.plan_now
        return [WorkItem("evaluate", (self._rows,)) for _ in range(plan.stages * plan.replicas)]

    def member_fields(self, record: dict) -> list[dict[str, Any]]:
        plan = self.plan_now
        return [
            {
                "busy_s": record["compute_s"][rank],
                "activation_mb": round(record["activation_bytes"][plan.stage_of(rank)] / 2**20, 2),
            }
            for rank in range(len(record["compute_s"]))
        ]

    def status_fields(self) -> dict[str, Any]:
        plan, rec = self.plan_now, self._last
        st, m = self.spec.strategy, self.spec.train.micro_batches
        fields: dict[str, Any] = {
            "stages": plan.stages,
            "replicas": plan.replicas,
            "schedule": st.schedule,
            "micro_batches": m,
            "partition": [plan.layers_of(s) for s in range(plan.stages)],
            "stage_busy_s": rec.get("stage_busy_s"),
            "bubble": rec.get("bubble"),
            "bubble_formula": rec.get("bubble_formula"),
            "activation_bytes": rec.get("activation_bytes"),
        }
        summary = [
            f"pipeline    {plan.stages} stages x {plan.replicas} "
            f"replica{'s' if plan.replicas > 1 else ''}, {st.schedule}, "
            f"{m} micro-batches, partition {st.partition}"
        ]
        for s in range(plan.stages):
            busy = rec.get("stage_busy_s") or [0.0] * plan.stages
            act = rec.get("activation_bytes") or [0] * plan.stages
            summary.append(
                f"  stage {s}   {_span(plan.layers_of(s))}: busy {busy[s] * 1000:.1f} ms/step, "
                f"activations {human_bytes(act[s])} at peak"
            )
        if "bubble" in rec:
            summary.append(
                f"  bubble    {rec['bubble']:.0%} measured (idle share of the slowest span), "
                f"{rec['bubble_formula']:.0%} by (p-1)/(m+p-1)"
            )
        fields["summary"] = summary
        return {"program": fields}

    def member_row(self, plan: PipelinePlan, rank: int, numel: int) -> dict[str, Any]:
        stage = plan.stage_of(rank)
        names = plan.layers_of(stage)
        lo, hi = plan.pieces[rank]
        return {
            "stage": stage,
            "replica": plan.replica_of(rank),
            "part": f"stage {stage} ({_span(names)})",
            "shard": [lo, hi],
            "shard_bytes": (hi - lo) * 4 * (1 + self._optimizer_states),
        }

    def min_worker_bytes(self, numel: int) -> int:
        """A stage's parameters, gradients and optimizer state, if the layers split evenly."""
        per_stage = numel / max(1, self.spec.strategy.stages)
        return int(4 * per_stage * (2 + self._optimizer_states))

    @property
    def _optimizer_states(self) -> int:
        t = self.spec.train
        return len(OptimizerSpec(name=t.optimizer, momentum=t.momentum).state_keys())


def _span(names: list[str]) -> str:
    """``blocks.0..blocks.3`` for a stage's layers (one name for one layer)."""
    return names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}"
