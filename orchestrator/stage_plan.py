"""Pipeline partitioning: which contiguous block of layers each stage owns. Pure functions.

The input is a cost table measured on the workers themselves (each worker
times every layer's forward and backward on one micro-batch, and counts the
bytes it keeps: see ``actors/stage_runtime.py``), so a slower worker's table
simply has larger entries. The planner chooses the stage boundaries that
minimise the slowest stage's time, subject to every stage's memory fitting
its workers. A stage with several data-parallel replicas runs at the pace of
its slowest replica and must fit the smallest.

Dynamic programming over (stage, first layer): ``O(stages * layers^2)``
evaluations, each O(1) with prefix sums: a few milliseconds for hundreds of
layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


class PartitionError(ValueError):
    """No partition fits; the message names the layer that does not."""


@dataclass(frozen=True)
class LayerCost:
    """One layer as one worker measured it, for one micro-batch."""

    name: str
    compute_s: float  # forward + backward
    state_bytes: int  # parameters, gradients and optimizer state
    activation_bytes: int  # kept from the forward for the backward, per micro-batch


@dataclass(frozen=True)
class StageWorker:
    """A worker as the planner sees it: its measured layer costs and its memory budget."""

    layers: tuple[LayerCost, ...]
    memory_bytes: int


@dataclass(frozen=True)
class Partition:
    """Stage ``s`` owns layers ``[bounds[s][0], bounds[s][1])``; its predicted time per step."""

    bounds: tuple[tuple[int, int], ...]
    stage_s: tuple[float, ...]  # predicted compute seconds per micro-batch, per stage

    @property
    def imbalance(self) -> float:
        """Slowest stage over the mean stage: 1.0 is perfectly balanced."""
        mean = sum(self.stage_s) / len(self.stage_s)
        return max(self.stage_s) / mean if mean > 0 else 1.0


def denoised_costs(tables: Sequence[Sequence[float]]) -> list[list[float]]:
    """Per-worker layer times with each worker's timing noise taken out.

    Workers measure the same layers at the same moment, often on shared
    cores, and interference only ever adds time: one layer can come out 10x
    slow on one worker. So a layer's cost is its *fastest* measurement over
    the workers, and each worker's speed is one factor, the median over the
    layers of its time relative to that (robust to a few spikes); a worker's
    table is then the layer costs scaled by its factor. Unequal hardware
    shows as the factor, which is what the planner needs.
    """
    base = [min(col) for col in zip(*tables, strict=True)]
    out = []
    for row in tables:
        ratios = sorted(t / b for t, b in zip(row, base, strict=True) if b > 0)
        speed = ratios[len(ratios) // 2] if ratios else 1.0
        out.append([b * speed for b in base])
    return out


def even_bounds(n_layers: int, stages: int) -> tuple[tuple[int, int], ...]:
    """Equal numbers of layers per stage (the first stages take one more when uneven)."""
    base, extra = divmod(n_layers, stages)
    out, lo = [], 0
    for s in range(stages):
        hi = lo + base + (1 if s < extra else 0)
        out.append((lo, hi))
        lo = hi
    return tuple(out)


def stage_times(
    stage_workers: Sequence[Sequence[StageWorker]], bounds: Sequence[tuple[int, int]]
) -> tuple[float, ...]:
    """Each stage's compute time under ``bounds``: its slowest worker's sum over its layers."""
    return tuple(
        max(sum(c.compute_s for c in w.layers[a:b]) for w in workers)
        for workers, (a, b) in zip(stage_workers, bounds, strict=True)
    )


def in_flight(schedule: str, stage: int, stages: int, micro_batches: int) -> int:
    """Micro-batches whose activations stage ``stage`` holds at once under ``schedule``."""
    if schedule == "gpipe":
        return micro_batches
    if schedule == "1f1b":
        return min(stages - stage, micro_batches)
    raise ValueError(f"unknown schedule {schedule!r}: 'gpipe' or '1f1b'")


def _prefix(values: Sequence[float]) -> list[float]:
    out = [0.0]
    for v in values:
        out.append(out[-1] + v)
    return out


def plan_partition(
    stage_workers: Sequence[Sequence[StageWorker]],
    *,
    schedule: str = "gpipe",
    micro_batches: int = 1,
    even: bool = False,
) -> Partition:
    """Stage bounds over the layers for the workers of each stage (``stage_workers[s]``).

    Minimises the slowest stage's compute time (``even``: equal layer counts
    instead, still checked against memory). Every worker's table must list
    the same layers. Raises ``PartitionError`` naming the first layer that
    no stage can take.
    """
    stages = len(stage_workers)
    if stages < 1 or any(not ws for ws in stage_workers):
        raise ValueError("every stage needs at least one worker")
    names = [c.name for c in stage_workers[0][0].layers]
    n = len(names)
    for ws in stage_workers:
        for w in ws:
            if [c.name for c in w.layers] != names:
                raise ValueError("every worker's cost table must list the same layers, in order")
    if n < stages:
        raise PartitionError(
            f"strategy.stages: {stages} stages need at least as many layers; the model has {n} "
            f"({', '.join(names)})"
        )
    times = [[_prefix([c.compute_s for c in w.layers]) for w in ws] for ws in stage_workers]
    state = [[_prefix([c.state_bytes for c in w.layers]) for w in ws] for ws in stage_workers]
    acts = [[_prefix([c.activation_bytes for c in w.layers]) for w in ws] for ws in stage_workers]

    def cost(s: int, a: int, b: int) -> float:
        """Stage ``s`` owning layers [a, b): its time, or inf if it does not fit."""
        held = in_flight(schedule, s, stages, micro_batches)
        worst = 0.0
        for w, worker in enumerate(stage_workers[s]):
            need = state[s][w][b] - state[s][w][a] + held * (acts[s][w][b] - acts[s][w][a])
            if need > worker.memory_bytes:
                return math.inf
            worst = max(worst, times[s][w][b] - times[s][w][a])
        return worst

    if even:
        bounds = even_bounds(n, stages)
        stage_s = [cost(s, a, b) for s, (a, b) in enumerate(bounds)]
        for s, t in enumerate(stage_s):
            if math.isinf(t):
                raise PartitionError(_no_fit_message(bounds[s], names, s))
        return Partition(bounds, tuple(stage_s))

    # best[s][b]: the least slowest-stage time placing layers [0, b) on stages [0, s].
    best = [[math.inf] * (n + 1) for _ in range(stages)]
    cut = [[0] * (n + 1) for _ in range(stages)]
    for b in range(1, n - stages + 2):
        best[0][b] = cost(0, 0, b)
    for s in range(1, stages):
        for b in range(s + 1, n - (stages - s - 1) + 1):
            for a in range(s, b):
                if math.isinf(best[s - 1][a]):
                    continue
                t = max(best[s - 1][a], cost(s, a, b))
                if t < best[s][b]:
                    best[s][b], cut[s][b] = t, a
    if math.isinf(best[stages - 1][n]):
        raise PartitionError(_first_unplaceable(stage_workers, names, cost, stages, n))
    bounds_list, b = [], n
    for s in range(stages - 1, -1, -1):
        a = cut[s][b] if s > 0 else 0
        bounds_list.append((a, b))
        b = a
    bounds = tuple(reversed(bounds_list))
    return Partition(bounds, tuple(cost(s, a, b) for s, (a, b) in enumerate(bounds)))


def _no_fit_message(bound: tuple[int, int], names: list[str], stage: int) -> str:
    a, b = bound
    return (
        f"stage {stage} (layers {names[a]}..{names[b - 1]}) does not fit its workers' memory; "
        "use more stages (strategy.stages) or workers with more memory"
    )


def _first_unplaceable(stage_workers, names, cost, stages: int, n: int) -> str:
    """Why no plan fits: a layer too big alone, else the first layer a greedy fill cannot place."""
    for i, name in enumerate(names):
        if all(math.isinf(cost(s, i, i + 1)) for s in range(stages)):
            need = max(w.layers[i].state_bytes for ws in stage_workers for w in ws)
            cap = max(w.memory_bytes for ws in stage_workers for w in ws)
            return (
                f"layer {name!r} does not fit on any stage's workers: it needs {need} bytes of "
                f"state plus its activations, the largest worker budget is {cap} bytes"
            )
    for s in range(stages):
        if all(math.isinf(cost(s, i, i + 1)) for i in range(n)):
            return (
                f"stage {s}'s workers cannot hold even one layer (budget "
                f"{min(w.memory_bytes for w in stage_workers[s])} bytes); every stage needs "
                "a layer: use fewer stages (strategy.stages) or workers with more memory"
            )
    # Every layer fits alone, but not all together: fill stages greedily to find where it breaks.
    s, a = 0, 0
    for i in range(n):
        if math.isinf(cost(s, a, i + 1)):
            s, a = s + 1, i
            if s >= stages or math.isinf(cost(s, a, i + 1)):
                return (
                    f"layer {names[i]!r} does not fit: the layers before it already fill "
                    f"{stages} stages' memory; use more stages or workers with more memory"
                )
    return "no partition fits the workers' memory"
