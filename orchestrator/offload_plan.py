"""Where each kind of training state lives, per worker, and whether it fits: a pure function.

:func:`plan_offload` takes the model's size, the strategy's sharding, the
``offload`` config and the worker's budgets (memory, free disk) and returns
an :class:`OffloadPlan`: a row per kind of state (parameters, gradients,
optimizer state) naming its place and bytes, and the bytes each tier holds
against its budget. A plan in which some tier is over budget raises
:class:`OffloadPlanError` naming what does not fit and the budget it exceeds.
``shoal run`` prints the plan before training starts (``OffloadPlan.lines``).

Bytes are per worker, fp32, for the largest shard (even shards unless
``strategy.shard_weights`` says otherwise, which only makes one worker's
shard larger: the planner takes the even split, and the tiers enforce the
budgets again on each worker with its real shard). Activations and
communication buffers come on top, as in ``preflight.check_memory``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from orchestrator.schema import params_leave_worker
from orchestrator.spec import ConfigError
from storage.tiers import chunk_numel_for, human

STAGE = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3}


class OffloadPlanError(ConfigError):
    """The model does not fit even with the configured offload; names what and which budget."""


@dataclass(frozen=True)
class Budgets:
    """What one worker may use; ``None``: unknown here (a remote cluster's machines)."""

    memory: int | None  # the training device's memory (host memory on a CPU worker)
    host: int | None  # host memory (the same pool as ``memory`` on a CPU worker)
    disk: int | None  # free bytes at offload.nvme_path


@dataclass(frozen=True)
class Placement:
    kind: str  # "parameters", "gradients", "optimizer state"
    where: str  # "device", "host", "nvme"
    nbytes: int
    note: str = ""


@dataclass(frozen=True)
class OffloadPlan:
    strategy: str
    workers: int
    device: str  # "cpu" or "cuda"
    placements: list[Placement]
    staging_bytes: int  # host buffers for chunks in flight (nvme)
    chunk_bytes: int
    prefetch: int
    nvme_path: str | None
    tiers: dict[str, tuple[int, int | None, str]] = field(default_factory=dict)  # held, cap, name

    def lines(self) -> list[str]:
        """The report printed before training starts."""
        head = (
            f"offload: per worker ({self.workers} x strategy={self.strategy}, "
            f"{'GPU' if self.device == 'cuda' else 'CPU'} workers):"
        )
        out = [head]
        for p in self.placements:
            where = _where(p.where, self.device, self.nvme_path)
            extra = ""
            if p.kind == "optimizer state" and p.where in ("host", "nvme"):
                extra = f", streamed in {human(self.chunk_bytes)} chunks, {self.prefetch} ahead"
            note = f" ({p.note})" if p.note else ""
            out.append(f"  {p.kind:<16} {where}{note}: {human(p.nbytes)}{extra}")
        for name, (held, cap, budget) in self.tiers.items():
            limit = f"of {human(cap)} ({budget})" if cap is not None else f"({budget})"
            out.append(f"  {name:<16} holds {human(held)} {limit}")
        return out


def _where(where: str, device: str, nvme_path: str | None) -> str:
    if where == "nvme":
        return f"NVMe files under {nvme_path}"
    if where == "host" or device == "cpu":
        return "host memory"
    return "GPU memory"


def plan_offload(
    *,
    numel: int,
    strategy: str,
    workers: int,
    n_states: int,
    device: str,
    optimizer: str = "none",
    params: str = "none",
    nvme_path: str | None = None,
    host_bytes: int = 0,
    nvme_bytes: int = 0,
    chunk_mb: float = 16.0,
    prefetch: int = 1,
    budgets: Budgets | None = None,
    replica_elements: int = 0,
) -> OffloadPlan:
    """The placement of one worker's state; raises ``OffloadPlanError`` when it cannot fit."""
    budgets = budgets or Budgets(None, None, None)
    stage = STAGE[strategy]
    shard = -(-numel // workers)
    b = 4  # fp32 bytes per element
    param_bytes = b * (numel if stage < 3 else shard)
    grad_bytes = b * (numel if stage < 2 else shard)
    state_bytes = b * n_states * (numel if stage < 1 else shard)
    chunk_bytes = chunk_numel_for(chunk_mb) * b

    # Parameters go to their tier with their gradients (ZeRO-3 only, spec.py checks).
    moved = params_leave_worker(params, on_gpu=device == "cuda")
    where = params if moved else "device"
    if moved:
        note = "with their gradients; one block gathered at a time, read ahead"
    else:
        note = "CPU worker: already there" if params == "host" else ""
    placements = [
        Placement("parameters", where, param_bytes, note),
        Placement("gradients", where, grad_bytes),
    ]
    placements.append(
        Placement("optimizer state", "device" if optimizer == "none" else optimizer, state_bytes)
    )
    if replica_elements:
        # Buddy replication (elastic) copies shards of parameters and state into
        # host memory, read from the tiers chunk by chunk but held whole.
        placements.append(
            Placement(
                "buddy replicas",
                "host",
                b * replica_elements * (1 + n_states),
                "elastic: own snapshots and a buddy's copy; elastic.enabled=false drops them",
            )
        )
    staging = 0
    streamed = (n_states if optimizer == "nvme" else 0) + (2 if params == "nvme" else 0)
    if streamed:
        # Chunks read ahead, the one updated, and the writes behind it, per tensor
        # streamed from NVMe (no more than the shard has chunks).
        chunks = -(-b * (numel if stage < 1 else shard) // chunk_bytes)
        staging = min(prefetch + 2, max(1, chunks)) * streamed * chunk_bytes
    plan = OffloadPlan(
        strategy, workers, device, placements, staging, chunk_bytes, prefetch, nvme_path
    )

    held = {"device": 0, "host": 0, "nvme": 0}
    for p in placements:
        held[p.where] += p.nbytes
    held["host"] += staging
    if device == "cpu":  # one pool: the device's memory is host memory
        held["host"] += held.pop("device")
    tiers: dict[str, tuple[int, int | None, str]] = {}
    if device == "cuda":
        tiers["GPU memory"] = _fit(
            "GPU memory", held["device"], budgets.memory, "the worker's free GPU memory", plan
        )
    host_cap, host_name = _cap(host_bytes, budgets.host, "offload.host_bytes", "available memory")
    tiers["host memory"] = _fit("host memory", held["host"], host_cap, host_name, plan)
    if "nvme" in (optimizer, params):
        disk_cap, disk_name = _cap(
            nvme_bytes, budgets.disk, "offload.nvme_bytes", f"free space at {nvme_path}"
        )
        tiers["NVMe"] = _fit("NVMe", held["nvme"], disk_cap, disk_name, plan)
    return dataclasses.replace(plan, tiers=tiers)


def _cap(configured: int, measured: int | None, field_name: str, what: str) -> tuple:
    """The tighter of a configured budget (0: none) and what the machine has (None: unknown)."""
    if configured and (measured is None or configured <= measured):
        return configured, f"{field_name}={configured}"
    if measured is not None:
        return measured, what + (f"; {field_name} is no tighter" if configured else "")
    return None, f"{what}: unknown here; {field_name}: no limit"


def _fit(tier: str, held: int, cap: int | None, budget: str, plan: OffloadPlan):
    if cap is not None and held > cap:
        what = [f"{p.kind} {human(p.nbytes)}" for p in plan.placements if _tier_of(p, plan) == tier]
        if tier == "host memory" and plan.staging_bytes:
            what.append(f"NVMe staging buffers {human(plan.staging_bytes)}")
        raise OffloadPlanError(
            f"offload: the model does not fit even with offload: {tier} would hold "
            f"{human(held)} per worker ({', '.join(what)}) and {budget} allows {human(cap)}. "
            + _advice(tier)
        )
    return held, cap, budget


def _tier_of(p: Placement, plan: OffloadPlan) -> str:
    if p.where == "nvme":
        return "NVMe"
    if p.where == "host" or plan.device == "cpu":
        return "host memory"
    return "GPU memory"


def _advice(tier: str) -> str:
    if tier == "NVMe":
        return "Raise offload.nvme_bytes, free disk space, or use more workers (ZeRO shards)"
    return (
        "Use offload.optimizer=nvme (with offload.nvme_path), strategy=zero3, more workers, "
        "or a smaller model"
    )


def offload_enabled(spec) -> bool:
    return spec.offload.optimizer != "none" or spec.offload.params != "none"


def plan_for_job(spec, numel: int, budgets: Budgets | None = None) -> OffloadPlan:
    """:func:`plan_offload` for a job spec (``spec.offload``, its strategy and optimizer)."""
    from collectives.optim import OptimizerSpec
    from collectives.replication import REPLICA_BUFFERS

    o, t = spec.offload, spec.train
    workers = spec.cluster.workers
    replicas = 0
    if spec.elastic.enabled and STAGE[spec.strategy.name] >= 1 and workers > 1:
        # As DataParallelProgram.member_row counts them: own snapshots and the
        # buffers that receive the buddy's copy, each a shard.
        own = 3 if spec.elastic.replication == "async" else 2
        replicas = (own + REPLICA_BUFFERS) * -(-numel // workers)
    return plan_offload(
        numel=numel,
        strategy=spec.strategy.name,
        workers=workers,
        n_states=len(OptimizerSpec(name=t.optimizer, momentum=t.momentum).state_keys()),
        device="cuda" if spec.cluster.gpus_per_worker > 0 else "cpu",
        optimizer=o.optimizer,
        params=o.params,
        nvme_path=o.nvme_path,
        host_bytes=o.host_bytes,
        nvme_bytes=o.nvme_bytes,
        chunk_mb=o.chunk_mb,
        prefetch=o.prefetch,
        budgets=budgets,
        replica_elements=replicas,
    )
