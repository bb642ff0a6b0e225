"""An optimizer over one flat tensor whose per-element state lives in an offload tier.

:class:`~collectives.optim.FlatOptimizer` keeps its state (Adam's two moments:
8 bytes per element, twice the fp32 parameters) beside the parameters. This
one keeps it in a :class:`~storage.tiers.Tier` (host memory, NVMe files) and
streams it through the step in chunks: for chunk ``i`` it waits for that
chunk's state (read ahead), updates the parameters and state of the chunk
with the very function ``FlatOptimizer`` runs over the whole tensor
(:func:`~collectives.optim.flat_update`, element-wise, so the results are the
same bits), hands the chunk back to the tier to write asynchronously, and
keeps the reads of the next ``prefetch`` chunks in flight meanwhile. Only
``prefetch + 1`` chunks of state, plus the writes in flight, are in memory.

Parameters and gradients stay where the engine keeps them. When they are on
a GPU, each chunk of state is copied to the device for the update and back
afterwards (from pinned host buffers).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from collectives.optim import (
    OPTIMIZER_NAMES,
    FlatOptimizer,
    FlatRead,
    OptimizerSpec,
    _split_sizes,
    _unknown,
    decay_ranges,
    flat_update,
    initial_state,
)
from storage.tiers import (
    ChunkGrid,
    HostTier,
    NvmeTier,
    OffloadError,
    Tier,
    TierFlat,
    chunk_numel_for,
)

__all__ = [
    "OffloadSpec",
    "OffloadedOptimizer",
    "build_offloaded_shard",
    "build_optimizer",
    "decay_ranges",
]


class OffloadedOptimizer:
    """AdamW, SGD or Yogi like ``FlatOptimizer``, its state in ``tier``, updated chunk by chunk.

    ``prefetch``: how many chunks' state is read ahead of the chunk being
    updated (0: each read waits). After a failed step (an I/O error) the
    state in the tier is partly updated, so every later call raises that
    error: the job goes back to its last checkpoint.

    With ``param_tier`` (ZeRO-3 with ``offload.params``) the parameters and
    gradients are not tensors of the engine's either: ``flat_param`` and
    ``flat_grad`` are None and both live in ``param_tier`` as ``param`` and
    ``grad`` (``numel`` elements, chunks ending at ``cuts`` too, so that a
    ZeRO-3 unit's piece is whole chunks). The engine reads a unit's piece
    with :meth:`read_param` and adds reduced gradients with :meth:`add_grad`;
    the step streams parameters, gradients and state through the same
    update, writing parameters and state back.
    """

    def __init__(
        self,
        spec: OptimizerSpec,
        flat_param: torch.Tensor | None,
        flat_grad: torch.Tensor | None,
        *,
        decayed: Sequence[tuple[int, int]],
        tier: Tier,
        prefetch: int = 1,
        param_tier: Tier | None = None,
        numel: int | None = None,
        cuts: tuple[int, ...] = (),
    ):
        if spec.name not in OPTIMIZER_NAMES:
            raise _unknown(spec.name)
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        if (param_tier is None) != (flat_param is not None):
            raise ValueError("give flat_param and flat_grad, or param_tier (not both)")
        self.spec = spec
        self.param = flat_param
        self.grad = flat_grad
        self.tier = tier
        self.param_tier = param_tier
        self.prefetch = prefetch
        numel = flat_param.numel() if flat_param is not None else int(numel)
        self.grid = ChunkGrid(numel, tier.chunk_numel, tuple(cuts))
        # Per chunk: the kept / decayed split, and (parameters in memory) the decayed
        # views of the parameter, made once (it is updated in place, never replaced).
        self._splits: list[list[int]] = []
        self._decayed_param: list[list[torch.Tensor]] = []
        for i in range(self.grid.n_chunks):
            lo, hi = self.grid.bounds(i)
            runs = [(max(a, lo) - lo, min(b, hi) - lo) for a, b in decayed if a < hi and b > lo]
            split = _split_sizes(runs, hi - lo)
            self._splits.append(split)
            if flat_param is not None:
                self._decayed_param.append(list(flat_param[lo:hi].split(split)[1::2]))
        self._start = initial_state(spec)
        for key, value in self._start.items():
            tier.allocate(key, self.grid.numel, value, self.grid.cuts)
        if param_tier is not None:
            # Written before first read: parameters by the engine, gradients by add_grad.
            param_tier.allocate("param", numel, None, self.grid.cuts)
            param_tier.allocate("grad", numel, None, self.grid.cuts)
        # Gradient chunks written since zero_grad(), each with its squared norm, and
        # the writes not known to be finished.
        self._grad_sq: dict[int, float] = {}
        self._grad_writes: list[Future[None]] = []
        self._steps = 0
        self._failed: BaseException | None = None
        # Seconds the last step waited on the tier (reads not yet in, writes not yet
        # out): what prefetching is meant to hide (reported as offload_wait_s).
        self.last_io_wait_s = 0.0

    @property
    def step_count(self) -> int:
        return self._steps

    @property
    def params_offloaded(self) -> bool:
        return self.param_tier is not None

    def _ok(self) -> None:
        if self._failed is not None:
            raise OffloadError(
                f"optimizer state in {self.tier.kind} tier is unusable after an earlier error: "
                f"{self._failed}"
            )

    @torch.no_grad()
    def step(self, lr: float, grad_scale: torch.Tensor | None = None) -> None:
        """One update; ``grad_scale`` (clipping) multiplies gradients read from ``param_tier``."""
        self._ok()
        self._steps += 1
        try:
            waited = self._wait_grad_writes()
            self._stream(lambda i, c: self._update(i, c, lr, grad_scale), write=self._written())
            self.last_io_wait_s += waited
        except BaseException as e:
            self._failed = e
            raise

    def _written(self) -> tuple[str, ...]:
        """What a step writes back: the state, and the parameters when they live in a tier."""
        return (*self._start, *(("param",) if self.params_offloaded else ()))

    def _update(
        self, i: int, chunk: dict[str, torch.Tensor], lr: float, grad_scale: torch.Tensor | None
    ) -> None:
        lo, hi = self.grid.bounds(i)
        if self.params_offloaded:
            param, grad = chunk.pop("param"), chunk.pop("grad")
            if grad_scale is not None:
                grad.mul_(grad_scale)
            decayed = list(param.split(self._splits[i])[1::2])
        else:
            param, grad = self.param[lo:hi], self.grad[lo:hi]
            decayed = self._decayed_param[i]
        on = {k: t.to(param.device, non_blocking=True) for k, t in chunk.items()}
        flat_update(self.spec, self._steps, lr, param, grad, on, decayed, self._splits[i])
        for k, t in on.items():
            if t is not chunk[k]:
                chunk[k].copy_(t)  # synchronous: the write-back must see the update

    def _tier_of(self, key: str) -> Tier:
        return self.param_tier if key in ("param", "grad") else self.tier

    def _read(self, key: str, i: int) -> Future[torch.Tensor]:
        if key == "grad" and i not in self._grad_sq:  # no gradient reached it this step
            done: Future[torch.Tensor] = Future()
            done.set_result(self.param_tier.buffer().zero_())
            return done
        return self._tier_of(key).read(key, i)

    def _stream(self, work, *, write: tuple[str, ...]) -> None:
        """Run ``work(i, chunks)`` over every chunk, reading ``prefetch`` chunks ahead.

        ``chunks`` maps each state name (and ``param``/``grad`` when they are
        in a tier) to the chunk's elements (a host buffer from the tier,
        trimmed to the chunk); the keys in ``write`` are written back after
        ``work``, asynchronously, the others given back.
        """
        keys = list(self._start) + (["param", "grad"] if self.params_offloaded else [])
        n = self.grid.n_chunks
        if not keys:  # SGD without momentum keeps no state: nothing to move
            for i in range(n):
                work(i, {})
            return
        reads: dict[int, dict[str, Future[torch.Tensor]]] = {}
        writes: list[Future[None]] = []
        waited = 0.0
        try:
            for i in range(n):
                for j in range(i, min(n, i + self.prefetch + 1)):
                    if j not in reads:
                        reads[j] = {k: self._read(k, j) for k in keys}
                t0 = time.perf_counter()
                bufs = {k: f.result() for k, f in reads.pop(i).items()}
                waited += time.perf_counter() - t0
                lo, hi = self.grid.bounds(i)
                work(i, {k: b[: hi - lo] for k, b in bufs.items()})
                for k, b in bufs.items():
                    if k in write:
                        writes.append(self._tier_of(k).write(k, i, b))
                    else:
                        self._tier_of(k).discard(b)
                for f in writes:
                    if f.done() and f.exception() is not None:
                        raise f.exception()  # fail fast: a full disk stays full
        finally:
            for pending in reads.values():  # an error left reads in flight: let them end
                for k, f in pending.items():
                    if f.exception() is None:
                        self._tier_of(k).discard(f.result())
            t0 = time.perf_counter()
            for f in writes:
                f.exception()  # wait, so no write outlives the step
            self.last_io_wait_s = waited + time.perf_counter() - t0
        for f in writes:
            if f.exception() is not None:
                raise f.exception()

    # -- parameters and gradients in a tier (ZeRO-3 with offload.params) -------------

    def read_param(self, lo: int, hi: int, device: torch.device | None = None) -> torch.Tensor:
        """Parameters ``[lo, hi)`` of the flat shard as a new tensor (on ``device``)."""
        self._ok()
        out = TierFlat(self.param_tier, "param", lo, hi).clone()
        return out if device is None or device.type == "cpu" else out.to(device)

    def put_param(self, lo: int, hi: int, values: torch.Tensor) -> None:
        """Store parameters ``[lo, hi)`` (whole chunks), waiting until they are written."""
        self._ok()
        futures = []
        for c in self.grid.chunks_of(lo, hi):
            a, b = self._whole_chunk(c, lo, hi)
            futures.append(self.param_tier.put("param", c, values[a - lo : b - lo]))
        for f in futures:
            f.result()

    def add_grad(self, lo: int, hi: int, values: torch.Tensor) -> None:
        """Add ``values`` to gradients ``[lo, hi)`` (whole chunks); written asynchronously.

        A chunk's first gradient since :meth:`zero_grad` is written as it is;
        a later one (more micro-batches) is read back, added and written.
        """
        self._ok()
        for c in self.grid.chunks_of(lo, hi):
            a, b = self._whole_chunk(c, lo, hi)
            part = values[a - lo : b - lo]
            if c in self._grad_sq:
                self._wait_grad_writes()  # the read must see the last write
                buf = self.param_tier.read("grad", c).result()
                total = buf[: b - a]
                total.add_(part.to(total.device))
                self._grad_sq[c] = float(total.double().pow(2).sum())
                self._grad_writes.append(self.param_tier.write("grad", c, buf))
            else:
                self._grad_sq[c] = float(part.double().pow(2).sum())
                self._grad_writes.append(self.param_tier.put("grad", c, part))

    def _whole_chunk(self, c: int, lo: int, hi: int) -> tuple[int, int]:
        a, b = self.grid.bounds(c)
        if a < lo or b > hi:
            raise ValueError(f"[{lo}, {hi}) does not cover chunk {c} = [{a}, {b}) whole")
        return a, b

    def grad_sq_norm(self) -> float:
        """The squared norm of the gradients added since :meth:`zero_grad`."""
        return sum(self._grad_sq.values())

    def zero_grad(self) -> None:
        """Forget the gradients in the tier (nothing is written: unwritten chunks are zero)."""
        self._wait_grad_writes()
        self._grad_sq.clear()

    def _wait_grad_writes(self) -> float:
        t0 = time.perf_counter()
        writes, self._grad_writes = self._grad_writes, []
        for f in writes:
            f.result()
        return time.perf_counter() - t0

    def param_flat(self) -> torch.Tensor | TierFlat:
        """All parameters of the shard (a tensor, or a handle read chunk by chunk)."""
        return self.param if self.param is not None else self.param_tier.flat("param")

    # -- state -----------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor | TierFlat]:
        """The flat per-element state: tensors (host tier) or handles read chunk by chunk."""
        return {key: self.tier.flat(key) for key in self._start}

    def load_state(self, tensors: dict[str, torch.Tensor], step_count: int) -> None:
        """Restore per-element state (each the length of this optimizer's flat tensor)."""
        for key in self._start:
            if key not in tensors:
                raise KeyError(f"optimizer state {key!r} missing from checkpoint")
        self.load_from(lambda key, lo, hi: tensors[key][lo:hi], 0, step_count)

    @torch.no_grad()
    def load_from(self, read: FlatRead, offset: int, step_count: int) -> None:
        """Restore state from ``read(key, lo, hi)`` chunk by chunk (element 0 at ``offset``).

        With the parameters in a tier, ``param`` is read into it as well.
        """
        self._ok()

        def fill(i: int, chunk: dict[str, torch.Tensor]) -> None:
            lo, hi = self.grid.bounds(i)
            for key in self._written():
                chunk[key].copy_(read(key, offset + lo, offset + hi))

        try:
            self.zero_grad()
            self._stream(fill, write=self._written())
        except BaseException as e:
            self._failed = e
            raise
        self._steps = step_count

    def set_step_count(self, steps: int) -> None:
        """Count ``steps`` steps taken (Adam's bias correction follows the count)."""
        self._steps = steps

    def state_bytes(self) -> int:
        return 4 * self.grid.numel * len(self._start)

    def close(self) -> None:
        """Remove the state from its tiers (their files, their memory)."""
        self._wait_grad_writes_quietly()
        self.tier.close()
        if self.param_tier is not None and self.param_tier is not self.tier:
            self.param_tier.close()

    def _wait_grad_writes_quietly(self) -> None:
        for f in self._grad_writes:
            f.exception()
        self._grad_writes = []


@dataclass(frozen=True)
class OffloadSpec:
    """Where a data-parallel engine keeps its state off the device (the ``offload`` config).

    ``optimizer``: ``none`` (beside the parameters, a plain ``FlatOptimizer``),
    ``host`` or ``nvme``. ``params`` (ZeRO-3 only, with the optimizer state
    offloaded): ``none``, or ``host``/``nvme`` for the shard's parameters and
    gradients. Budgets in bytes, 0: no limit of the tier's own; one budget
    per kind of tier, so a host tier or an NVMe tier holding both is one tier.
    """

    optimizer: str = "none"
    nvme_path: str | None = None
    job_id: str = "job"
    host_bytes: int = 0
    nvme_bytes: int = 0
    chunk_mb: float = 16.0
    prefetch: int = 1
    params: str = "none"

    def tier(self, rank: int, n_states: int, kind: str | None = None) -> Tier:
        """A fresh tier of ``kind`` (default: the ``optimizer`` placement) for rank ``rank``."""
        kind = self.optimizer if kind is None else kind
        chunk = chunk_numel_for(self.chunk_mb)
        if kind == "host":
            return HostTier(chunk, self.host_bytes)
        if kind == "nvme":
            if not self.nvme_path:
                raise ValueError("offload to nvme needs offload.nvme_path")
            # Reads ahead plus the writes behind them, for every tensor streamed
            # (the state's, and parameters and gradients when they are offloaded too).
            streamed = max(1, n_states) + (2 if self.params != "none" else 0)
            inflight = (self.prefetch + 2) * streamed * chunk * 4
            return NvmeTier(
                self.nvme_path, self.job_id, rank, chunk, self.nvme_bytes, inflight_bytes=inflight
            )
        raise ValueError(f"offload placement must be none, host or nvme; got {kind!r}")


def build_optimizer(
    spec: OptimizerSpec,
    flat_param: torch.Tensor,
    flat_grad: torch.Tensor,
    *,
    decayed: Sequence[tuple[int, int]],
    offload: OffloadSpec | None = None,
    rank: int = 0,
) -> FlatOptimizer | OffloadedOptimizer:
    """The engine's optimizer: state beside the parameters, or in the tier ``offload`` names."""
    if offload is None or offload.optimizer == "none":
        return FlatOptimizer(spec, flat_param, flat_grad, decayed=decayed)
    tier = offload.tier(rank, len(spec.state_keys()))
    try:
        return OffloadedOptimizer(
            spec, flat_param, flat_grad, decayed=decayed, tier=tier, prefetch=offload.prefetch
        )
    except BaseException:
        tier.close()  # refused (a budget, a full disk): leave no files behind
        raise


def build_offloaded_shard(
    spec: OptimizerSpec,
    numel: int,
    *,
    cuts: tuple[int, ...],
    decayed: Sequence[tuple[int, int]],
    offload: OffloadSpec,
    rank: int = 0,
) -> OffloadedOptimizer:
    """ZeRO-3 with ``offload.params``: parameters, gradients and state of a shard in tiers.

    One tier per kind: parameters in ``host`` and state in ``host`` share one.
    """
    if offload.params == "none" or offload.optimizer == "none":
        raise ValueError(
            "parameters go off the worker only with the optimizer state: offload.params="
            f"{offload.params} needs offload.optimizer=host or nvme (got {offload.optimizer})"
        )
    n_states = len(spec.state_keys())
    tiers: list[Tier] = []
    try:
        tiers.append(offload.tier(rank, n_states))
        if offload.params == offload.optimizer:
            tiers.append(tiers[0])
        else:
            tiers.append(offload.tier(rank, n_states, kind=offload.params))
        return OffloadedOptimizer(
            spec,
            None,
            None,
            decayed=decayed,
            tier=tiers[0],
            prefetch=offload.prefetch,
            param_tier=tiers[1],
            numel=numel,
            cuts=cuts,
        )
    except BaseException:
        for t in tiers:
            t.close()  # refused (a budget, a full disk): leave no files behind
        raise


def optimizer_bytes(optimizer: FlatOptimizer | OffloadedOptimizer) -> dict[str, int]:
    """``memory_bytes()`` entries for an engine's optimizer state.

    ``optimizer``: bytes in the process's memory (host or device);
    ``optimizer_nvme``: bytes in NVMe files. State in the host tier is memory.
    """
    if isinstance(optimizer, OffloadedOptimizer) and optimizer.tier.kind == "nvme":
        return {"optimizer": 0, "optimizer_nvme": optimizer.state_bytes()}
    return {"optimizer": optimizer.state_bytes()}
