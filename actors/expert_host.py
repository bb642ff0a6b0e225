"""An expert host: the runtime of ``strategy=moe``'s standing role ``expert_host``.

Host ``slot`` of ``n`` holds experts ``a..b-1`` of every MoE layer
(``expert_range``), their gradients and their optimizer state, as one flat
range ``[lo, hi)`` of the ``experts`` state space (``actors/models/gpt_moe.py``
orders it expert-major so that range is contiguous). Trunk workers call it
directly, each with only the tokens routed to its experts:

- ``forward(attempt, step, layer, inputs)``: ``{expert: x}`` in, ``{expert: y}`` out;
- ``backward(attempt, step, layer, inputs)``: ``{expert: (x, dy)}`` in,
  ``{expert: dx}`` out; the expert's forward is recomputed (nothing is kept
  between calls, so a worker that never comes back costs nothing) and the
  parameter gradients are summed into the flat gradient.

**When a step is applied.** The gradients of step ``s`` are complete once
every trunk worker has finished its backward of ``s`` — which it has when
any call of a later step arrives, since a worker starts step ``s+1`` only
after the trunk's all-reduce of step ``s``, and that waits for every
worker's backward. So the host applies step ``s`` (per-expert clipping to
``train.grad_clip``, then the optimizer at ``lr_at(s)``) lazily, on the first
call of a later step, or before a checkpoint. Every step is applied, also one
in which no token came to this host (a zero gradient, as the flat optimizer
of the data-parallel strategies applies to every parameter): the host's
experts then stay exactly where one-process training would put them. Calls
carry the trunk's epoch ``attempt``: a step that a trunk failure cut short
is re-run in a new attempt, and its partial gradients are dropped first. A
backward for a step already applied (one that arrived after its deadline) is
dropped.

**Replicas.** Every ``elastic.replicate_every`` applied steps a host sends
a copy of its state (parameters, optimizer state, version) to its *buddy*,
the next live slot, which keeps it in memory (``keep_replica``, on the
control thread: a busy buddy still takes it). A replacement host in a slot
restores the slot's experts from the newest of: its buddy's replica
(``replica_of``), the job's newest committed checkpoint, else the seeded
initialisation; it takes up the trunk's step at its first call, so the
updates since the copy are lost, not replayed, while the trunk trained on
(decentralized MoE tolerates such staleness, as Learning@home does).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from typing import Any

import torch

from actors.dp_runtime import optimizer_spec, peak_rss_bytes
from actors.expert_slot import SlotExperts
from actors.memory import worker_available_bytes
from actors.task import build_model
from collectives.optim import FlatOptimizer, decay_ranges
from orchestrator.schedule import lr_at
from orchestrator.spec import JobSpec
from storage.checkpoint import (
    CheckpointReader,
    CorruptCheckpointError,
    Manifest,
    latest_manifest,
    resolve,
)
from storage.object_store import StoreError, open_store

EXPERTS_SPACE = "experts"


class ExpertHostRuntime:
    """One expert host; see the module docstring. Set up alone (no process group)."""

    CONTROL_METHODS = ("report", "inject_delay", "keep_replica", "replica_of")

    def __init__(self, spec: JobSpec, worker_id: int, data: Any):
        self.spec = spec
        self.worker_id = worker_id
        self.data = data
        self.slot = -1
        torch.set_num_threads(max(1, int(spec.strategy.host_cpus)))
        self.applied = 0  # steps applied to the experts: their version
        self._acc: tuple[int, int] | None = None  # (attempt, step) whose gradients are summed
        self._attempt = 0  # the newest trunk attempt seen
        # Restored mid-run from an older checkpoint: skip to the trunk's step.
        self._behind = False
        self._delay_s = 0.0
        self._buddy: Any = None  # the RuntimeHandle that keeps this host's replica
        self._replicas: dict[int, tuple[int, int, dict[str, torch.Tensor]]] = {}  # by slot
        self._fresh = True  # no call served yet: a replica may still replace the state
        self._served = 0
        self._busy_s = 0.0
        self.restored_from: str | None = None
        # Volunteer -> the gradients it added to the step being summed (see add_grads).
        self._contributed: dict[str, list[tuple[int, int, torch.Tensor]]] = {}

    def probe(self) -> dict[str, Any]:
        import ray

        return {
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "available_memory": worker_available_bytes(torch.device("cpu")),
        }

    def setup(self, rdzv: Any, slot: int, hosts: int) -> dict[str, Any]:
        """Build this slot's experts (seeded as every worker's model is), then restore them."""
        self.slot = slot
        torch.manual_seed(self.spec.train.seed)
        model = build_model(self.spec.model, self.data.facts)
        self.held = SlotExperts.of(model, slot, hosts)
        self.optimizer = FlatOptimizer(
            optimizer_spec(self.spec),
            self.flat_param,
            self.flat_grad,
            decayed=decay_ranges(self.held.layout),
        )
        del model
        self._restore_latest()
        return self._describe()

    # What the slot holds, as the rest of this class (and its tests) name it.
    flat_param = property(lambda self: self.held.flat_param)
    flat_grad = property(lambda self: self.held.flat_grad)
    expert_ids = property(lambda self: self.held.expert_ids)
    n_layer = property(lambda self: self.held.n_layer)
    per_expert = property(lambda self: self.held.per_expert)
    space_size = property(lambda self: self.held.space_size)
    lo = property(lambda self: self.held.lo)
    hi = property(lambda self: self.held.hi)

    def _describe(self) -> dict[str, Any]:
        import ray

        a, b = self.expert_ids
        return {
            "slot": self.slot,
            "pid": os.getpid(),
            "node_ip": ray.util.get_node_ip_address(),
            "experts": [a, b],
            "expert_ids": [f"{layer}.{e}" for e in range(a, b) for layer in range(self.n_layer)],
            "version": self.applied,
            "restored_from": self.restored_from,
        }

    # -- serving ------------------------------------------------------------

    def forward(
        self, attempt: int, step: int, layer: int, inputs: dict[int, torch.Tensor]
    ) -> tuple[dict[int, torch.Tensor], tuple[int, str | None]]:
        """Each expert's output for its tokens; this host's version and where it restored from."""
        start = self._serve_start()
        self._settle(attempt, step)  # a stale forward is still served: it changes nothing
        out = self.held.forward(layer, inputs)
        self._serve_end(start)
        return out, (self.applied, self.restored_from)

    def backward(
        self,
        attempt: int,
        step: int,
        layer: int,
        inputs: dict[int, tuple[torch.Tensor, torch.Tensor]],
    ) -> dict[int, torch.Tensor]:
        """Each expert's input gradient; its parameter gradients are summed for step ``step``."""
        start = self._serve_start()
        if not self._settle(attempt, step):
            return {}
        self._acc = (attempt, step)
        grads = {}
        for e, (x, dy) in inputs.items():
            grads[e], dtheta = self.held.gradients(layer, e, x, dy)
            self.held.accumulate(layer, e, dtheta)
        self._serve_end(start)
        return grads

    # -- volunteer replicas (through the gateway, actors/gateway_actor.py) -----

    def params_at(self, attempt: int, step: int) -> tuple[int, torch.Tensor, int]:
        """The parameters a call of ``step`` is served with: (version, a copy, per expert)."""
        self._settle(attempt, step)
        return self.applied, self.flat_param.clone(), self.per_expert

    def check_backward(
        self, attempt: int, step: int, layer: int, inputs: dict[int, tuple[torch.Tensor, ...]]
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """``{expert: (dx, dθ)}`` as ``backward`` computes them, accumulating nothing: the
        trusted answer a volunteer's backward is spot-checked against."""
        self._settle(attempt, step)
        return {e: self.held.gradients(layer, e, x, dy) for e, (x, dy) in inputs.items()}

    def add_grads(
        self,
        attempt: int,
        step: int,
        layer: int,
        grads: dict[int, torch.Tensor],
        source: str,
    ) -> bool:
        """Sum a volunteer's (validated) parameter gradients into step ``step``'s; False: stale.

        What each volunteer added to the step not applied yet is kept, so a
        volunteer banned before the step is applied can be discounted.
        """
        if not self._settle(attempt, step):
            return False
        self._acc = (attempt, step)
        for e, g in grads.items():
            self.held.accumulate(layer, e, g)
            self._contributed.setdefault(source, []).append((layer, e, g))
        return True

    def discount(self, source: str) -> int:
        """Take back what ``source`` added to the step not applied yet; how many pieces."""
        taken = self._contributed.pop(source, [])
        with torch.no_grad():
            for layer, e, g in taken:
                self.held.grad_of(layer, e).sub_(g)
        return len(taken)

    def _serve_start(self) -> float:
        self._fresh = False
        if self._delay_s:
            time.sleep(self._delay_s)
        return time.perf_counter()

    def _serve_end(self, start: float) -> None:
        self._served += 1
        self._busy_s += time.perf_counter() - start

    def _settle(self, attempt: int | None, step: int) -> bool:
        """Bring the experts to step ``step`` before serving it; False: a stale call.

        Applies every step before ``step`` not applied yet (the one with
        summed gradients, the others with none); drops the partial sum of a
        step that is being re-run. Stale: a call of a step already applied,
        or of an older attempt than one already seen (a straggler from before
        a trunk failure). ``attempt`` None: not a trunk call (a checkpoint).
        """
        if attempt is not None:
            if attempt < self._attempt:
                return False
            self._attempt = attempt
        if self._behind:
            # Placed mid-run: take up the trunk's step; the optimizer counts
            # as many steps as the version says, as every other host's does.
            self._behind = False
            if step > self.applied:
                self.applied = step
                self.optimizer.set_step_count(step)
        if self._acc is not None:
            acc_attempt, acc_step = self._acc
            if step < acc_step:
                return False  # it arrived after its deadline
            if step == acc_step:
                if attempt is not None and attempt != acc_attempt:
                    self._drop()  # the step is being re-run after a trunk failure
                return True
        while self.applied < step:
            self._apply(self.applied)
        return step >= self.applied

    @torch.no_grad()
    def _apply(self, step: int) -> None:
        """Step ``step`` with the gradients summed for it (zero if none came)."""
        clip = self.spec.train.grad_clip
        if clip > 0:
            # Each expert is clipped by its own norm: an expert's update does
            # not depend on which host it shares, or which experts answered.
            per_expert = self.flat_grad.view(-1, self.per_expert)
            norms = per_expert.norm(dim=1, keepdim=True)
            per_expert.mul_((clip / (norms + 1e-6)).clamp(max=1.0))
        self.optimizer.step(lr_at(step, self.spec.train))
        self.flat_grad.zero_()
        self.applied = step + 1
        self._acc = None
        self._contributed.clear()
        self._replicate()

    def _drop(self) -> None:
        self.flat_grad.zero_()
        self._acc = None
        self._contributed.clear()

    # -- replicas -------------------------------------------------------------

    def peers(self, buddy: Any) -> None:
        """The live host that keeps this host's replica (None: no other host is live).

        Sent by the controller whenever the hosts change. A host that has not
        served yet (a replacement) first takes its slot's state from the
        buddy's replica, if that is newer than what it restored.
        """
        self._buddy = buddy
        if buddy is None or not self._fresh:
            return
        import ray

        try:
            replica = ray.get(buddy.replica_of.remote(self.slot), timeout=60)
        except ray.exceptions.RayError:
            return  # the buddy is gone too: the checkpoint's state stands
        if replica is not None and replica[0] > self.applied:
            applied, step_count, tensors = replica
            with torch.no_grad():
                self.flat_param.copy_(tensors["param"])
            self.optimizer.load_state(tensors, step_count)
            self._drop()
            self.applied = applied
            self._behind = True
            self.restored_from = f"replica at step {applied}"

    def _replicate(self) -> None:
        e = self.spec.elastic
        every = e.replicate_every if e.enabled else 0
        if self._buddy is None or not every or self.applied % every:
            return
        tensors = {"param": self.flat_param.clone()}
        tensors.update({k: v.clone() for k, v in self.optimizer.state_tensors().items()})
        # Not waited for: a lost copy only makes the next restore older.
        self._buddy.keep_replica.remote(self.slot, self.applied, self.optimizer.step_count, tensors)

    def keep_replica(
        self, slot: int, applied: int, step_count: int, tensors: dict[str, torch.Tensor]
    ) -> None:
        """Keep host ``slot``'s state at version ``applied`` (the newest copy wins)."""
        held = self._replicas.get(slot)
        if held is None or held[0] <= applied:
            self._replicas[slot] = (applied, step_count, tensors)

    def replica_of(self, slot: int) -> tuple[int, int, dict[str, torch.Tensor]] | None:
        """The newest copy of host ``slot``'s state this host keeps, or None."""
        return self._replicas.get(slot)

    # -- control ------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """What the status shows of this host (answered on the control thread)."""
        row = self._describe()
        row.update(
            served=self._served,
            busy_s=round(self._busy_s, 3),
            peak_rss_mb=round(peak_rss_bytes() / 2**20, 1),
        )
        return row

    def inject_delay(self, seconds: float) -> None:
        """Chaos knob: sleep ``seconds`` before serving every call (a slow expert)."""
        self._delay_s = float(seconds)

    # -- checkpoints --------------------------------------------------------

    def save_shard(self, step: int, save_id: str = "") -> dict[str, Any]:
        """Snapshot this host's range of the ``experts`` space at ``step``; upload it after."""
        self._settle(None, step)
        if self.applied != step:
            raise RuntimeError(
                f"expert host {self.slot} holds experts of step {self.applied}, asked to save "
                f"step {step}"
            )
        tensors = {"param": self.flat_param}
        tensors.update(self.optimizer.state_tensors())
        ticket = self._saver().save(
            step,
            self.slot,
            self.lo,
            self.hi,
            tensors,
            torch.get_rng_state(),
            space=EXPERTS_SPACE,
            save_id=save_id,
        )
        return asdict(ticket)

    def checkpoint_done(self, step: int, save_id: str | None = None) -> dict[str, Any] | None:
        saver = getattr(self, "_async_saver", None)
        result = saver.result(step, save_id=save_id) if saver is not None else None
        return asdict(result) if result is not None else None

    def _store(self, root_uri: str | None = None, for_upload: bool = False):
        s = self.spec.storage
        options: dict[str, Any] = {}
        uri = root_uri or self.spec.checkpoint.uri
        if for_upload and uri.startswith("s3://"):
            options = {"max_attempts": 2, "op_attempts": 1, "connect_timeout": 5.0}
        return open_store(
            uri, endpoint_url=s.endpoint_url, region=s.region, path_style=s.path_style, **options
        )

    def _saver(self):
        from storage.async_saver import AsyncSaver

        if getattr(self, "_async_saver", None) is None:
            self._async_saver = AsyncSaver(self._store(for_upload=True))
        return self._async_saver

    def load_checkpoint(self, root_uri: str, manifest_json: str) -> dict[str, Any]:
        """Restore this host's range from a committed checkpoint (any earlier host count)."""
        start = time.perf_counter()
        manifest = Manifest.from_json(manifest_json, root_uri)
        try:
            nbytes = self._load(CheckpointReader(self._store(root_uri), manifest), manifest)
        except CorruptCheckpointError as e:
            return {"ok": False, "error": str(e), "step": manifest.step}
        self.restored_from = f"{root_uri}/step-{manifest.step}"
        return {
            "ok": True,
            "step": manifest.step,
            "bytes_read": nbytes,
            "seconds": time.perf_counter() - start,
        }

    def _load(self, reader: CheckpointReader, manifest: Manifest) -> int:
        size = manifest.spaces.get(EXPERTS_SPACE)
        if size != self.space_size:
            raise CorruptCheckpointError(
                f"checkpoint step {manifest.step} has an experts space of {size} values, this "
                f"model's is {self.space_size}: the model's experts differ (model.n_expert, "
                "model.d_model, model.d_expert, model.n_layer)"
            )
        with torch.no_grad():
            self.flat_param.copy_(reader.read("param", self.lo, self.hi, space=EXPERTS_SPACE))
        state = {
            key: reader.read(key, self.lo, self.hi, space=EXPERTS_SPACE)
            for key in self.optimizer.spec.state_keys()
        }
        self.optimizer.load_state(state, manifest.optimizer["step_count"])
        self._drop()
        self._behind = False
        self.applied = manifest.step
        return reader.bytes_read

    def _restore_latest(self) -> None:
        """A host (re)placed during a run: the newest committed experts of this job, if any.

        The job's own checkpoints first; before its first one, the checkpoint
        it resumed from (``resume=<URI>``); else the seeded initialisation.
        """
        store = self._store()
        try:
            manifest = latest_manifest(store)
            resume = self.spec.resume
            if manifest is None and resume not in (None, "latest"):
                s = self.spec.storage
                store, manifest = resolve(
                    resume, endpoint_url=s.endpoint_url, region=s.region, path_style=s.path_style
                )
        except (StoreError, CorruptCheckpointError):  # nothing readable: the seeded init
            return
        if manifest is None or EXPERTS_SPACE not in manifest.spaces:
            return
        self._load(CheckpointReader(store, manifest), manifest)
        self.restored_from = f"{store.uri}/step-{manifest.step}"
        self._behind = True
