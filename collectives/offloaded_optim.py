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

__all__ = ["OffloadSpec", "OffloadedOptimizer", "build_optimizer", "decay_ranges"]


class OffloadedOptimizer:
    """AdamW, SGD or Yogi like ``FlatOptimizer``, its state in ``tier``, updated chunk by chunk.

    ``prefetch``: how many chunks' state is read ahead of the chunk being
    updated (0: each read waits). After a failed step (an I/O error) the
    state in the tier is partly updated, so every later call raises that
    error: the job goes back to its last checkpoint.
    """

    def __init__(
        self,
        spec: OptimizerSpec,
        flat_param: torch.Tensor,
        flat_grad: torch.Tensor,
        *,
        decayed: Sequence[tuple[int, int]],
        tier: Tier,
        prefetch: int = 1,
    ):
        if spec.name not in OPTIMIZER_NAMES:
            raise _unknown(spec.name)
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        self.spec = spec
        self.param = flat_param
        self.grad = flat_grad
        self.tier = tier
        self.prefetch = prefetch
        self.grid = ChunkGrid(flat_param.numel(), tier.chunk_numel)
        # Per chunk: the kept / decayed split and the decayed views of the parameter,
        # made once (the parameter is updated in place, never replaced).
        self._splits: list[list[int]] = []
        self._decayed_param: list[list[torch.Tensor]] = []
        for i in range(self.grid.n_chunks):
            lo, hi = self.grid.bounds(i)
            runs = [(max(a, lo) - lo, min(b, hi) - lo) for a, b in decayed if a < hi and b > lo]
            split = _split_sizes(runs, hi - lo)
            self._splits.append(split)
            self._decayed_param.append(list(flat_param[lo:hi].split(split)[1::2]))
        self._start = initial_state(spec)
        for key, value in self._start.items():
            tier.allocate(key, self.grid.numel, value)
        self._steps = 0
        self._failed: BaseException | None = None
        # Seconds the last step waited on the tier (reads not yet in, writes not yet
        # out): what prefetching is meant to hide (reported as offload_wait_s).
        self.last_io_wait_s = 0.0

    @property
    def step_count(self) -> int:
        return self._steps

    def _ok(self) -> None:
        if self._failed is not None:
            raise OffloadError(
                f"optimizer state in {self.tier.kind} tier is unusable after an earlier error: "
                f"{self._failed}"
            )

    @torch.no_grad()
    def step(self, lr: float) -> None:
        self._ok()
        self._steps += 1
        try:
            self._stream(lambda i, state: self._update(i, state, lr), write=True)
        except BaseException as e:
            self._failed = e
            raise

    def _update(self, i: int, state: dict[str, torch.Tensor], lr: float) -> None:
        lo, hi = self.grid.bounds(i)
        param, grad = self.param[lo:hi], self.grad[lo:hi]
        on = {k: t.to(param.device, non_blocking=True) for k, t in state.items()}
        flat_update(
            self.spec, self._steps, lr, param, grad, on, self._decayed_param[i], self._splits[i]
        )
        for k, t in on.items():
            if t is not state[k]:
                state[k].copy_(t)  # synchronous: the write-back must see the update

    def _stream(self, work, *, write: bool) -> None:
        """Run ``work(i, state_chunks)`` over every chunk, reading ``prefetch`` chunks ahead.

        ``state_chunks`` maps each state name to the chunk's elements (a host
        buffer from the tier, trimmed to the chunk); with ``write`` they are
        written back after ``work``, asynchronously.
        """
        keys = list(self._start)
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
                        reads[j] = {k: self.tier.read(k, j) for k in keys}
                t0 = time.perf_counter()
                bufs = {k: f.result() for k, f in reads.pop(i).items()}
                waited += time.perf_counter() - t0
                lo, hi = self.grid.bounds(i)
                work(i, {k: b[: hi - lo] for k, b in bufs.items()})
                for k, b in bufs.items():
                    if write:
                        writes.append(self.tier.write(k, i, b))
                    else:
                        self.tier.discard(b)
                for f in writes:
                    if f.done() and f.exception() is not None:
                        raise f.exception()  # fail fast: a full disk stays full
        finally:
            for pending in reads.values():  # an error left reads in flight: let them end
                for f in pending.values():
                    if f.exception() is None:
                        self.tier.discard(f.result())
            t0 = time.perf_counter()
            for f in writes:
                f.exception()  # wait, so no write outlives the step
            self.last_io_wait_s = waited + time.perf_counter() - t0
        for f in writes:
            if f.exception() is not None:
                raise f.exception()

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
        """Restore state from ``read(key, lo, hi)`` chunk by chunk (element 0 at ``offset``)."""
        self._ok()

        def fill(i: int, state: dict[str, torch.Tensor]) -> None:
            lo, hi = self.grid.bounds(i)
            for key, t in state.items():
                t.copy_(read(key, offset + lo, offset + hi))

        try:
            self._stream(fill, write=True)
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
        """Remove the state from its tier (its files, its memory)."""
        self.tier.close()


@dataclass(frozen=True)
class OffloadSpec:
    """Where a data-parallel engine keeps its optimizer state (the ``offload`` config, per rank).

    ``optimizer``: ``none`` (beside the parameters, a plain ``FlatOptimizer``),
    ``host`` or ``nvme``. Budgets in bytes, 0: no limit of the tier's own.
    """

    optimizer: str = "none"
    nvme_path: str | None = None
    job_id: str = "job"
    host_bytes: int = 0
    nvme_bytes: int = 0
    chunk_mb: float = 16.0
    prefetch: int = 1

    def tier(self, rank: int, n_states: int) -> Tier:
        """A fresh tier for this spec's ``optimizer`` placement, for rank ``rank``."""
        chunk = chunk_numel_for(self.chunk_mb)
        if self.optimizer == "host":
            return HostTier(chunk, self.host_bytes)
        if self.optimizer == "nvme":
            if not self.nvme_path:
                raise ValueError("offload.optimizer=nvme needs offload.nvme_path")
            # Reads ahead plus the writes behind them, for every state tensor.
            inflight = (self.prefetch + 2) * max(1, n_states) * chunk * 4
            return NvmeTier(
                self.nvme_path, self.job_id, rank, chunk, self.nvme_bytes, inflight_bytes=inflight
            )
        raise ValueError(f"offload.optimizer must be none, host or nvme; got {self.optimizer!r}")


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


def optimizer_bytes(optimizer: FlatOptimizer | OffloadedOptimizer) -> dict[str, int]:
    """``memory_bytes()`` entries for an engine's optimizer state.

    ``optimizer``: bytes in the process's memory (host or device);
    ``optimizer_nvme``: bytes in NVMe files. State in the host tier is memory.
    """
    if isinstance(optimizer, OffloadedOptimizer) and optimizer.tier.kind == "nvme":
        return {"optimizer": 0, "optimizer_nvme": optimizer.tier.held_bytes}
    return {"optimizer": optimizer.state_bytes()}
