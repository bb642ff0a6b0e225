"""ZeRO stages 1, 2 and 3 over shoal's flat parameter layout, with uneven shards.

Rank ``r`` owns the contiguous flat range ``shard_bounds[r] = [lo_r, hi_r)`` of
the model's :class:`~collectives.flat.FlatLayout`. Shards may differ in size
(a worker with more memory owns more), so every collective here takes per-rank
split sizes instead of assuming ``numel / world_size``:

* **reduce-scatter** is ``dist.reduce_scatter(out, [chunk_0, ..., chunk_{n-1}])``
  with one input chunk per rank; gloo accepts chunks of different (even zero)
  lengths.
* **all-gather** is ``dist.all_to_all_single`` with ``output_split_sizes`` set to
  the shard sizes: every rank sends its own piece to every rank (the input is
  the piece repeated ``world_size`` times) and receives rank ``r``'s piece at
  rank ``r``'s offset of the output. gloo's ``all_gather`` rejects uneven
  sizes, and padding to the largest shard would waste the bandwidth the uneven
  split exists to save.

Both run per *group*: a contiguous flat range (a DDP-style gradient bucket for
stages 1-2, a module *unit* for stage 3), so transient buffers are bounded by a
group's size and reductions overlap the backward pass.

Stage 3 **prefetches**: the first forward and the first backward record the
order in which units are gathered (the same every step for a static graph);
from then on, when unit ``k`` is needed, the asynchronous all-gather of the
next unit in that order (``k+1`` in forward, ``k-1`` in backward) is started
right away, so it travels while unit ``k`` computes, and that unit's own hook
only waits for it. At most one unit is prefetched ahead, and only units that
would be gathered anyway: the elements moved per step are unchanged.

What each stage keeps persistently on a rank (``Ψ`` = model numel, ``Ψ_r`` =
its shard):

========  ==========  =========  ====================
stage     parameters  gradients  optimizer state
========  ==========  =========  ====================
1         Ψ           Ψ          Ψ_r
2         Ψ           Ψ_r        Ψ_r
3         Ψ_r         Ψ_r        Ψ_r
========  ==========  =========  ====================

Communication per step is a reduce-scatter plus an all-gather of ``Ψ`` for
stages 1-2 (never an all-reduce of the gradients), and for stage 3 one
reduce-scatter plus two all-gathers (before forward and before backward, each
prefetched one unit ahead).

Loss contract (as for :class:`~collectives.ddp.DDPEngine`): each rank's loss is
scaled so that the SUM over ranks of the gradients is the global-batch
gradient, so every reduction is a SUM and ranks may hold different batch sizes.

Every buffer (shard gradient, group gradient buffers, reduce-scatter outputs,
gathered units) is on the flat parameters' device and dtype, so the engine
runs wherever the model is: gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_flatten

from collectives.ddp import DDPEngine, FlatReader, StepStats, params_reached, plan_buckets
from collectives.flat import FlatLayout, attach_grad_views, flatten_into, split_evenly
from collectives.lazy_init import LazyInit
from collectives.offloaded_optim import (
    OffloadSpec,
    build_offloaded_shard,
    build_optimizer,
    optimizer_bytes,
)
from collectives.optim import OptimizerSpec, decay_ranges

STAGE_OF_STRATEGY = {"zero1": 1, "zero2": 2, "zero3": 3}
# Stages 2-3: reduce-scatters in flight during a backward (each holds a group's
# full-size gradient until it is folded into the shard).
MAX_REDUCTIONS_IN_FLIGHT = 2


def _check_bounds(bounds: list[tuple[int, int]], total: int, world_size: int) -> None:
    if len(bounds) != world_size:
        raise ValueError(f"shard_bounds has {len(bounds)} ranges for world size {world_size}")
    expect = 0
    for lo, hi in bounds:
        if lo != expect or hi < lo:
            raise ValueError(f"shard_bounds must be contiguous and ordered, got {bounds}")
        expect = hi
    if expect != total:
        raise ValueError(f"shard_bounds cover [0, {expect}) but the model has {total} elements")


def _intersect(a_lo: int, a_hi: int, b_lo: int, b_hi: int) -> tuple[int, int]:
    lo = max(a_lo, b_lo)
    return lo, max(lo, min(a_hi, b_hi))


@dataclass
class _Group:
    """A contiguous flat range that is reduce-scattered (and gathered) as one collective."""

    lo: int
    hi: int
    n_params: int  # parameters whose gradient completes this group
    splits: list[int]  # per rank: elements of its shard inside [lo, hi)
    mine: tuple[int, int]  # this rank's shard ∩ [lo, hi), flat offsets
    pending: int = 0
    buf: torch.Tensor | None = None  # stages 2-3: transient full-size gradient buffer


@dataclass
class _Unit:
    """Stage 3: a contiguous flat range whose parameters are gathered and freed together.

    ``buf`` always exists; its storage is resized to zero bytes while the unit
    is not gathered, so the parameters (views of it) stay valid Python objects
    without holding memory.
    """

    lo: int
    hi: int
    buf: torch.Tensor
    group: int  # index of the gradient group with the same range
    refs: int = 0  # forward calls currently using it
    held_for_backward: bool = False
    gathered: bool = False
    work: dist.Work | None = None  # an in-flight (prefetched) all-gather into ``buf``
    in_backward: bool = False  # gathered for this backward (its module's backward began)


@dataclass
class _Pending:
    """An in-flight reduce-scatter and what to do with its result."""

    work: dist.Work | None
    out: torch.Tensor
    group: int
    keep: list[torch.Tensor] = field(default_factory=list)  # inputs alive until wait()


class ZeroEngine:
    """ZeRO data parallelism (stage 1, 2 or 3) with contiguous, possibly uneven flat shards.

    Same interface as :class:`~collectives.ddp.DDPEngine`: ``zero_grad()``,
    ``backward(loss, sync=...)`` per micro-batch, ``step(lr)``, and the state
    methods. ``shard_bounds`` (default: an even split) gives every rank's
    ``[lo, hi)``; all ranks must pass the same list. ``group=None`` uses the
    default process group; without an initialized group the engine runs as
    one rank.

    Gradient accumulation: ``backward(loss, sync=False)`` for every micro-batch
    but the last. Stage 1 keeps full gradients anyway, so it accumulates
    locally and reduces once. Stages 2-3 reduce-scatter every micro-batch and
    accumulate into the shard (as DeepSpeed does): holding unreduced full
    gradients across micro-batches would undo the gradient sharding. The
    result is the same because the reduction is a sum.

    Unused parameters: ranks may use different parameters (an expert no
    token of this rank was routed to). Before each backward the autograd
    graph is walked (:func:`~collectives.ddp.params_reached`); a parameter
    it does not reach counts as ready at once, with a zero gradient (PyTorch
    DDP's ``find_unused_parameters`` semantics). Groups are reduce-scattered
    in one fixed order on every rank (stages 1-2: bucket index order, which
    is backward order; stage 3: units last to first), each as soon as it and
    every group before it are complete, and any group still incomplete when
    the backward ends is launched then, in that order. Stage 3 interleaves
    these reductions with the backward gathers of units on the same group,
    so a unit's reduction also waits until that unit has been gathered for
    the backward (a unit none of whose parameters this rank used is still
    gathered there, as on the ranks that used them). Stage 3's gathers are
    collectives too: every rank must run every unit's module in forward
    (an expert that may get no tokens belongs inside a module that always
    runs, as in an MoE layer, not be a unit of its own).

    Stage 3 gathers a unit's parameters in a forward pre-hook of every module
    that uses them (so tied weights work) and frees them after that module's
    forward; a hook on the module's outputs gathers them again when backward
    reaches the module, and they are freed once all of the unit's gradients
    have been accumulated. Units are the top-level children of the model
    (descending into ``ModuleList``/``ModuleDict``, e.g. one unit per
    transformer block), plus runs of parameters that belong to no child, which
    the root module itself gathers. Between steps, ``model.parameters()``
    have empty storage: use :meth:`full_state_dict` to read them.

    ``offload`` places the optimizer state in a tier; with ``offload.params``
    (stage 3) the shard's parameters and gradients are in the tier too
    (``shard_param``/``shard_grad`` are None): a unit's piece is read from it,
    ``offload.prefetch`` units ahead of the gather that needs it, reduced
    gradients are added to it as they arrive, and the optimizer step streams
    all of them (``collectives/offloaded_optim.py``). Given ``init_seed``, a
    model whose parameters are on the meta device is initialised one unit at
    a time from it (``collectives/lazy_init.py``), never whole.

    ``prefetch`` (stage 3, default on): after the first forward and backward
    have recorded the order in which units are gathered, each unit's hook
    starts the asynchronous gather of the next unit in that order, so at most
    one gather is in flight while a unit computes; a hook whose unit was
    prefetched just waits. If a pass departs from the recorded order, it stops
    prefetching for the rest of that pass (results stay exact; only the overlap
    is lost). ``prefetch_stats`` counts ``sync`` gathers (started by the hook
    that needs the unit), ``prefetched`` gathers (started one unit ahead) and
    ``hits`` (hooks that found their unit prefetched). Reduce-scatters are
    asynchronous in every stage; in stages 2-3 at most
    ``MAX_REDUCTIONS_IN_FLIGHT`` are in flight in a backward (the oldest is
    folded into the shard when another starts), so a backward holds a few
    groups' full-size gradients, never the whole model's.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerSpec,
        *,
        stage: int,
        shard_bounds: list[tuple[int, int]] | None = None,
        grad_clip: float = 0.0,
        bucket_mb: float = 25.0,
        group: dist.ProcessGroup | None = None,
        prefetch: bool = True,
        offload: OffloadSpec | None = None,
        init_seed: int | None = None,
    ):
        if stage not in (1, 2, 3):
            raise ValueError(f"ZeRO stage must be 1, 2 or 3, got {stage!r}")
        self.model = model
        self.stage = stage
        self.group = group
        self.grad_clip = grad_clip
        self.prefetch = prefetch
        # Stage-3 prefetch: per pass ("forward" / "backward"), the recorded order of
        # unit gathers, the trace being recorded, and the position in the order.
        self._order: dict[str, tuple[int, ...] | None] = {"forward": None, "backward": None}
        self._trace: dict[str, list[int] | None] = {"forward": None, "backward": None}
        self._cursor: dict[str, int | None] = {"forward": None, "backward": None}
        self._prefetched: _Unit | None = None  # the one unit gathered ahead, if any
        self.prefetch_stats = {"sync": 0, "prefetched": 0, "hits": 0}
        self.world_size = dist.get_world_size(group) if dist.is_initialized() else 1
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        self.layout = FlatLayout.of(model)
        numel = self.layout.numel
        bounds = split_evenly(numel, self.world_size) if shard_bounds is None else shard_bounds
        bounds = [(int(lo), int(hi)) for lo, hi in bounds]
        _check_bounds(bounds, numel, self.world_size)
        self.shard_bounds = bounds
        self.lo, self.hi = bounds[self.rank]

        params = dict(model.named_parameters())
        self._params = [params[s.name] for s in self.layout.slots]
        lazy = None
        if init_seed is not None and any(p.is_meta for p in self._params):
            if stage < 3:
                raise ValueError("a model built lazily (on the meta device) needs ZeRO stage 3")
            lazy = LazyInit(model, init_seed)
        self.device = torch.device("cpu") if lazy is not None else self._params[0].device
        # ZeRO-3 with offload.params: the shard's parameters and gradients live in a
        # tier beside the optimizer state, not in tensors of this engine.
        self.params_offloaded = stage == 3 and offload is not None and offload.params != "none"

        if stage < 3:
            flat = flatten_into(model, self.layout, torch.float32)
            self.flat_param: torch.Tensor | None = flat
            self.shard_param: torch.Tensor | None = flat[self.lo : self.hi]
            bucket_numel = max(1, int(bucket_mb * 2**20) // flat.element_size())
            ranges = [(b.lo, b.hi) for b in plan_buckets(self.layout, bucket_numel)]
            self.units: list[_Unit] = []
        else:
            # Never the whole model in one more copy: units are built one at a time.
            self.flat_param = None
            self.shard_param = None if self.params_offloaded else self._zeros(self.hi - self.lo)
            ranges = self._plan_units()
        self.groups = [self._make_group(lo, hi) for lo, hi in ranges]
        # The fixed order in which groups are reduce-scattered on every rank: the
        # order backward completes them (buckets are planned last layer first).
        n = len(self.groups)
        self._launch_order = list(range(n)) if stage < 3 else list(reversed(range(n)))
        self._next = 0  # position in _launch_order of the next group to launch
        if stage == 1:
            # Full gradients, as views (autograd accumulates straight into them).
            self.flat_grad: torch.Tensor | None = torch.zeros_like(self.flat_param)
            attach_grad_views(model, self.layout, self.flat_grad)
            self.shard_grad: torch.Tensor | None = self.flat_grad[self.lo : self.hi]
        else:
            self.flat_grad = None
            self.shard_grad = None if self.params_offloaded else self._zeros(self.hi - self.lo)
        decayed = decay_ranges(self.layout, self.lo, self.hi)
        if self.params_offloaded:
            # Chunks end where units' pieces do: a unit is read, and its gradient
            # written, as whole chunks.
            cuts = tuple(sorted({b - self.lo for g in self.groups for b in g.mine}))
            self.optimizer = build_offloaded_shard(
                optimizer,
                self.hi - self.lo,
                cuts=cuts,
                decayed=decayed,
                offload=offload,
                rank=self.rank,
            )
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="shoal-param-read")
        else:
            # offload: the shard's optimizer state in host memory or NVMe files, in chunks.
            self.optimizer = build_optimizer(
                optimizer,
                self.shard_param,
                self.shard_grad,
                decayed=decayed,
                offload=offload,
                rank=self.rank,
            )
        # Stage 3: units' pieces of parameters read ahead from the tier, by unit index.
        self._piece_reads: dict[int, Future[torch.Tensor]] = {}
        self._read_ahead = max(1, offload.prefetch) if self.params_offloaded else 0

        if stage == 3:
            try:
                self._build_units(lazy)
            except BaseException:
                self.close()  # a refused model leaves no offload files behind
                raise

        # Which group each parameter's gradient completes, and where it sits in it.
        self._slot_of: dict[int, int] = {id(p): i for i, p in enumerate(self._params)}
        self._group_of_slot: list[int] = [0] * len(self._params)
        for g_idx, g in enumerate(self.groups):
            for i, slot in enumerate(self.layout.slots):
                if g.lo <= slot.offset < g.hi:
                    self._group_of_slot[i] = g_idx
                    g.n_params += 1

        self._sync = True
        self._inflight: list[_Pending] = []
        for p in self._params:
            p.register_post_accumulate_grad_hook(self._on_grad_ready)
        self.zero_grad()

    # -- planning ---------------------------------------------------------

    def _zeros(self, n: int) -> torch.Tensor:
        """A zero-filled flat fp32 buffer on the engine's device."""
        return torch.zeros(n, dtype=torch.float32, device=self.device)

    def _make_group(self, lo: int, hi: int) -> _Group:
        splits = [max(0, min(hi, r_hi) - max(lo, r_lo)) for r_lo, r_hi in self.shard_bounds]
        return _Group(lo, hi, 0, splits, _intersect(self.lo, self.hi, lo, hi))

    def _unit_modules(self) -> list[nn.Module]:
        """Top-level children, descending into containers that have no forward of their own."""
        out: list[nn.Module] = []

        def visit(m: nn.Module) -> None:
            for child in m.children():
                if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
                    visit(child)
                elif any(True for _ in child.parameters()):
                    out.append(child)

        visit(self.model)
        return out

    def _plan_units(self) -> list[tuple[int, int]]:
        """Stage 3: split the layout into unit ranges and remember which module needs which."""
        slot_index = {id(p): i for i, p in enumerate(self._params)}
        owner = [-1] * len(self._params)  # slot -> unit module index (-1: the root)
        self._hook_modules = self._unit_modules()
        for m_idx, m in enumerate(self._hook_modules):
            # A parameter is owned by the first module in layout order that holds it,
            # which matches named_parameters()' de-duplication of tied weights.
            for p in m.parameters():
                i = slot_index.get(id(p))
                if i is not None and owner[i] == -1:
                    owner[i] = m_idx
        # Maximal runs of consecutive slots with the same owner become units.
        ranges: list[tuple[int, int]] = []
        self._unit_owner: list[int] = []
        for i, slot in enumerate(self.layout.slots):
            if ranges and self._unit_owner[-1] == owner[i]:
                ranges[-1] = (ranges[-1][0], slot.end)
            else:
                ranges.append((slot.offset, slot.end))
                self._unit_owner.append(owner[i])
        self._unit_of_slot = []
        u = 0
        for slot in self.layout.slots:
            while slot.offset >= ranges[u][1]:
                u += 1
            self._unit_of_slot.append(u)
        return ranges

    def _build_units(self, lazy: LazyInit | None) -> None:
        """Stage 3: one unit at a time, fill its buffer from the model (or initialise it, on
        a lazily built model), keep this rank's piece, point the parameters into the
        buffer and free it. Then add the hooks.
        """
        self.units = []
        slots_of: list[list[int]] = [[] for _ in self.groups]
        for i in range(len(self.layout.slots)):
            slots_of[self._unit_of_slot[i]].append(i)
        for g_idx, g in enumerate(self.groups):
            if lazy is not None:
                owner = self._unit_owner[g_idx]
                module = self._hook_modules[owner] if owner >= 0 else None
                lazy.materialize(module, [self._params[i] for i in slots_of[g_idx]], g_idx)
                for i in slots_of[g_idx]:
                    self._params[i] = lazy.current(self._params[i])
            buf = torch.empty(g.hi - g.lo, dtype=torch.float32, device=self.device)
            for i in slots_of[g_idx]:
                slot = self.layout.slots[i]
                value = self._params[i].detach().reshape(-1)
                buf[slot.offset - g.lo : slot.end - g.lo].copy_(value)
            piece = buf[g.mine[0] - g.lo : g.mine[1] - g.lo]
            if self.params_offloaded:
                self.optimizer.put_param(g.mine[0] - self.lo, g.mine[1] - self.lo, piece)
            else:
                self.shard_param[g.mine[0] - self.lo : g.mine[1] - self.lo].copy_(piece)
            u = _Unit(g.lo, g.hi, buf, g_idx)
            self.units.append(u)
            for i in slots_of[g_idx]:
                slot = self.layout.slots[i]
                self._params[i].data = buf[slot.offset - g.lo : slot.end - g.lo].view(slot.shape)
            self._free(u)
        if lazy is not None:
            lazy.done()
        # The root's forward brackets a forward pass (before and after every other hook).
        self.model.register_forward_pre_hook(
            lambda module, args: self._begin_pass("forward"), prepend=True
        )
        # Every module that uses a unit's parameters needs that unit gathered.
        slot_index = {id(p): i for i, p in enumerate(self._params)}
        modules = [*self._hook_modules, self.model]
        for m in modules:
            if m is self.model:
                needed = {u for u, o in enumerate(self._unit_owner) if o == -1}
            else:
                needed = {self._unit_of_slot[slot_index[id(p)]] for p in m.parameters()}
            if not needed:
                continue
            needed_sorted = sorted(needed)
            m.register_forward_pre_hook(self._make_pre_forward(needed_sorted))
            m.register_forward_hook(self._make_post_forward(needed_sorted))
        self.model.register_forward_hook(lambda module, args, output: self._end_pass("forward"))

    # -- stage 3: gather / free -------------------------------------------

    def _start_gather(self, u: _Unit) -> None:
        """Allocate the unit's buffer and start its all-gather (finished at once for one rank)."""
        g = self.groups[u.group]
        if self.params_offloaded:
            piece = self._piece(u.group)
        else:
            piece = self.shard_param[g.mine[0] - self.lo : g.mine[1] - self.lo]
        u.buf.untyped_storage().resize_(u.buf.numel() * u.buf.element_size())
        u.work = self._all_gather(u.buf, piece, g.splits)

    # -- stage 3 with offload.params: units' pieces come from the tier ------

    def _read_piece(self, g_idx: int) -> torch.Tensor:
        g = self.groups[g_idx]
        return self.optimizer.read_param(g.mine[0] - self.lo, g.mine[1] - self.lo, self.device)

    def _piece(self, g_idx: int) -> torch.Tensor:
        """This rank's piece of unit ``g_idx``: read ahead already, or read now."""
        ahead = self._piece_reads.pop(g_idx, None)
        return ahead.result() if ahead is not None else self._read_piece(g_idx)

    def _read_pieces_ahead(self, order: tuple[int, ...], pos: int) -> None:
        """Start reading the pieces of the units after the next one in ``order``.

        The next unit's gather is started (by ``_prefetch``) while this one
        computes, so its piece must already be on its way: reads run
        ``offload.prefetch`` units beyond it, on one reader thread, in order.
        """
        for j in range(pos + 1, min(len(order), pos + 2 + self._read_ahead)):
            u_idx = order[j]
            u = self.units[u_idx]
            if u_idx not in self._piece_reads and not u.gathered and u.work is None:
                self._piece_reads[u_idx] = self._reader.submit(self._read_piece, u_idx)

    def _drop_pieces_read_ahead(self) -> None:
        """A pass ended: pieces read ahead for it are not used (they may go stale)."""
        for f in self._piece_reads.values():
            f.exception()  # let the read finish before the tier is written again
        self._piece_reads.clear()

    def _gather(self, u: _Unit) -> None:
        """Make the unit's parameters valid: wait for its prefetch, or gather it now."""
        if u.gathered:
            return
        if u.work is None:
            self._start_gather(u)
        if u.work is not None:
            u.work.wait()
            u.work = None
        u.gathered = True
        if self._prefetched is u:
            self._prefetched = None

    def _free(self, u: _Unit) -> None:
        if u.work is not None:  # never release storage a collective still writes into
            u.work.wait()
            u.work = None
        if self._prefetched is u:
            self._prefetched = None
        u.buf.untyped_storage().resize_(0)
        u.gathered = False
        u.refs = 0
        u.held_for_backward = False

    def _begin_pass(self, phase: str) -> None:
        """A forward or backward pass starts: record its gather order, or follow the recorded."""
        if not self.prefetch:
            return
        if self._order[phase] is None:
            self._trace[phase] = []
            self._cursor[phase] = None
        else:
            self._trace[phase] = None
            self._cursor[phase] = 0

    def _end_pass(self, phase: str) -> None:
        self._drop_pieces_read_ahead()
        if self._trace[phase] is not None:
            self._order[phase] = tuple(self._trace[phase])
            self._trace[phase] = None
        self._cursor[phase] = None
        u = self._prefetched
        if u is not None and u.refs == 0 and not u.held_for_backward:
            self._free(u)  # prefetched for a use that did not come (the graph changed)

    def _need(self, u_idx: int, phase: str) -> None:
        """A hook needs unit ``u_idx`` gathered; then prefetch the next unit of the pass."""
        u = self.units[u_idx]
        if u.gathered:
            return
        trace = self._trace[phase]
        if trace is not None:
            trace.append(u_idx)
        order, pos = self._order[phase], self._cursor[phase]
        if pos is not None:
            if pos < len(order) and order[pos] == u_idx:
                self._cursor[phase] = pos + 1
            else:
                self._cursor[phase] = pos = None  # off the recorded order: stop this pass
        self.prefetch_stats["hits" if u.work is not None else "sync"] += 1
        self._gather(u)
        if pos is not None and self.params_offloaded:
            self._read_pieces_ahead(order, pos)
        if pos is not None and pos + 1 < len(order):
            self._prefetch(self.units[order[pos + 1]])

    def _prefetch(self, u: _Unit) -> None:
        """Start gathering ``u`` ahead of its hook; at most one unit is ahead at a time."""
        if self.world_size == 1 or self._prefetched is not None:
            return  # one rank: nothing to overlap
        if u.gathered or u.work is not None:
            return  # still gathered from an earlier use (its hook will not gather it)
        self._start_gather(u)
        self._prefetched = u
        self.prefetch_stats["prefetched"] += 1

    def _make_pre_forward(self, needed: list[int]):
        def hook(module: nn.Module, args: tuple) -> None:
            for u_idx in needed:
                self._need(u_idx, "forward")
                self.units[u_idx].refs += 1

        return hook

    def _make_post_forward(self, needed: list[int]):
        def pre_backward(grad: torch.Tensor) -> None:
            for u_idx in needed:
                self._need(u_idx, "backward")
                self.units[u_idx].held_for_backward = True
            for u_idx in needed:
                self._reached_in_backward(u_idx)

        def hook(module: nn.Module, args: tuple, output):
            for u_idx in needed:
                u = self.units[u_idx]
                u.refs -= 1
                if u.refs == 0 and not u.held_for_backward:
                    self._free(u)
            if torch.is_grad_enabled():
                for t in tree_flatten(output)[0]:
                    if isinstance(t, torch.Tensor) and t.requires_grad:
                        t.register_hook(pre_backward)
            return None

        return hook

    # -- collectives ------------------------------------------------------

    def _all_gather(
        self, out: torch.Tensor, piece: torch.Tensor, splits: list[int]
    ) -> dist.Work | None:
        """Uneven all-gather: rank r's ``piece`` (``splits[r]`` elements) lands at its offset."""
        if self.world_size == 1:
            out.copy_(piece)
            return None
        return dist.all_to_all_single(
            out,
            piece.repeat(self.world_size),
            output_split_sizes=splits,
            input_split_sizes=[piece.numel()] * self.world_size,
            group=self.group,
            async_op=True,
        )

    def _launch_ready(self) -> None:
        """Launch, in the fixed order, every group that is complete and has no incomplete
        group before it. Stage 3: a unit's group also waits for the unit's backward gather.
        """
        while self._next < len(self._launch_order):
            g_idx = self._launch_order[self._next]
            if self.groups[g_idx].pending > 0:
                return
            if self.stage == 3 and not self.units[g_idx].in_backward:
                return
            self._launch_next()

    def _launch_rest(self) -> None:
        """Launch every group not launched yet, in the fixed order (the backward is over)."""
        while self._next < len(self._launch_order):
            self._launch_next()

    def _launch_next(self) -> None:
        g_idx = self._launch_order[self._next]
        self._next += 1
        self._launch(g_idx)

    def _launch(self, g_idx: int) -> None:
        """Start the reduce-scatter of one group's gradients (summed over ranks)."""
        g = self.groups[g_idx]
        if self.stage == 1:
            full = self.flat_grad[g.lo : g.hi]
        else:
            # Missing gradients (unused parameters) are zeros.
            full = g.buf if g.buf is not None else self._zeros(g.hi - g.lo)
            g.buf = None  # the in-flight record keeps it alive until the wait
        chunks = []
        for (r_lo, _), n in zip(self.shard_bounds, g.splits, strict=True):
            a = max(r_lo, g.lo) - g.lo
            chunks.append(full[a : a + n])
        if self.world_size == 1:
            self._inflight.append(_Pending(None, chunks[0], g_idx, [full]))
        else:
            out = full.new_empty(g.splits[self.rank])
            work = dist.reduce_scatter(
                out, chunks, op=dist.ReduceOp.SUM, group=self.group, async_op=True
            )
            self._inflight.append(_Pending(work, out, g_idx, [full]))
        if self.stage > 1:
            # Each reduction in flight holds its group's full-size gradient buffer:
            # folding the oldest into the shard as the next ones start keeps the
            # backward's gradient memory at a few groups, not the whole model.
            while len(self._inflight) > MAX_REDUCTIONS_IN_FLIGHT:
                self._fold(self._inflight.pop(0))

    def _on_grad_ready(self, param: torch.Tensor) -> None:
        i = self._slot_of[id(param)]
        if self.stage == 1:
            if not self._sync:
                return  # accumulate locally in the full gradient; reduce on the last micro-batch
        else:
            g = self.groups[self._group_of_slot[i]]
            if g.buf is None:
                g.buf = self._zeros(g.hi - g.lo)
            slot = self.layout.slots[i]
            g.buf[slot.offset - g.lo : slot.end - g.lo].copy_(param.grad.reshape(-1))
            param.grad = None  # the transient per-parameter gradient is not kept
        self._slot_ready(i)

    def _slot_ready(self, i: int) -> None:
        """Slot ``i``'s gradient is final for this backward (or will never come)."""
        g_idx = self._group_of_slot[i]
        g = self.groups[g_idx]
        g.pending -= 1
        if self.stage == 3 and g.pending == 0 and self.units[g_idx].in_backward:
            # Every gradient of the unit exists, so nothing in backward reads it any more.
            # (A unit this rank did not use at all stays gathered until the backward ends,
            # as it may be needed again there on a rank that did.)
            self._free(self.units[g_idx])
        self._launch_ready()

    def _reached_in_backward(self, u_idx: int) -> None:
        """Stage 3: unit ``u_idx`` is gathered for the backward; its reduction may go."""
        u = self.units[u_idx]
        if not u.in_backward:
            u.in_backward = True
            self._launch_ready()

    def abandon_collectives(self) -> None:
        """Forget in-flight reductions (after a peer failed): their handles keep the group alive."""
        self._inflight = []

    def _drain(self) -> None:
        """Wait for every in-flight reduce-scatter and fold the results into the shard gradient."""
        for pend in self._inflight:
            self._fold(pend)
        self._inflight = []

    def _fold(self, pend: _Pending) -> None:
        """Wait for one reduce-scatter and fold its result into the shard gradient."""
        if pend.work is not None:
            pend.work.wait()
        g = self.groups[pend.group]
        if self.params_offloaded:  # one reduced micro-batch more, into the tier
            self.optimizer.add_grad(g.mine[0] - self.lo, g.mine[1] - self.lo, pend.out)
            return
        dst = self.shard_grad[g.mine[0] - self.lo : g.mine[1] - self.lo]
        if self.stage == 1:
            dst.copy_(pend.out)  # the full local gradient was reduced in one go
        else:
            dst.add_(pend.out)  # one reduced micro-batch more

    # -- backward ---------------------------------------------------------

    def zero_grad(self) -> None:
        self._drain()
        if self.stage == 1:
            self.flat_grad.zero_()
        elif self.params_offloaded:
            self.optimizer.zero_grad()
        else:
            self.shard_grad.zero_()
        self._reset_groups()

    def _reset_groups(self) -> None:
        for g in self.groups:
            g.pending = g.n_params
            g.buf = None
        for u in self.units:
            u.in_backward = False
        self._next = 0

    def backward(self, loss: torch.Tensor, *, sync: bool = True) -> None:
        """Backward one micro-batch; ``sync=False`` for all but the last one of a step."""
        self._sync = sync
        if self.stage == 1 and not sync:
            loss.backward()  # accumulate locally; no reduction, no hooks to count
            return
        if self.world_size > 1:
            reached = params_reached(loss)
            for i, p in enumerate(self._params):
                if id(p) not in reached:
                    self._slot_ready(i)  # unused here: a zero gradient, ready now
        if self.stage == 3:
            self._begin_pass("backward")
        loss.backward()
        if self.stage == 3:
            self._end_pass("backward")
        # Groups still incomplete (a parameter whose hook never fired) go now, in order.
        self._launch_rest()
        for u in self.units:
            if u.gathered or u.work is not None:
                self._free(u)
        if self.stage > 1 and not sync:
            # Bound transient memory: fold this micro-batch in before the next one.
            self._drain()
            self._reset_groups()

    # -- optimizer --------------------------------------------------------

    def step(self, lr: float) -> StepStats:
        """Finish the reduce-scatter, clip by global norm, update the shard, re-gather (1-2)."""
        start = time.perf_counter()
        self._drain()
        wait_s = time.perf_counter() - start
        # The global norm: sum of the shards' squared norms (shards are disjoint).
        if self.params_offloaded:  # summed chunk by chunk as the gradients were written
            sq = torch.tensor(self.optimizer.grad_sq_norm(), dtype=torch.float64)
            sq = sq.to(self.device)
        else:
            sq = self.shard_grad.double().pow(2).sum()
        if self.world_size > 1:
            dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=self.group)
        norm = sq.sqrt().float()
        coef = None
        if self.grad_clip > 0:
            # Same rule as torch.nn.utils.clip_grad_norm_.
            coef = torch.clamp(self.grad_clip / (norm + 1e-6), max=1.0)
        if self.params_offloaded:
            self.optimizer.step(lr, grad_scale=None if coef is None else coef.cpu())
        else:
            if coef is not None:
                self.shard_grad.mul_(coef)
            self.optimizer.step(lr)
        if self.stage < 3 and self.world_size > 1:
            # Every rank needs the whole updated model for the next forward.
            start = time.perf_counter()
            works = []
            for g in self.groups:
                piece = self.flat_param[g.mine[0] : g.mine[1]]
                works.append(self._all_gather(self.flat_param[g.lo : g.hi], piece, g.splits))
            for w in works:
                w.wait()
            wait_s += time.perf_counter() - start
        self._reset_groups()
        return StepStats(grad_norm=float(norm), comm_wait_s=wait_s)

    # -- state ------------------------------------------------------------

    def checkpoint_slice(self) -> tuple[int, int, dict[str, torch.Tensor]]:
        """``(lo, hi, tensors)``: this rank's shard of ``param`` and of each optimizer state.

        The slices of all ranks tile ``[0, numel)``. Tensors are views: copy
        them before training goes on.
        """
        if self.params_offloaded:  # handles read chunk by chunk, like offloaded state
            out = {"param": self.optimizer.param_flat()}
        else:
            out = {"param": self.shard_param}
        out.update(self.optimizer.state_tensors())
        return self.lo, self.hi, out

    def load_state(self, read: FlatReader, step_count: int) -> None:
        """Restore from a checkpoint of any world size or stage; ``read(key, lo, hi)``.

        Stages 1-2 read the whole ``param`` (every rank holds the full model);
        stage 3 reads only its shard. Optimizer state: only the shard.
        """
        with torch.no_grad():
            if self.stage < 3:
                self.flat_param.copy_(read("param", 0, self.layout.numel))
            elif not self.params_offloaded:  # else the optimizer reads them into the tier
                self.shard_param.copy_(read("param", self.lo, self.hi))
        self.optimizer.load_from(read, self.lo, step_count)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's state by name. For stage 3 a collective: every rank must call it."""
        for u in self.units:
            self._gather(u)
        out = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        for u in self.units:
            self._free(u)
        return out

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held by this rank's persistent tensors (stage 3: gathered units count too)."""

        def nbytes(t: torch.Tensor) -> int:
            return t.numel() * t.element_size()

        gathered = sum(u.buf.untyped_storage().nbytes() for u in self.units)
        if self.stage < 3:
            params = nbytes(self.flat_param)
        elif self.params_offloaded:
            params = gathered
        else:
            params = nbytes(self.shard_param) + gathered
        if self.stage == 1:
            grads = nbytes(self.flat_grad)
        else:
            grads = 0 if self.params_offloaded else nbytes(self.shard_grad)
        out = {"params": params, "grads": grads, **optimizer_bytes(self.optimizer)}
        if self.params_offloaded:
            # The shard's parameters and gradients, in the tier offload.params names.
            kind = self.optimizer.param_tier.kind
            out[f"params_{kind}"] = out[f"grads_{kind}"] = 4 * (self.hi - self.lo)
        return out

    def close(self) -> None:
        """Release offloaded state (its files); the engine is not used afterwards."""
        if self.params_offloaded:
            self._drop_pieces_read_ahead()
            self._reader.shutdown(wait=True)
        self.optimizer.close()


def build_engine(
    strategy: str,
    model: nn.Module,
    optimizer: OptimizerSpec,
    *,
    grad_clip: float = 0.0,
    bucket_mb: float = 25.0,
    shard_bounds: list[tuple[int, int]] | None = None,
    group: dist.ProcessGroup | None = None,
    prefetch: bool = True,
    offload: OffloadSpec | None = None,
    init_seed: int | None = None,
) -> DDPEngine | ZeroEngine:
    """The engine for ``strategy`` (``ddp``, ``zero1``, ``zero2``, ``zero3``).

    ``shard_bounds`` (rank ``r`` owns flat range ``shard_bounds[r]``; made by
    the planner, ``orchestrator.shard_plan.shard_bounds``) may be uneven;
    ``None`` splits evenly. DDP has no shards and ignores it. ``prefetch``
    only affects ``zero3`` (see :class:`ZeroEngine`). ``offload`` places the
    optimizer state (``collectives/offloaded_optim.py``; None: beside the parameters)
    and, for ``zero3``, with ``offload.params`` the parameters and gradients too.
    With ``init_seed``, a model built on the meta device (``zero3`` only) is
    initialised one unit at a time from it (``collectives/lazy_init.py``);
    without, a meta model stays on the meta device (shapes only).
    """
    if strategy == "ddp":
        return DDPEngine(
            model,
            optimizer,
            grad_clip=grad_clip,
            bucket_mb=bucket_mb,
            group=group,
            offload=offload,
        )
    if strategy not in STAGE_OF_STRATEGY:
        raise ValueError(f"strategy must be one of ddp, zero1, zero2, zero3; got {strategy!r}")
    return ZeroEngine(
        model,
        optimizer,
        stage=STAGE_OF_STRATEGY[strategy],
        shard_bounds=shard_bounds,
        grad_clip=grad_clip,
        bucket_mb=bucket_mb,
        group=group,
        prefetch=prefetch,
        offload=offload,
        init_seed=init_seed,
    )
