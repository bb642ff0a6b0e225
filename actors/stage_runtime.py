"""A pipeline stage's runtime: one rank owning a contiguous block of the model's layers.

Hosted by ``MemberActor`` (role ``stage``) for ``strategy=pipeline``
(``orchestrator/programs/pipeline.py``). Ranks are laid out replica-major:
rank ``r * stages + s`` is stage ``s`` of data-parallel replica ``r``. Each
epoch's ``setup`` gives the rank its stage's layers; every step it runs its
schedule (``collectives/pipeline.py``) on its replica's rows of the global
batch, then ``StageEngine.step`` reduces gradients and updates.

Everything a data-parallel worker does between steps — checkpoints,
buddy replication, holdings and restores — works unchanged, because a
stage's state is a range of the same flat ``dp`` space: its own layers'
parameters and optimizer state (``collectives/stage_engine.py``).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from actors.dp_runtime import DataParallelRuntime, WorkerInfo, optimizer_spec, peak_rss_bytes
from actors.stages import pipeline_layers, profile_layers
from actors.task import TaskError, build_model
from collectives.errors import PeerLostError, classify_peer_loss
from collectives.flat import FlatLayout
from collectives.pipeline import StageExecutor
from collectives.pipeline_schedule import stage_actions
from collectives.process_group import Rendezvous, join_group, leave_group, subgroup
from collectives.stage_engine import StageEngine, layer_slots, tied_slots
from orchestrator.recovery import Holding


@dataclass(frozen=True)
class StageSetup:
    """What one rank needs to know of its epoch's pipeline plan."""

    stage: int
    stages: int
    replica: int
    replicas: int
    layer_bounds: tuple[tuple[int, int], ...]  # every stage's [first, last) of pipeline_layers()
    owned: tuple[int, int]  # this rank's stage's flat range
    pieces: tuple[tuple[int, int], ...]  # every rank's piece of its stage's range (rank order)
    schedule: str


@dataclass(frozen=True)
class StageStepResult:
    step: int
    rank: int
    stage: int
    loss_sum: float  # last stage only (0 elsewhere)
    n_units: int
    n_samples: int  # rows of the global batch this rank's replica trained on
    n_tokens: int
    grad_norm: float
    compute_s: float  # busy: this stage's own forwards and backwards
    comm_wait_s: float  # waiting for neighbours' activations and gradients
    span_s: float  # the schedule, first action to last send
    step_s: float
    peak_activation_bytes: int
    peak_rss: int
    data_s: float = 0.0  # waiting for this step's batch (first and last stages)


class _GivenOutputs(nn.Module):
    """Stands in for the model in the task's loss: returns outputs the pipeline computed."""

    def __init__(self, outputs: list[torch.Tensor]):
        super().__init__()
        self.outputs = outputs

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.outputs:
            raise TaskError(
                "under strategy=pipeline the loss must call the model exactly once per batch"
            )
        return self.outputs.pop(0)


class StageRuntime(DataParallelRuntime):
    """One pipeline stage of one replica; see the module docstring."""

    plan: StageSetup

    def probe(self) -> dict[str, Any]:
        """The data-parallel probe plus this worker's measured cost of every layer."""
        out = super().probe()
        torch.manual_seed(self.spec.train.seed)
        model = build_model(self.spec.model, self.data.facts).to(self.device)
        t, task = self.spec.train, self.task
        replicas = max(1, self.spec.cluster.workers // max(1, int(self.spec.strategy.stages)))
        rows = max(1, t.global_batch // replicas // t.micro_batches)
        batch = task.batch(self.data, t.seed, 0, t.global_batch, 0, rows)
        states = len(optimizer_spec(self.spec).state_keys())
        out["profile"] = profile_layers(
            model, pipeline_layers(model), batch["x"].to(self.device), 4 * (2 + states)
        )
        return out

    @classify_peer_loss(on_loss=lambda self: leave_group())
    def setup(self, rdzv: Rendezvous, plan: StageSetup, rank: int) -> WorkerInfo:
        """Join the epoch as ``rank``: build the model, keep this stage's layers, make the engine.

        Every rank builds the whole model from the same seed (so a fresh
        job starts from the weights data parallelism would), then keeps only
        its stage's layers.
        """
        self.rank, self.plan = rank, plan
        self._bounds = list(plan.pieces)
        join_group(rdzv, rank, self._rdzv_store if rank == 0 else None)
        self._start_epoch(rdzv.world_size)
        torch.manual_seed(self.spec.train.seed)
        model = build_model(self.spec.model, self.data.facts).to(self.device)
        named = pipeline_layers(model)
        layout = FlatLayout.of(model)
        uses = layer_slots(layout, model, [m for _, m in named])
        # Slots used by more than one stage (tied weights): gradients summed over the pipeline.
        tied = tied_slots(layout, uses, plan.layer_bounds)
        a, b = plan.layer_bounds[plan.stage]
        self.engine = StageEngine(
            model,
            [m for _, m in named[a:b]],
            layout,
            plan.owned,
            plan.pieces[rank],
            tied,
            optimizer_spec(self.spec),
            grad_clip=self.spec.train.grad_clip,
            dp_group=subgroup("dp"),
            pp_group=subgroup("pp"),
        )
        del model, named  # only this stage's layers stay alive
        first = plan.replica * plan.stages
        self.executor = StageExecutor(
            self.engine.module,
            prev=first + plan.stage - 1 if plan.stage > 0 else None,
            next=first + plan.stage + 1 if plan.stage < plan.stages - 1 else None,
            device=self.device,
            is_parameter=self.engine.is_parameter,
            autocast_dtype=torch.bfloat16 if self.spec.train.precision == "bf16" else None,
        )
        return self._ready_to_train()

    @property
    def _is_first(self) -> bool:
        return self.plan.stage == 0

    @property
    def _is_last(self) -> bool:
        return self.plan.stage == self.plan.stages - 1

    # -- training -----------------------------------------------------------

    def _train_step(self, step: int, lr: float, batch_lo: int, batch_hi: int) -> StageStepResult:
        """Rows ``[batch_lo, batch_hi)`` of global batch ``step`` through this stage's schedule."""
        t, task, plan = self.spec.train, self.task, self.plan
        start = time.perf_counter()
        n = batch_hi - batch_lo
        micro = np.array_split(np.arange(n), min(t.micro_batches, n))
        parts: list[dict[str, torch.Tensor]] = []
        data_s = 0.0
        if self._is_first or self._is_last:  # middle stages need no data
            batch, data_s = self._batches.get(step, batch_lo, batch_hi)
            parts = [{k: v[torch.from_numpy(r)] for k, v in batch.items()} for r in micro]
        # Scaled by a constant every rank knows, as in data parallelism.
        scale = t.global_batch * task.units_per_sample
        sums = {"loss": 0.0, "units": 0}

        def loss_fn(output: torch.Tensor, i: int) -> torch.Tensor:
            part = {k: v.to(self.device) for k, v in parts[i].items()}
            loss, count = task.loss(_GivenOutputs([output]), part)
            sums["loss"] += float(loss.detach())
            sums["units"] += count
            return loss.float() / scale

        self.engine.zero_grad()
        actions = stage_actions(plan.schedule, plan.stage, plan.stages, len(micro))
        stats = self.executor.run(
            actions,
            [p["x"] for p in parts] if self._is_first else None,
            loss_fn if self._is_last else None,
        )
        self._before_update()
        self._live_valid = False  # an update that fails midway leaves the stage neither/nor
        engine_stats = self.engine.step(lr)
        self._live_valid = True
        self._after_step(step + 1)
        if not np.isfinite(sums["loss"]):
            raise FloatingPointError(
                f"rank {self.rank}: loss is {sums['loss']} at step {step}; lower train.lr or set "
                "train.grad_clip"
            )
        return StageStepResult(
            step=step,
            rank=self.rank,
            stage=plan.stage,
            loss_sum=sums["loss"],
            n_units=sums["units"],
            n_samples=n,
            n_tokens=n * task.seq_len if task.type == "lm" else 0,
            grad_norm=engine_stats.grad_norm,
            compute_s=stats.busy_s,
            comm_wait_s=stats.wait_s,
            span_s=stats.span_s,
            step_s=time.perf_counter() - start,
            peak_activation_bytes=stats.peak_activation_bytes,
            peak_rss=peak_rss_bytes(),
            data_s=data_s,
        )

    # -- state held for recovery -----------------------------------------------

    def holdings(self) -> list[dict[str, Any]]:
        """The data-parallel holdings, plus live copies of the other replicas' pieces."""
        out = super().holdings()
        if self._applied is None or self.engine is None or not self._live_valid:
            return out
        plan = self.plan
        for r in range(plan.replicas):
            peer = r * plan.stages + plan.stage
            if peer != self.rank:
                lo, hi = plan.pieces[peer]
                row = Holding(self.rank, peer, self._applied, "live", lo, hi, self.state_space)
                out.append(dataclasses.asdict(row))
        return out

    def export_piece(
        self, kind: str, owner: int, done: int, space: str = "dp"
    ) -> dict[str, torch.Tensor]:
        """Live pieces of any replica of this stage come from the stage's own state."""
        if kind != "live":
            return super().export_piece(kind, owner, done, space)
        if space != self.state_space:
            raise LookupError(f"rank {self.rank} holds no live state of space {space!r}")
        lo, hi = self._bounds[owner]
        return {k: v.detach().clone() for k, v in self.engine.slice(lo, hi).items()}

    # -- evaluation and sampling -----------------------------------------------

    @classify_peer_loss(on_loss=lambda self: self._abort_epoch())
    def evaluate(self, bounds: list[tuple[int, int]]) -> dict[str, Any]:
        """Forward-only pipeline over this replica's rows ``bounds[replica]`` of held-out batches.

        The last stage returns the task's sums; the others return zeros.
        """
        if not torch.distributed.is_initialized():
            raise PeerLostError("peer failure earlier in this epoch: the process group is gone")
        task = self.task
        items = self._eval_parts(*bounds[self.plan.replica])
        outputs: list[torch.Tensor] = []
        module = self.engine.module
        was_training = module.training
        module.eval()
        try:
            self.executor.run(
                [("F", i) for i in range(len(items))],
                [part["x"] for part, _ in items] if self._is_first else None,
                None,
                train=False,
                on_output=lambda out, _i: outputs.append(out.float()),
            )
        finally:
            module.train(was_training)
        if not self._is_last:
            return {"task": task.type, "loss_sum": 0.0, "count": 0, "correct": 0, "rows": 0}
        items = [({k: v.to(self.device) for k, v in p.items()}, c) for p, c in items]
        return task.evaluate(_GivenOutputs(outputs), items)

    def full_flat_param(self) -> torch.Tensor:
        """The whole model's flat parameters on every rank: a collective over the job."""
        flat = torch.zeros(self.engine.layout.numel, device=self.device)
        lo, hi = self.plan.pieces[self.rank]
        flat[lo:hi] = self.engine.slice(lo, hi)["param"]
        torch.distributed.all_reduce(flat)  # every element comes from exactly one piece
        return flat

    def generate(
        self, prompt: str, n_tokens: int, temperature: float = 0.8, seed: int = 0
    ) -> str | None:
        """As ``DataParallelRuntime.generate``, on the whole model gathered from the stages."""
        flat = self.full_flat_param()
        if self.rank != 0:
            return None
        model = build_model(self.spec.model, self.data.facts)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for slot in self.engine.layout.slots:
                params[slot.name].copy_(flat[slot.offset : slot.end].view(slot.shape))
        return self._sample(model, prompt, n_tokens, temperature, seed)
