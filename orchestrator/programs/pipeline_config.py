"""``strategy=pipeline``'s config: its fields and how they must fit the cluster and batch.

Kept apart from the program (``orchestrator/programs/pipeline.py``) so the
config schema loads without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from collectives.pipeline_schedule import SCHEDULES
from orchestrator.schema import StrategyConfig

PARTITIONS = ("auto", "even")


@dataclass
class PipelineStrategyConfig(StrategyConfig):
    """``strategy=pipeline``: the model's layers cut into stages, one per worker of a replica."""

    name: str = "pipeline"
    # Stages per pipeline; cluster.workers / stages data-parallel replicas.
    stages: int = 2
    # gpipe: all forwards, then all backwards (activations of every
    # micro-batch held at once). 1f1b: one forward, one backward in the
    # steady state (at most `stages` micro-batches' activations held).
    schedule: str = "1f1b"
    # auto: layers cut where the slowest stage is fastest, from each
    # worker's measured layer costs. even: equal numbers of layers.
    partition: str = "auto"
    # partition=auto: every this many steps, compare each worker's measured
    # busy time with what its layer profile predicted; if re-cutting the
    # stages to the measured speeds would make the slowest stage at least
    # REPLAN_GAIN faster, re-cut at the next step boundary (a new epoch,
    # state moved from live copies). 0: never.
    rebalance_every: int = 20


SCHEMA = PipelineStrategyConfig


def check(c: Any) -> None:
    """``strategy=pipeline``'s own fields and how they fit the cluster and batch."""
    from orchestrator.spec import ConfigError

    st, cl = c.strategy, c.cluster
    if st.stages < 1:
        raise ConfigError(f"strategy.stages: must be >= 1, got {st.stages}")
    if st.schedule not in SCHEDULES:
        raise ConfigError(
            f"strategy.schedule: must be one of {list(SCHEDULES)}, got {st.schedule!r}"
        )
    if st.rebalance_every < 0:
        raise ConfigError(
            f"strategy.rebalance_every: must be >= 0 (0: never), got {st.rebalance_every}"
        )
    if st.partition not in PARTITIONS:
        raise ConfigError(
            f"strategy.partition: must be one of {list(PARTITIONS)}, got {st.partition!r}"
        )
    # cluster.min_workers need not be a multiple: with fewer workers, an epoch
    # runs with the most stages that divide them (orchestrator/programs/pipeline.py).
    for name, value in (("cluster.workers", cl.workers), ("cluster.max_workers", cl.max_workers)):
        if value is not None and value % st.stages != 0:
            raise ConfigError(
                f"{name}: must be a multiple of strategy.stages ({st.stages}): each of the "
                f"workers / stages replicas runs every stage; got {value}"
            )


def batch_ways(c: Any) -> tuple[int, str]:
    """Into how many parts the global batch is split (the most replicas), and what sets it."""
    return max(1, (c.cluster.max_workers or c.cluster.workers) // c.strategy.stages), (
        "the most replicas (cluster.max_workers / strategy.stages)"
    )
