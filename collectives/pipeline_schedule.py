"""Pipeline schedules as values: the order in which one stage runs its micro-batches.

A schedule is a list of actions ``("F", i)`` (forward of micro-batch ``i``)
and ``("B", i)`` (its backward) for one stage of ``stages``. Every stage runs
its own list; the activations and gradients that stages exchange make them
wait for each other, so the lists only have to be consistent (each one's
receives come in an order its neighbour sends them).

- **GPipe** runs every forward, then every backward: all ``m`` micro-batches'
  activations are alive at once.
- **1F1B** (PipeDream-flush, Megatron's default) lets stage ``s`` run
  ``p - s - 1`` forwards ahead, then alternates one forward and one
  backward, so at most ``p - s`` micro-batches' activations are alive. The
  bubble is the same as GPipe's; the activation memory is bounded by the
  number of stages instead of the number of micro-batches.

Both produce the same gradients: each micro-batch's backward is the same
computation in either order, and gradients are summed.
"""

from __future__ import annotations

SCHEDULES = ("gpipe", "1f1b")

Action = tuple[str, int]  # ("F" | "B", micro-batch index)


def stage_actions(schedule: str, stage: int, stages: int, micro_batches: int) -> list[Action]:
    """The actions of ``stage`` (0-based) of ``stages`` for ``micro_batches`` micro-batches."""
    if schedule not in SCHEDULES:
        raise ValueError(f"strategy.schedule: must be one of {list(SCHEDULES)}, got {schedule!r}")
    if not 0 <= stage < stages:
        raise ValueError(f"stage {stage} is not in [0, {stages})")
    m = micro_batches
    if schedule == "gpipe":
        return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
    warmup = min(stages - stage - 1, m)
    actions: list[Action] = [("F", i) for i in range(warmup)]
    backward = 0
    for i in range(warmup, m):  # steady state: one forward, then the oldest backward
        actions += [("F", i), ("B", backward)]
        backward += 1
    actions += [("B", i) for i in range(backward, m)]
    return actions


def peak_in_flight(actions: list[Action]) -> int:
    """The most micro-batches whose activations are held at once (forward done, backward not)."""
    live = peak = 0
    for kind, _ in actions:
        live += 1 if kind == "F" else -1
        peak = max(peak, live)
    return peak


def bubble_formula(stages: int, micro_batches: int) -> float:
    """The idle share of an ideal pipeline with equal stages: ``(p - 1) / (m + p - 1)``."""
    return (stages - 1) / (micro_batches + stages - 1)
