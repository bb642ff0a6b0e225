"""The data-parallel worker's runtime: one rank's model replica (or shard) and its steps.

This is a plain class so tests can drive it in one process; ``MemberActor``
(``actors/member.py``) hosts it in a Ray actor, role ``worker``. The controller decides
*what* happens (which step, which learning rate, which samples, when to save);
the runtime only does it.
"""

from __future__ import annotations

import os
import resource
import socket
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from actors.elastic_state import ElasticState
from actors.memory import fix_mmap_threshold, worker_available_bytes
from actors.prefetch import BatchPrefetcher
from actors.task import build_model, make_task
from collectives.ddp import DDPEngine
from collectives.errors import PeerLostError, classify_peer_loss
from collectives.offloaded_optim import OffloadSpec
from collectives.optim import OptimizerSpec
from collectives.process_group import Rendezvous, host_store, join_group, leave_group
from collectives.zero import ZeroEngine, build_engine
from orchestrator.schema import params_leave_worker
from orchestrator.spec import JobSpec
from storage.checkpoint import CheckpointReader, CorruptCheckpointError, Manifest
from storage.object_store import open_store


@dataclass(frozen=True)
class WorkerInfo:
    rank: int
    pid: int
    host: str
    node_ip: str
    device: str
    threads: int


@dataclass(frozen=True)
class StepResult:
    step: int
    rank: int
    loss_sum: float  # summed loss of this rank's samples (the task's units: tokens, rows)
    n_units: int  # what loss_sum sums over (the loss's count)
    n_samples: int  # rows of the global batch this rank trained on
    n_tokens: int  # input tokens trained on (lm), else 0
    grad_norm: float
    compute_s: float  # forward + backward
    comm_wait_s: float  # waiting for gradient reduction after backward
    step_s: float
    peak_rss: int  # bytes, this worker process's high-water mark so far
    # The optimizer step waiting on offloaded state (None: the state is not offloaded).
    io_wait_s: float | None = None
    data_s: float = 0.0  # waiting for this step's batch (read ahead: ~0)


def optimizer_spec(spec: JobSpec) -> OptimizerSpec:
    t = spec.train
    return OptimizerSpec(
        name=t.optimizer,
        weight_decay=t.weight_decay,
        beta1=t.beta1,
        beta2=t.beta2,
        momentum=t.momentum,
    )


def offload_spec(spec: JobSpec, device: torch.device) -> OffloadSpec:
    """The engine's offload settings from the job's ``offload`` section, for a worker on ``device``.

    ``offload.params=host`` on a CPU worker is where its parameters are already:
    nothing moves.
    """
    o = spec.offload
    params = o.params if params_leave_worker(o.params, on_gpu=device.type != "cpu") else "none"
    return OffloadSpec(
        params=params,
        optimizer=o.optimizer,
        nvme_path=o.nvme_path,
        job_id=spec.job_id,
        host_bytes=o.host_bytes,
        nvme_bytes=o.nvme_bytes,
        chunk_mb=o.chunk_mb,
        prefetch=o.prefetch,
    )


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class DataParallelRuntime(ElasticState):
    """One data-parallel worker; its rank is given anew by every epoch's ``setup``.

    ``CONTROL_METHODS`` run on the actor's control thread, beside a step
    that may be stuck in a collective whose peers are gone.

    Call order: ``setup``, then ``train_step`` (and save/load) any number of
    times; after a membership change ``leave_epoch``, ``setup`` again and
    ``restore_from_pieces``; finally ``shutdown``.
    """

    CONTROL_METHODS = ("holdings", "export_piece")

    def __init__(self, spec: JobSpec, worker_id: int, data: Any):
        self.spec = spec
        self.worker_id = worker_id  # stable for the worker's life, unlike its rank
        self.rank = -1
        self._bounds: list[tuple[int, int]] | None = None
        self.data = data  # the job's dataset (actors/datasets.py), mapped from Ray's object store
        self.task = make_task(spec.task, data, spec.seq_len)
        # The next step's rows are read while this one trains (actors/prefetch.py).
        self._batches = BatchPrefetcher(self._read_batch, enabled=spec.train.prefetch)
        self._store = None
        self._rdzv_store: torch.distributed.TCPStore | None = None
        self.engine: DDPEngine | ZeroEngine | None = None
        torch.set_num_threads(max(1, int(spec.cluster.cpus_per_worker)))
        use_cuda = spec.cluster.gpus_per_worker > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")

    # -- lifecycle ----------------------------------------------------------

    def host_rendezvous(self, world_size: int) -> tuple[str, int]:
        """Rank 0 only: host the rendezvous store; returns ``(host, port)`` for the other ranks."""
        import ray

        host = ray.util.get_node_ip_address()
        self._rdzv_store = host_store(host, world_size, self.spec.cluster.collective_timeout_s)
        return host, self._rdzv_store.port

    @classify_peer_loss(on_loss=lambda self: leave_group())
    def setup(
        self, rdzv: Rendezvous, shard_bounds: list[tuple[int, int]] | None, rank: int
    ) -> WorkerInfo:
        """Join this epoch's process group as ``rank``; build the model and engine.

        Every rank builds the model from the same seed, so a fresh job starts
        from identical replicas; a later epoch overwrites it with
        ``restore_from_pieces``. ``shard_bounds`` (ZeRO only) are the planner's
        flat ranges, one per rank.
        """
        self.rank = rank
        self._bounds = shard_bounds
        join_group(rdzv, rank, self._rdzv_store if rank == 0 else None)
        self._start_epoch(rdzv.world_size)
        torch.manual_seed(self.spec.train.seed)
        offload = offload_spec(self.spec, self.device)
        init_seed = None
        if offload.params != "none" and self._engine_strategy == "zero3":
            # The whole model never sits in this worker's memory: built on the meta
            # device, initialised unit by unit into the tier (collectives/lazy_init.py).
            with torch.device("meta"):
                model = self._build_model()
            init_seed = self.spec.train.seed
            fix_mmap_threshold()  # freed block buffers go back to the system
        else:
            model = self._build_model().to(self.device)
        self._close_engine()  # the last epoch's offloaded state (its files) goes first
        self.engine = build_engine(
            self._engine_strategy,
            model,
            self._optimizer_spec(),
            grad_clip=self._grad_clip,
            bucket_mb=self.spec.strategy.bucket_mb,
            shard_bounds=shard_bounds,
            offload=offload,
            init_seed=init_seed,
        )
        return self._ready_to_train()

    def _build_model(self) -> torch.nn.Module:
        """The model this rank trains (seeded by the caller, so every rank builds the same)."""
        return build_model(self.spec.model, self.data.facts)

    @property
    def _engine_strategy(self) -> str:
        """How the engine holds the state: ``ddp`` or a ZeRO stage."""
        return self.spec.strategy.name

    def _optimizer_spec(self) -> OptimizerSpec:
        """The optimizer the engine steps with (``train.optimizer`` and its settings)."""
        return optimizer_spec(self.spec)

    @property
    def _grad_clip(self) -> float:
        """The engine's global-norm clip (0: none)."""
        return self.spec.train.grad_clip

    def _ready_to_train(self) -> WorkerInfo:
        """The end of every epoch set-up: a per-rank random stream, and who this rank is."""
        # Per-rank stream for dropout and the like, different on every rank.
        torch.manual_seed(self.spec.train.seed * 1_000_003 + self.rank)
        import ray

        return WorkerInfo(
            rank=self.rank,
            pid=os.getpid(),
            host=socket.gethostname(),
            node_ip=ray.util.get_node_ip_address(),
            device=str(self.device),
            threads=torch.get_num_threads(),
        )

    def shutdown(self) -> None:
        self._batches.close()
        self._close_engine()
        leave_group()

    def _close_engine(self) -> None:
        if self.engine is not None:
            close = getattr(self.engine, "close", None)  # subclasses' engines may have none
            if close is not None:
                close()
            self.engine = None

    def probe(self) -> dict[str, Any]:
        """What the planner needs before the group forms: pid, node, this worker's memory budget."""
        import ray

        return {
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "available_memory": worker_available_bytes(self.device),
        }

    # -- training -----------------------------------------------------------

    @classify_peer_loss(on_loss=lambda self: self._abort_epoch())
    def train_step(self, step: int, lr: float, batch_lo: int, batch_hi: int) -> StepResult:
        """One optimizer step on samples ``[batch_lo, batch_hi)`` of global batch ``step``.

        If a collective fails (a peer is gone), this rank leaves the process
        group and raises ``PeerLostError``, so the other survivors are not left
        waiting and the controller knows this rank survived. Any other error
        (the model's, the data's) is raised as it is: the job fails on it.
        """
        if not torch.distributed.is_initialized():
            raise PeerLostError("peer failure earlier in this epoch: the process group is gone")
        return self._train_step(step, lr, batch_lo, batch_hi)

    def _read_batch(self, step: int, lo: int, hi: int) -> dict[str, torch.Tensor]:
        """Rows ``[lo, hi)`` of step ``step``'s global batch, on the host (any thread)."""
        t = self.spec.train
        return self.task.batch(self.data, t.seed, step, t.global_batch, lo, hi)

    def _train_step(self, step: int, lr: float, batch_lo: int, batch_hi: int) -> StepResult:
        t, task = self.spec.train, self.task
        start = time.perf_counter()
        batch, data_s = self._batches.get(step, batch_lo, batch_hi)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        n = batch_hi - batch_lo
        # Scaled by a constant every rank knows (the global batch's units):
        # summed over ranks, the gradients are exactly the global-batch mean
        # gradient, even when ranks hold different numbers of samples.
        scale = t.global_batch * task.units_per_sample
        engine = self.engine
        engine.zero_grad()
        micro = np.array_split(np.arange(n), min(t.micro_batches, n))
        bf16 = t.precision == "bf16"
        loss_sum, units = 0.0, 0
        for i, rows in enumerate(micro):
            rows_t = torch.from_numpy(rows).to(self.device)
            part = {k: v[rows_t] for k, v in batch.items()}
            # bf16: matmuls and activations in bfloat16, while parameters,
            # gradients and optimizer state stay fp32 (the master weights).
            with torch.autocast(self.device.type, torch.bfloat16, enabled=bf16):
                objective, loss, count = task.objective(engine.model, part)
            engine.backward(objective.float() / scale, sync=i == len(micro) - 1)
            loss_sum += float(loss.detach())
            units += count
        compute_s = time.perf_counter() - start - data_s
        # A ZeRO step updates this rank's shard before its last collective (the
        # all-gather), so if that fails the live shard is neither before nor
        # after the step; DDP's update follows its last collective.
        self._before_update()
        self._live_valid = not self._sharded
        stats = engine.step(lr)
        self._live_valid = True
        self._after_step(step + 1)
        if not np.isfinite(loss_sum):
            raise FloatingPointError(
                f"rank {self.rank}: loss is {loss_sum} at step {step}; lower train.lr or set "
                "train.grad_clip"
            )
        return StepResult(
            step=step,
            rank=self.rank,
            loss_sum=loss_sum,
            n_units=units,
            n_samples=n,
            n_tokens=n * task.seq_len if task.type == "lm" else 0,
            grad_norm=stats.grad_norm,
            compute_s=compute_s,
            comm_wait_s=stats.comm_wait_s,
            step_s=time.perf_counter() - start,
            peak_rss=peak_rss_bytes(),
            io_wait_s=getattr(engine.optimizer, "last_io_wait_s", None),
            data_s=data_s,
        )

    # -- checkpoints --------------------------------------------------------

    def _checkpoint_store(self, for_upload: bool = False):
        """The checkpoint store; ``for_upload``: one whose S3 client gives up quickly.

        Uploads are retried, with backoff, by ``AsyncSaver``, whose waits a
        newer checkpoint can cut short; botocore's own long retry loop could
        not be interrupted, so the upload store keeps it short.
        """
        attr = "_upload_store" if for_upload else "_store"
        if getattr(self, attr, None) is None:
            s = self.spec.storage
            options: dict[str, Any] = {}
            if for_upload and self.spec.checkpoint.uri.startswith("s3://"):
                options = {"max_attempts": 2, "op_attempts": 1, "connect_timeout": 5.0}
            setattr(
                self,
                attr,
                open_store(
                    self.spec.checkpoint.uri,
                    endpoint_url=s.endpoint_url,
                    region=s.region,
                    path_style=s.path_style,
                    **options,
                ),
            )
        return getattr(self, attr)

    def _saver(self):
        """This rank's ``AsyncSaver`` (one in-flight upload; see its policy), made on first use."""
        from storage.async_saver import AsyncSaver

        if getattr(self, "_async_saver", None) is None:
            self._async_saver = AsyncSaver(self._checkpoint_store(for_upload=True))
        return self._async_saver

    def save_shard(self, step: int, save_id: str = "") -> dict[str, Any]:
        """Snapshot this rank's slice of the state for ``step``; upload it in the background.

        Returns a ``SaveTicket`` as a dict (``blocked_s``, ``wait_s``,
        ``copy_s``, ``nbytes``) as soon as the snapshot is in host memory.
        If the previous upload is still running this first waits for it (the
        policy of ``storage.async_saver``). The outcome arrives later through
        ``checkpoint_done(step)``. Never raises for a store error.
        """
        lo, hi, tensors = self.engine.checkpoint_slice()
        tensors = {**tensors, **self._extra_state(lo, hi)}
        ticket = self._saver().save(
            step, self.rank, lo, hi, tensors, torch.get_rng_state(), save_id=save_id
        )
        return asdict(ticket)

    def checkpoint_done(self, step: int, save_id: str | None = None) -> dict[str, Any] | None:
        """The outcome of ``step``'s upload (``UploadResult`` as a dict) once it has finished.

        None while it is still running. Never blocks, so the controller can
        poll between training steps. A result is handed out once.
        """
        saver = getattr(self, "_async_saver", None)
        result = saver.result(step, save_id=save_id) if saver is not None else None
        return asdict(result) if result is not None else None

    def load_checkpoint(self, root_uri: str, manifest_json: str) -> dict[str, Any]:
        """Restore state from a committed checkpoint (any world size, shard weights or stage).

        Reads only the byte ranges this rank needs, each verified against the
        manifest's chunk checksums. Returns ``{"ok": True, "step", "bytes_read",
        "seconds"}``; on a checksum mismatch or truncated shard returns
        ``{"ok": False, "error"}`` naming the object instead of raising, so
        the controller can fall back to an older checkpoint (state may then be
        half-loaded: the next load overwrites all of it). Store errors raise.
        """
        start = time.perf_counter()
        s = self.spec.storage
        store = open_store(
            root_uri, endpoint_url=s.endpoint_url, region=s.region, path_style=s.path_style
        )
        manifest = Manifest.from_json(manifest_json, root_uri)
        reader = CheckpointReader(store, manifest)
        world = self.engine.world_size
        try:
            self.engine.load_state(reader.read, manifest.optimizer["step_count"])
            self._load_extra_state(reader.read, manifest.step)
            # Old ranks' RNG states are read (and so verified) even when unused
            # at another world size: the ranks together then check every byte.
            rngs = {
                old: reader.rng_state(old) for old in range(self.rank, manifest.world_size, world)
            }
        except CorruptCheckpointError as e:
            return {"ok": False, "error": str(e), "step": manifest.step}
        rng = rngs.get(self.rank) if manifest.world_size == world else None
        if rng is not None:
            torch.set_rng_state(rng)
        return {
            "ok": True,
            "step": manifest.step,
            "bytes_read": reader.bytes_read,
            "seconds": time.perf_counter() - start,
        }

    def _extra_state(self, lo: int, hi: int) -> dict[str, torch.Tensor]:
        """More flat state of this rank's range ``[lo, hi)`` to checkpoint (none by default).

        Each tensor is the ``[lo, hi)`` slice of a flat tensor the size of
        the parameters, saved beside them (e.g. a federated server's control
        variate).
        """
        return {}

    def _load_extra_state(self, read: Any, step: int) -> None:
        """Restore what ``_extra_state`` saved (``read(key, lo, hi)``), at checkpoint ``step``."""

    # -- reporting ----------------------------------------------------------

    def memory_report(self) -> dict[str, int]:
        """Bytes of state this rank holds, and its peak resident set size."""
        report = dict(self.engine.memory_bytes())
        report["peak_rss"] = peak_rss_bytes()
        return report

    def layout_json(self) -> list[dict]:
        return self.engine.layout.to_json()

    def evaluate(self, bounds: list[tuple[int, int]]) -> dict[str, float]:
        """This rank's sums over its rows ``bounds[rank]`` of each held-out batch.

        A collective under ZeRO-3 (each forward gathers parameters): every
        rank calls it with the same ``bounds`` and runs the same forwards.
        """
        task, model = self.task, self.engine.model
        self._batches.wait()  # the dataset is used from one thread at a time
        items = [
            ({k: v.to(self.device) for k, v in part.items()}, counted)
            for part, counted in self._eval_parts(*bounds[self.rank])
        ]
        was_training = model.training
        model.eval()
        try:
            return task.evaluate(model, items)
        finally:
            model.train(was_training)

    def _eval_parts(self, lo: int, hi: int) -> list[tuple[dict[str, torch.Tensor], bool]]:
        """Rows ``[lo, hi)`` of each held-out batch, as ``(part, counted)`` on the host.

        Rows are split as the training batch is, scaled to each batch's size
        (the last may be short). A share with no rows gets one stand-in row,
        ``counted`` False (see ``Task.evaluate``).
        """
        t, task = self.spec.train, self.task
        parts = []
        for rows in self.data.eval_batches(t.global_batch, task.seq_len, t.eval_batches):
            batch = self.data.eval_batch(rows, task.seq_len)
            a, b = (lo * len(rows)) // t.global_batch, (hi * len(rows)) // t.global_batch
            counted = b > a
            parts.append(({k: (v[a:b] if counted else v[:1]) for k, v in batch.items()}, counted))
        return parts

    def generate(
        self, prompt: str, n_tokens: int, temperature: float = 0.8, seed: int = 0
    ) -> str | None:
        """Continue ``prompt`` with the trained model (language models with a text codec only).

        A collective: every rank must call it; rank 0 returns the text, the
        others (and a task without text) ``None``.
        """
        state = self.engine.full_state_dict()
        if self.rank != 0:
            return None
        model = build_model(self.spec.model, self.data.facts)
        model.load_state_dict(state)
        return self._sample(model, prompt, n_tokens, temperature, seed)

    def _sample(
        self, model: torch.nn.Module, prompt: str, n_tokens: int, temperature: float, seed: int
    ) -> str | None:
        """``prompt`` continued by ``model`` (None: the task produces no text)."""
        prompt_ids = self.data.encode(prompt) if self.task.type == "lm" else None
        if prompt_ids is None:
            return None
        model.eval()
        seq_len = self.task.seq_len
        gen = torch.Generator().manual_seed(seed)
        ids = prompt_ids or [0]
        with torch.no_grad():
            for _ in range(n_tokens):
                context = torch.tensor([ids[-seq_len:]])
                logits = model(context)[0, -1] / max(temperature, 1e-5)
                ids.append(int(torch.multinomial(F.softmax(logits, dim=-1), 1, generator=gen)))
        return self.data.decode(ids)
