"""A ``strategy=moe`` trunk worker: data-parallel trunk, experts on expert hosts.

The worker builds the full ``gpt_moe`` model (so the trunk starts exactly as
a one-process model would), then replaces each MoE layer's local experts by
``RemoteExperts`` (``actors/expert_client.py``): the trunk — embeddings,
attention, layer norms, gates — is what the worker holds and trains, as a
ddp replica of the ``dp`` state space; the experts' state lives on the expert
hosts. Everything else (steps, checkpoints of the trunk, recovery of a lost
worker) is the data-parallel runtime's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from actors.dp_runtime import DataParallelRuntime, StepResult
from actors.expert_client import ExpertClient, HostEntry, RemoteExperts
from actors.task import build_model


@dataclass(frozen=True)
class MoEStepResult(StepResult):
    # Per host slot: calls, misses, failures, mean latency, version, throughput.
    experts: dict[str, Any] = None  # type: ignore[assignment]


class MoEWorkerRuntime(DataParallelRuntime):
    """A trunk worker of ``strategy=moe`` (see the module docstring)."""

    def _build_model(self) -> torch.nn.Module:
        model = build_model(self.spec.model, self.data.facts)
        layers = getattr(model, "moe_layers", None)
        if not callable(layers):
            raise TypeError(
                f"strategy=moe: model {self.spec.model._target_} has no moe_layers(); use "
                "model=gpt_moe (or a model with MoEFeedForward layers)"
            )
        self.client = ExpertClient(model.n_expert, self.spec.strategy)
        for i, moe in enumerate(layers()):
            moe.experts = RemoteExperts(self.client, i)  # the local experts are dropped
        return model

    @property
    def _engine_strategy(self) -> str:
        return "ddp"  # the trunk is replicated on every worker

    def train_step(  # type: ignore[override]
        self,
        step: int,
        lr: float,
        batch_lo: int,
        batch_hi: int,
        registry: list[HostEntry],
        attempt: int,
    ) -> MoEStepResult:
        """One step of the trunk, with this step's expert registry and the trunk's attempt."""
        self.client.update(registry, attempt, step)
        result = super().train_step(step, lr, batch_lo, batch_hi)
        return MoEStepResult(**asdict(result), experts=self.client.take_report())

    def evaluate(self, bounds: list[tuple[int, int]], registry=None, attempt: int = 0):  # type: ignore[override]
        self._at_boundary(registry, attempt)
        return super().evaluate(bounds)

    def generate(
        self,
        prompt: str,
        n_tokens: int,
        temperature: float = 0.8,
        seed: int = 0,
        registry=None,
        attempt: int = 0,
    ) -> str | None:
        """Rank 0 samples with its own trunk and the hosts' experts (no collective needed)."""
        if self.rank != 0:
            return None
        self._at_boundary(registry, attempt)
        return self._sample(self.engine.model, prompt, n_tokens, temperature, seed)

    def _at_boundary(self, registry: list[HostEntry] | None, attempt: int) -> None:
        """Between steps: expert calls carry the number of steps done (hosts apply the last)."""
        if registry is not None:
            self.client.update(registry, attempt, self._applied or 0)
        else:
            self.client.step = self._applied or 0
