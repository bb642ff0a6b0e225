"""Data parallelism and ZeRO 1-3 as a training program: ``strategy=ddp|zero1|zero2|zero3``.

Every member is a ``worker`` (``actors.dp_runtime.DataParallelRuntime``)
holding a replica (ddp) or a shard (ZeRO) of one flat state vector: the
``dp`` state space. The plan sizes the shards (evenly, by
``strategy.shard_weights``, or by each worker's memory); the batch balancer
splits every global batch among the workers (equally, or by measured
throughput). Each step every worker trains on its share of the batch, and
the record sums their losses and token counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from collectives.optim import OptimizerSpec
from collectives.replication import REPLICA_BUFFERS
from orchestrator.program import (
    Capacity,
    RoleSpec,
    StateSpace,
    TrainingProgram,
    WorkItem,
    common_record,
    training_role,
)
from orchestrator.shard_plan import (
    batch_shares,
    shard_bounds,
    weights_from_memory,
    weights_from_throughput,
)

RUNTIME = "actors.dp_runtime:DataParallelRuntime"
# glibc keeps freed large buffers in its heap, so a worker's RSS would hide
# what sharding saves; with this threshold, buffers of 64 KiB and more are
# mmap-ed and returned to the OS when freed, and RSS tracks what is held
# (cluster.return_freed_memory=true). Every step then pays for fresh pages.
RETURN_FREED_MEMORY_ENV = (("MALLOC_MMAP_THRESHOLD_", "65536"),)


@dataclass(frozen=True)
class DataParallelPlan:
    """One epoch's plan: rank ``r`` owns flat range ``bounds[r]`` (None for ddp: all of it)."""

    world_size: int
    bounds: tuple[tuple[int, int], ...] | None


class BatchBalancer:
    """Per-worker batch shares: equal, or proportional to measured throughput.

    With ``auto``, each window of ``every`` steps measures every rank's
    samples per second of compute (forward + backward, which excludes time
    spent waiting for slower peers) and re-plans the shares for the next
    window. Only how the global batch is split changes, never its content.
    """

    def __init__(self, global_batch: int, workers: int, auto: bool, every: int):
        self.global_batch = global_batch
        self.auto = auto
        self.every = every
        self.shares = batch_shares(global_batch, [1.0] * workers)
        self._samples = [0] * workers
        self._seconds = [0.0] * workers
        self._steps = 0

    def bounds(self) -> list[tuple[int, int]]:
        starts = [sum(self.shares[:r]) for r in range(len(self.shares))]
        return [(lo, lo + n) for lo, n in zip(starts, self.shares, strict=True)]

    def observe(self, results: list[Any]) -> None:
        if not self.auto:
            return
        for r in results:
            self._samples[r.rank] += r.n_samples
            self._seconds[r.rank] += max(r.compute_s, 1e-9)
        self._steps += 1
        if self._steps % self.every == 0:
            rates = [n / s for n, s in zip(self._samples, self._seconds, strict=True)]
            self.shares = batch_shares(self.global_batch, weights_from_throughput(rates))
            self._samples = [0] * len(rates)
            self._seconds = [0.0] * len(rates)


class DataParallelProgram(TrainingProgram):
    """ddp and ZeRO 1-3 over one role of identical data-parallel workers."""

    def __init__(self, spec):
        super().__init__(spec)
        self.balancer: BatchBalancer | None = None

    def roles(self) -> list[RoleSpec]:
        freed = RETURN_FREED_MEMORY_ENV if self.spec.cluster.return_freed_memory else ()
        return [training_role(self.spec, "worker", RUNTIME, freed)]

    def plan(self, capacities: Sequence[Capacity], numel: int) -> DataParallelPlan:
        """Shard ranges from ``strategy.shard_weights`` (ddp: nothing is sharded)."""
        n = len(capacities)
        if self.spec.strategy.name == "ddp":
            return DataParallelPlan(n, None)
        weights = self.spec.strategy.shard_weights
        if weights is None or (weights != "auto" and len(weights) != n):
            # Explicit weights describe the starting membership; after it
            # changes, shards are split evenly.
            weights = [1.0] * n
        elif weights == "auto":
            weights = weights_from_memory([c.available_memory for c in capacities])
        return DataParallelPlan(n, tuple(shard_bounds(numel, list(weights))))

    def setup_args(self, plan: DataParallelPlan, rank: int) -> tuple[Any, ...]:
        return (list(plan.bounds) if plan.bounds is not None else None, rank)

    def state_spaces(self, plan: DataParallelPlan, numel: int) -> list[StateSpace]:
        # Replicated (ddp): one range, which every rank holds as "rank 0"'s.
        return [StateSpace("dp", plan.bounds or ((0, numel),))]

    def begin_epoch(self, plan: DataParallelPlan) -> None:
        t = self.spec.train
        self.balancer = BatchBalancer(
            t.global_batch, plan.world_size, t.balance == "auto", t.balance_every
        )

    def work_items(self, step: int, lr: float) -> list[WorkItem]:
        return [WorkItem("train_step", (step, lr, lo, hi)) for lo, hi in self.balancer.bounds()]

    def observe(self, results: list[Any]) -> None:
        self.balancer.observe(results)

    def reduce(self, step: int, lr: float, results: list[Any], step_time_s: float) -> dict:
        record = common_record(step, lr, results, results, step_time_s)
        record["batch"] = [r.n_samples for r in results]
        return record

    def eval_items(self) -> list[WorkItem]:
        """Every rank evaluates its equal share of each held-out batch (with the same forwards)."""
        t = self.spec.train
        shares = batch_shares(t.global_batch, [1.0] * len(self.balancer.shares))
        bounds = [(sum(shares[:r]), sum(shares[: r + 1])) for r in range(len(shares))]
        return [WorkItem("evaluate", (bounds,)) for _ in bounds]

    def member_fields(self, record: dict) -> list[dict[str, Any]]:
        return [
            {"batch_share": share, "compute_s": compute}
            for share, compute in zip(record["batch"], record["compute_s"], strict=True)
        ]

    def status_fields(self) -> dict[str, Any]:
        return {"batch_shares": list(self.balancer.shares)}

    def min_worker_bytes(self, numel: int) -> int:
        """Parameters, gradients and optimizer state in fp32, each sharded as the stage says.

        State offloaded to NVMe (``offload.optimizer``/``offload.params`` ``nvme``)
        is not memory.
        """
        stage = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3}[self.spec.strategy.name]
        world = self.spec.cluster.workers
        states = len(self._optimizer_spec.state_keys())
        params = numel if stage < 3 else numel / world
        grads = numel if stage < 2 else numel / world
        optimizer = states * (numel if stage < 1 else numel / world)
        # In files: orchestrator/offload_plan.py checks the disk's budget.
        if self.spec.offload.optimizer == "nvme":
            optimizer = 0
        if self.spec.offload.params == "nvme":
            params = grads = 0
        return int(4 * (params + grads + optimizer))

    def member_row(self, plan: DataParallelPlan, rank: int, numel: int) -> dict[str, Any]:
        """The rank's shard, its bytes, and the host memory its replication holds."""
        lo, hi = plan.bounds[rank] if plan.bounds is not None else (0, numel)
        row = {"shard": [lo, hi], "shard_bytes": (hi - lo) * self._bytes_per_element}
        if plan.bounds is not None and self.spec.elastic.enabled:
            # Own snapshots (three with async replication, two with sync) and
            # the two buffers that receive the source rank's (rank - 1) copy.
            src_lo, src_hi = plan.bounds[(rank - 1) % plan.world_size]
            own = 3 if self.spec.elastic.replication == "async" else 2
            elements = own * (hi - lo) + REPLICA_BUFFERS * (src_hi - src_lo)
            row["replica_bytes"] = elements * self._bytes_per_element
        return row

    @property
    def _bytes_per_element(self) -> int:
        """Bytes a shard keeps per flat element: the fp32 parameter and the optimizer's state."""
        return 4 * (1 + len(self._optimizer_spec.state_keys()))

    @property
    def _optimizer_spec(self) -> OptimizerSpec:
        t = self.spec.train
        return OptimizerSpec(name=t.optimizer, momentum=t.momentum)
