"""``strategy=moe``'s config: its fields and how they must fit the model.

Kept apart from the program (``orchestrator/programs/moe.py``) so the config
schema loads without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orchestrator.schema import StrategyConfig


@dataclass
class MoEStrategyConfig(StrategyConfig):
    """``strategy=moe``: experts on expert-host actors, the trunk data-parallel on the workers."""

    name: str = "moe"
    # Expert-host actors; host i holds a contiguous run of expert indices
    # (the same ones in every layer). At most model.n_expert.
    expert_hosts: int = 2
    # CPUs (and GPUs) each expert host asks Ray for.
    host_cpus: float = 1.0
    host_gpus: float = 0.0
    # A dispatch waits until every token has answers from k_min of its
    # experts (or from all that can still answer), then grace_s longer for
    # the others, then gives up on them: their slots are masked and the
    # token's gate weights renormalised over the experts that answered.
    k_min: int = 1
    grace_s: float = 1.0
    # The longest any dispatch waits, even before k_min answers: a host that
    # hangs without dying costs at most this per call.
    timeout_s: float = 30.0
    # A host whose call failed is banned (its experts masked in the gate)
    # for ban_s * 2^(failures-1) seconds, at most ban_max_s.
    ban_s: float = 1.0
    ban_max_s: float = 30.0


SCHEMA = MoEStrategyConfig
VOLUNTEERS = "replicate expert hosts"  # with gateway.enabled


def check(c: Any) -> None:
    """``strategy=moe``'s own fields, and that the model has experts to place."""
    from orchestrator.spec import ConfigError

    st = c.strategy
    n_expert = getattr(c.model, "n_expert", None)
    if n_expert is None:
        raise ConfigError(
            f"model: strategy=moe needs a model with experts (model=gpt_moe), got "
            f"{getattr(c.model, '_target_', c.model)!r}"
        )
    if not 1 <= st.expert_hosts <= n_expert:
        raise ConfigError(
            f"strategy.expert_hosts: must be between 1 and model.n_expert ({n_expert}), "
            f"got {st.expert_hosts}"
        )
    top_k = getattr(c.model, "top_k", 1)
    if not 1 <= top_k <= n_expert:
        raise ConfigError(
            f"model.top_k ({top_k}) must be between 1 and model.n_expert ({n_expert})"
        )
    if not 1 <= st.k_min <= top_k:
        raise ConfigError(
            f"strategy.k_min: must be between 1 and model.top_k ({top_k}), got {st.k_min}"
        )
    for name in ("grace_s", "ban_s", "ban_max_s"):
        if getattr(st, name) < 0:
            raise ConfigError(f"strategy.{name}: must be >= 0, got {getattr(st, name)}")
    if st.timeout_s <= 0:
        raise ConfigError(f"strategy.timeout_s: must be > 0, got {st.timeout_s}")
    if st.host_cpus <= 0 or st.host_gpus < 0:
        raise ConfigError(
            f"strategy.host_cpus / host_gpus: must be > 0 / >= 0, got {st.host_cpus} / "
            f"{st.host_gpus}"
        )


def batch_ways(c: Any) -> tuple[int, str]:
    """The global batch is split among the trunk workers, as for ddp."""
    return (c.cluster.max_workers or c.cluster.workers), "cluster.max_workers"
