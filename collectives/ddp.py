"""Data parallelism with bucketed all-reduce that overlaps the backward pass.

Every rank holds the whole model in one flat buffer (see ``flat.py``) and its
gradients in another. Gradients are grouped into buckets of contiguous flat
ranges, in reverse layout order (the order backward produces them); as soon as
the last gradient of a bucket has been accumulated, that bucket's all-reduce is
launched asynchronously, so communication runs while autograd computes the
gradients of earlier layers. This is the scheme of PyTorch's DDP, on shoal's
flat layout.

Unused parameters (an expert no token of this rank was routed to) get no
gradient, so their hooks never fire. Buckets are therefore launched in one
fixed order on every rank (bucket ``k`` only after buckets ``0..k-1``), and
before each backward the autograd graph is walked to find the parameters it
does not reach: they count as ready at once, with a zero gradient (PyTorch
DDP's ``find_unused_parameters`` semantics). A bucket whose gradients are
all in therefore still launches during the backward, and every rank issues
the same reductions in the same order whichever parameters it used; any
bucket still waiting when the backward ends is launched then, in that order.

Loss scaling contract: the caller scales each rank's loss so that the *sum*
over ranks of the gradients is the global-batch gradient (e.g. a token-sum
loss divided by the global token count). The all-reduce is therefore a SUM,
which keeps the result exact when ranks hold different numbers of samples.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from collectives.flat import FlatLayout, attach_grad_views, flatten_into, split_evenly
from collectives.offloaded_optim import OffloadSpec, build_optimizer, optimizer_bytes
from collectives.optim import OptimizerSpec, decay_ranges

# read(key, lo, hi) -> the flat range [lo, hi) of checkpointed tensor `key`
FlatReader = Callable[[str, int, int], torch.Tensor]


@dataclass(frozen=True)
class StepStats:
    grad_norm: float
    comm_wait_s: float


@dataclass(frozen=True)
class Bucket:
    lo: int  # flat offsets of the bucket's gradients
    hi: int
    n_params: int


# The first bucket (the last layers, whose gradients backward produces first)
# is kept small, as in PyTorch's DDP, so communication starts early instead of
# after most of the backward pass.
FIRST_BUCKET_BYTES = 1 << 20


def params_reached(loss: torch.Tensor) -> set[int]:
    """``id()`` of every leaf tensor whose gradient ``loss.backward()`` will accumulate.

    Walks the autograd graph from ``loss`` once (about 0.3 ms for the
    ~190 nodes of ``gpt_tiny``, 1.6 ms for a 24-layer GPT's ~1,000, measured
    on CPU); a parameter it does not reach is unused in this backward.
    """
    found: set[int] = set()
    seen: set = set()
    stack = [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        leaf = getattr(fn, "variable", None)  # an AccumulateGrad node
        if leaf is not None:
            found.add(id(leaf))
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return found


def plan_buckets(
    layout: FlatLayout, bucket_numel: int, first_bucket_numel: int | None = None
) -> list[Bucket]:
    """Group parameters, last first, into contiguous buckets of about ``bucket_numel`` elements.

    The first bucket closes at ``first_bucket_numel`` (default: 1 MiB of fp32).
    """
    if first_bucket_numel is None:
        first_bucket_numel = FIRST_BUCKET_BYTES // 4
    buckets: list[Bucket] = []
    hi = layout.numel
    count = 0
    lo = hi
    for slot in reversed(layout.slots):
        lo = slot.offset
        count += 1
        cap = min(bucket_numel, first_bucket_numel) if not buckets else bucket_numel
        if hi - lo >= cap:
            buckets.append(Bucket(lo, hi, count))
            hi, count = lo, 0
    if count:
        buckets.append(Bucket(lo, hi, count))
    return buckets


class DDPEngine:
    """Replicated parameters, all-reduced gradients, one optimizer over the flat model.

    ``group=None`` uses the default process group; with one rank no
    communication happens at all.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerSpec,
        *,
        grad_clip: float = 0.0,
        bucket_mb: float = 25.0,
        group: dist.ProcessGroup | None = None,
        offload: OffloadSpec | None = None,
    ):
        self.model = model
        self.group = group
        self.world_size = dist.get_world_size(group) if dist.is_initialized() else 1
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        self.grad_clip = grad_clip
        self.layout = FlatLayout.of(model)
        self.flat_param = flatten_into(model, self.layout, torch.float32)
        self.flat_grad = torch.zeros_like(self.flat_param)
        attach_grad_views(model, self.layout, self.flat_grad)
        # offload: the optimizer state in host memory or NVMe files, streamed in chunks.
        self.optimizer = build_optimizer(
            optimizer,
            self.flat_param,
            self.flat_grad,
            decayed=decay_ranges(self.layout),
            offload=offload,
            rank=self.rank,
        )

        bucket_numel = max(1, int(bucket_mb * 2**20) // self.flat_param.element_size())
        self.buckets = plan_buckets(self.layout, bucket_numel)
        self._bucket_of_param: dict[int, int] = {}
        params = dict(model.named_parameters())
        self._params = [params[slot.name] for slot in self.layout.slots]
        for b_idx, bucket in enumerate(self.buckets):
            for slot in self.layout.slots:
                if bucket.lo <= slot.offset < bucket.hi:
                    self._bucket_of_param[id(params[slot.name])] = b_idx
        self._pending: list[int] = [0] * len(self.buckets)
        self._works: dict[int, dist.Work | None] = {}
        self._next = 0  # the next bucket to launch: buckets launch in index order only
        self._sync = True
        if self.world_size > 1:
            for p in self._params:
                p.register_post_accumulate_grad_hook(self._on_grad_ready)

    # -- backward ---------------------------------------------------------

    def zero_grad(self) -> None:
        self.flat_grad.zero_()
        self._pending = [b.n_params for b in self.buckets]
        self._works = {}
        self._next = 0

    def backward(self, loss: torch.Tensor, *, sync: bool = True) -> None:
        """Backward one micro-batch; ``sync=False`` accumulates locally (gradient accumulation).

        With ``sync`` (the last micro-batch) every bucket's all-reduce has
        been launched when this returns, in the same order on every rank,
        also those of parameters this rank did not use (their gradient is
        whatever earlier micro-batches accumulated, zeros if none).
        """
        self._sync = sync
        if sync and self.world_size > 1:
            reached = params_reached(loss)
            for p in self._params:
                if id(p) not in reached:
                    self._ready(p)  # no gradient will come: it is ready as it is
        loss.backward()
        if sync and self.world_size > 1:
            self._launch_rest()

    def _on_grad_ready(self, param: torch.Tensor) -> None:
        if self._sync:
            self._ready(param)

    def _ready(self, param: torch.Tensor) -> None:
        """``param``'s gradient is final for this step; launch every bucket that can go."""
        self._pending[self._bucket_of_param[id(param)]] -= 1
        while self._next < len(self.buckets) and self._pending[self._next] == 0:
            self._launch_next()

    def _launch_rest(self) -> None:
        """Launch every bucket not launched yet, in index order."""
        while self._next < len(self.buckets):
            self._launch_next()

    def _launch_next(self) -> None:
        bucket = self.buckets[self._next]
        view = self.flat_grad[bucket.lo : bucket.hi]
        self._works[self._next] = dist.all_reduce(view, group=self.group, async_op=True)
        self._next += 1

    def abandon_collectives(self) -> None:
        """Forget in-flight reductions (after a peer failed): their handles keep the group alive."""
        self._works = {}

    def _finish_reduction(self) -> float:
        """Wait for every bucket; returns seconds spent waiting after backward ended."""
        if self.world_size == 1:
            return 0.0
        start = time.perf_counter()
        self._launch_rest()  # none left, unless no backward ran with sync=True
        for b_idx in range(len(self.buckets)):
            self._works[b_idx].wait()
        return time.perf_counter() - start

    # -- optimizer --------------------------------------------------------

    def step(self, lr: float) -> StepStats:
        """Finish the gradient all-reduce, clip by global norm, and update the parameters."""
        wait_s = self._finish_reduction()
        # fp64 accumulation: one fp32 sum of millions of squares drifts by
        # ~1e-4 relative, which clipping and Adam then carry into the weights.
        norm = torch.linalg.vector_norm(self.flat_grad, 2, dtype=torch.float64).float()
        if self.grad_clip > 0:
            # Same rule as torch.nn.utils.clip_grad_norm_.
            coef = torch.clamp(self.grad_clip / (norm + 1e-6), max=1.0)
            self.flat_grad.mul_(coef)
        self.optimizer.step(lr)
        return StepStats(grad_norm=float(norm), comm_wait_s=wait_s)

    # -- state ------------------------------------------------------------

    def checkpoint_slice(self) -> tuple[int, int, dict[str, torch.Tensor]]:
        """``(lo, hi, tensors)``: the flat range this rank writes in a checkpoint.

        Every rank holds everything, so the ranks split the writing evenly;
        ``tensors`` maps ``param`` and each optimizer-state name to its
        ``[lo, hi)`` slice (views: copy them before training goes on; offloaded
        state on NVMe is a ``TierFlat``, copied with ``storage.tiers.copy_flat``).
        """
        lo, hi = split_evenly(self.layout.numel, self.world_size)[self.rank]
        out = {"param": self.flat_param[lo:hi]}
        for key, t in self.optimizer.state_tensors().items():
            out[key] = t[lo:hi]
        return lo, hi, out

    def load_state(self, read: FlatReader, step_count: int) -> None:
        """Restore parameters and optimizer state; ``read(key, lo, hi)`` returns a flat range."""
        n = self.layout.numel
        with torch.no_grad():
            self.flat_param.copy_(read("param", 0, n))
        self.optimizer.load_from(read, 0, step_count)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's parameters by name (a collective for sharded engines)."""
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def memory_bytes(self) -> dict[str, int]:
        return {
            "params": self.flat_param.numel() * self.flat_param.element_size(),
            "grads": self.flat_grad.numel() * self.flat_grad.element_size(),
            **optimizer_bytes(self.optimizer),
        }

    def close(self) -> None:
        """Release offloaded state (its files); the engine is not used afterwards."""
        self.optimizer.close()
