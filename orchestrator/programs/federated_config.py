"""``strategy=federated``'s config: its fields and how they must fit together.

Kept apart from the program (``orchestrator/programs/federated.py``) so the
config schema loads without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from orchestrator.schema import StrategyConfig

# Server-side rules. fedavg/fedprox/scaffold average the updates (weighted
# by samples); fedadam/fedyogi feed that average to a server optimizer
# (Reddi et al. 2021); median, trimmed_mean and centered_clip are robust to
# a minority of bad updates and weigh every client alike.
AGGREGATORS = (
    "fedavg",
    "fedprox",
    "fedadam",
    "fedyogi",
    "scaffold",
    "median",
    "trimmed_mean",
    "centered_clip",
)
ROBUST = ("median", "trimmed_mean", "centered_clip")


@dataclass
class DPConfig:
    """Central differential privacy (DP-FedAvg): clip each update, noise the sum.

    noise_multiplier 0 turns it off. Each client's update is clipped to L2
    norm ``clip``; Gaussian noise of std ``noise_multiplier * clip`` is added
    to the sum of the round's updates, which is then divided by
    ``strategy.per_round``. (epsilon, delta) is reported every round.
    """

    noise_multiplier: float = 0.0
    clip: float = 1.0
    delta: float = 1e-5


@dataclass
class FederatedStrategyConfig(StrategyConfig):
    """``strategy=federated``: clients keep their data; a server aggregates their updates."""

    name: str = "federated"
    # Simulated clients; each holds a shard of the training rows (label-skewed
    # by data.alpha) and lives on one of cluster.workers client actors.
    clients: int = 20
    # Clients sampled each round (one round = one step of train.steps).
    per_round: int = 10
    # Sample this many more than per_round and keep the first per_round
    # results (stragglers are cancelled).
    over_commit: int = 0
    # The fewest results a round needs (null: half of per_round, at least 1);
    # a round with fewer is retried (round_retries times, re-sampled among
    # the clients whose actors answered) and then fails the job.
    min_results: int | None = None
    round_retries: int = 2
    # Results later than this are dropped (null: no deadline but
    # elastic.step_timeout_s).
    round_deadline_s: float | None = None
    # Local training: this many passes over the client's rows, mini-batches
    # of batch_size, plain SGD at client_lr (train.lr, its schedule and
    # train.optimizer are not used: the server's step is server_lr).
    local_epochs: int = 1
    # ... but at most this many SGD steps per client and round (null: no
    # cap): a client with many rows (a text corpus' share) then costs a
    # bounded round, the usual "K local steps" of FedAvg.
    local_steps: int | None = None
    batch_size: int = 32
    client_lr: float = 0.3
    aggregator: str = "fedavg"
    # The server's step on the averaged update: 1.0 with fedavg is plain
    # averaging; fedadam/fedyogi take e.g. 0.01 (with adaptivity eps
    # server_eps and train.beta1/train.beta2).
    server_lr: float = 1.0
    server_eps: float = 1e-3
    # fedprox: the proximal term's weight (mu/2 * |w - w_global|^2).
    prox_mu: float = 0.01
    # trimmed_mean: the share dropped from each end, per coordinate.
    trim: float = 0.1
    # centered_clip: the clipping radius around the previous round's update.
    clip_tau: float = 1.0
    # Updates with an L2 norm above this are rejected (null: no bound).
    max_update_norm: float | None = None
    # Clients whose code raises before the job fails (0: the first one fails it).
    max_client_errors: int = 0
    # Pairwise masks (Bonawitz et al. 2017): the server sees only the sum.
    secure_aggregation: bool = False
    dp: DPConfig = field(default_factory=DPConfig)
    # CPUs the server asks Ray for (the clients: cluster.cpus_per_worker each).
    server_cpus: float = 1.0


SCHEMA = FederatedStrategyConfig
VOLUNTEERS = "train as federated clients"  # with gateway.enabled


def min_results(st: Any) -> int:
    """The fewest results a round needs."""
    return st.min_results if st.min_results is not None else max(1, st.per_round // 2)


def check(c: Any) -> None:
    """``strategy=federated``'s own fields and how they fit."""
    from orchestrator.spec import ConfigError

    st = c.strategy
    if st.clients < 1:
        raise ConfigError(f"strategy.clients: must be >= 1, got {st.clients}")
    if not 1 <= st.per_round <= st.clients:
        raise ConfigError(
            f"strategy.per_round: must be between 1 and strategy.clients ({st.clients}), "
            f"got {st.per_round}"
        )
    if st.over_commit < 0 or st.per_round + st.over_commit > st.clients:
        raise ConfigError(
            f"strategy.over_commit: must be >= 0 and per_round + over_commit <= clients "
            f"({st.clients}), got {st.over_commit}"
        )
    if st.min_results is not None and not 1 <= st.min_results <= st.per_round:
        raise ConfigError(
            f"strategy.min_results: must be between 1 and strategy.per_round ({st.per_round}) "
            f"or null, got {st.min_results}"
        )
    if st.aggregator not in AGGREGATORS:
        raise ConfigError(
            f"strategy.aggregator: must be one of {list(AGGREGATORS)}, got {st.aggregator!r}"
        )
    if st.local_steps is not None and st.local_steps < 1:
        raise ConfigError(f"strategy.local_steps: must be >= 1 or null, got {st.local_steps}")
    positive = ("batch_size", "local_epochs")
    for name in positive:
        if getattr(st, name) < 1:
            raise ConfigError(f"strategy.{name}: must be >= 1, got {getattr(st, name)}")
    for name in ("client_lr", "server_lr", "server_eps", "clip_tau", "server_cpus"):
        if getattr(st, name) <= 0:
            raise ConfigError(f"strategy.{name}: must be > 0, got {getattr(st, name)}")
    for name in ("prox_mu", "round_retries", "max_client_errors"):
        if getattr(st, name) < 0:
            raise ConfigError(f"strategy.{name}: must be >= 0, got {getattr(st, name)}")
    if not 0 <= st.trim < 0.5:
        raise ConfigError(f"strategy.trim: must be in [0, 0.5), got {st.trim}")
    if st.round_deadline_s is not None and st.round_deadline_s <= 0:
        raise ConfigError(
            f"strategy.round_deadline_s: must be > 0 or null, got {st.round_deadline_s}"
        )
    if st.max_update_norm is not None and st.max_update_norm <= 0:
        raise ConfigError(
            f"strategy.max_update_norm: must be > 0 or null, got {st.max_update_norm}"
        )
    dp = st.dp
    if dp.noise_multiplier < 0 or dp.clip <= 0 or not 0 < dp.delta < 1:
        raise ConfigError(
            "strategy.dp: noise_multiplier must be >= 0, clip > 0 and delta in (0, 1); got "
            f"{dp.noise_multiplier}, {dp.clip}, {dp.delta}"
        )
    if st.secure_aggregation:
        if st.aggregator in ROBUST or st.aggregator == "scaffold":
            raise ConfigError(
                f"strategy.aggregator: {st.aggregator} needs each client's update, which "
                "strategy.secure_aggregation=true hides from the server; use fedavg, fedprox, "
                "fedadam or fedyogi"
            )
        if min_results(st) < 2:
            raise ConfigError(
                "strategy.min_results: secure aggregation needs at least 2 results per round "
                "(a sum of one is that client's update)"
            )
    if c.gateway.enabled and st.secure_aggregation:
        raise ConfigError(
            "strategy.secure_aggregation: volunteers' updates are each validated and "
            "spot-checked, which masking would hide; turn one of them off (gateway.enabled)"
        )
    cl = c.cluster
    if cl.min_workers not in (None, cl.workers) or cl.max_workers not in (None, cl.workers):
        raise ConfigError(
            "cluster.min_workers / cluster.max_workers: strategy=federated has a fixed number "
            "of client actors (cluster.workers); leave them null"
        )


def batch_ways(c: Any) -> tuple[int, str]:
    """train.global_batch is not used: each client trains on its own rows."""
    return 1, "one server"
