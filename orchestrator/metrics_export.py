"""Training metrics on Ray's metrics endpoint (Prometheus), and so on Ray's dashboard.

The controller calls :meth:`MetricsExporter.step` with each step record (the
dict a program's ``reduce`` returns, plus the controller's fields) and the
job's status, and :meth:`MetricsExporter.checkpoint` with what a checkpoint
cost the step. Everything goes through ``ray.util.metrics``: Ray's metrics
agent on each node serves it on the node's ``--metrics-export-port``
(``ray_shoal_loss{job_id="..."}`` ...), where Prometheus, the Ray dashboard's
Metrics view and ``infra/grafana/shoal.json`` read it.

Every metric carries a ``job_id`` tag, so many jobs on one cluster stay apart.
Exporting never fails a job: outside a Ray actor (the controller's unit
tests) or if Ray's metrics cannot be created, the exporter does nothing.
"""

from __future__ import annotations

import logging
from typing import Any

# name -> (kind, description, extra tag keys). Prometheus shows each as ray_<name>.
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "shoal_step": ("gauge", "steps completed", ()),
    "shoal_loss": ("gauge", "training loss of the last step", ()),
    "shoal_eval_loss": ("gauge", "held-out loss of the last evaluation", ()),
    "shoal_accuracy": ("gauge", "held-out accuracy of the last evaluation", ()),
    "shoal_tokens_per_second": ("gauge", "tokens trained per second (language models)", ()),
    "shoal_samples_per_second": ("gauge", "samples trained per second", ()),
    "shoal_step_seconds": ("histogram", "wall time of one step on the controller", ()),
    "shoal_workers": ("gauge", "members of the training role in the current epoch", ()),
    "shoal_epoch": ("gauge", "membership epoch (one per membership change)", ()),
    "shoal_recoveries": ("gauge", "lost members the job survived so far", ()),
    "shoal_steps_redone": ("gauge", "committed steps computed again after failures", ()),
    "shoal_checkpoint_blocked_seconds": (
        "histogram",
        "seconds a checkpoint held training up (snapshot and wait for the previous upload)",
        (),
    ),
    "shoal_checkpoints_committed": ("gauge", "checkpoints committed", ()),
    "shoal_checkpoints_failed": ("gauge", "checkpoints given up", ()),
    "shoal_worker_shard_bytes": ("gauge", "bytes of training state a rank owns", ("rank",)),
    "shoal_worker_peak_rss_bytes": ("gauge", "peak resident memory of a rank", ("rank",)),
    "shoal_worker_compute_seconds": ("gauge", "a rank's compute time in the last step", ("rank",)),
    "shoal_federated_rounds": ("counter", "federated rounds completed", ()),
    "shoal_federated_clients": (
        "gauge",
        "clients of the last federated round, by outcome",
        ("outcome",),
    ),
    "shoal_expert_hosts_live": ("gauge", "expert hosts answering (strategy=moe)", ()),
    "shoal_expert_slots_masked": (
        "gauge",
        "share of routed expert slots masked because their host did not answer in time",
        (),
    ),
}

# Seconds: from a fast CPU step to a stalled one.
_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]

_FEDERATED_OUTCOMES = ("sampled", "finished", "dropped", "late", "rejected")

log = logging.getLogger("shoal.metrics")


class MetricsExporter:
    """One job's metrics; a no-op where Ray's metrics are unavailable."""

    def __init__(self, job_id: str):
        self.job_id = job_id
        self._metrics: dict[str, Any] = {}
        try:
            import ray

            if not ray.is_initialized():
                return
            from ray.util import metrics

            for name, (kind, description, extra) in METRICS.items():
                tags = ("job_id", *extra)
                if kind == "gauge":
                    self._metrics[name] = metrics.Gauge(name, description, tag_keys=tags)
                elif kind == "counter":
                    self._metrics[name] = metrics.Counter(name, description, tag_keys=tags)
                else:
                    self._metrics[name] = metrics.Histogram(
                        name, description, boundaries=_BOUNDARIES, tag_keys=tags
                    )
        except Exception as e:  # noqa: BLE001 - metrics must never stop training
            log.warning("Ray metrics unavailable, not exporting shoal's: %s", e)
            self._metrics = {}

    @property
    def enabled(self) -> bool:
        return bool(self._metrics)

    def step(self, record: dict[str, Any], status: Any) -> None:
        """Export one step record and the status fields that go with it."""
        if not self._metrics:
            return
        try:
            self._step(record, status)
        except Exception as e:  # noqa: BLE001 - metrics must never stop training
            log.warning("exporting step metrics failed: %s", e)

    def checkpoint(self, fields: dict[str, Any]) -> None:
        """What a checkpoint cost the step: ``checkpoint_blocked_s``."""
        if self._metrics and "checkpoint_blocked_s" in fields:
            self._emit("shoal_checkpoint_blocked_seconds", fields["checkpoint_blocked_s"])

    def _step(self, record: dict[str, Any], status: Any) -> None:
        r = record
        self._emit("shoal_step", r["step"] + 1)
        for key, name in (
            ("loss", "shoal_loss"),
            ("eval_loss", "shoal_eval_loss"),
            ("accuracy", "shoal_accuracy"),
            ("tokens_per_s", "shoal_tokens_per_second"),
            ("samples_per_s", "shoal_samples_per_second"),
            ("step_time_s", "shoal_step_seconds"),
            ("expert_hosts_live", "shoal_expert_hosts_live"),
            ("expert_slots_masked", "shoal_expert_slots_masked"),
        ):
            if isinstance(r.get(key), int | float):
                self._emit(name, r[key])
        for rank, rss in enumerate(r.get("peak_rss_mb") or []):
            self._emit("shoal_worker_peak_rss_bytes", rss * 2**20, rank=str(rank))
        for rank, seconds in enumerate(r.get("compute_s") or []):
            self._emit("shoal_worker_compute_seconds", seconds, rank=str(rank))
        if "clients_sampled" in r:
            self._emit("shoal_federated_rounds", 1)
            for outcome in _FEDERATED_OUTCOMES:
                value = r.get(f"clients_{outcome}")
                if isinstance(value, int | float):
                    self._emit("shoal_federated_clients", value, outcome=outcome)
        self._emit("shoal_workers", len(status.workers))
        self._emit("shoal_epoch", status.epoch)
        self._emit("shoal_recoveries", status.failures_survived)
        self._emit("shoal_steps_redone", status.steps_redone)
        self._emit("shoal_checkpoints_committed", status.checkpoints_committed)
        self._emit("shoal_checkpoints_failed", status.checkpoints_failed)
        for row in status.workers:
            if "shard_bytes" in row and "rank" in row:
                self._emit("shoal_worker_shard_bytes", row["shard_bytes"], rank=str(row["rank"]))

    def _emit(self, name: str, value: float, **tags: str) -> None:
        metric = self._metrics[name]
        kind = METRICS[name][0]
        all_tags = {"job_id": self.job_id, **tags}
        if kind == "gauge":
            metric.set(float(value), tags=all_tags)
        elif kind == "counter":
            metric.inc(float(value), tags=all_tags)
        else:
            metric.observe(float(value), tags=all_tags)
