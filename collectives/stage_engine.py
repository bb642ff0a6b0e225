"""One pipeline stage's parameters, gradients and optimizer, on the model's flat layout.

A stage holds the parameters its layers use, in one local flat buffer
ordered by their offsets in the *whole* model's flat layout
(``collectives/flat.py``). Each parameter belongs to the first stage that
uses it; the stage's own parameters are one contiguous range of the model's
flat vector, ``[owned_lo, owned_hi)``. That is what makes a pipeline
checkpoint an ordinary flat checkpoint (the ``dp`` space, sharded by stage),
resumable under ``strategy=ddp`` or another number of stages.

A parameter used by several stages (a language model's embedding tied to its
output head) is *borrowed*: a later stage keeps its own copy, with its own
optimizer state. After the backward, every stage of a pipeline all-reduces
the gradients of all tied parameters (zeros where it does not use one), so
every holder applies the same update to the same values and the copies stay
equal, bit for bit, without sending parameters.

``step`` then sums each stage's gradients over its data-parallel replicas,
computes the global gradient norm (each parameter counted once, by its
owner), clips, and updates. Gradients are scaled by the caller as in
``collectives/ddp.py``: summed over replicas, they are the global-batch
gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from collectives.ddp import StepStats
from collectives.flat import FlatLayout, ParamSlot
from collectives.optim import FlatOptimizer, OptimizerSpec, decay_ranges

FlatReader = Callable[[str, int, int], torch.Tensor]


class StageLayoutError(ValueError):
    """The model's layers do not map onto contiguous ranges of its flat layout."""


def layer_slots(
    layout: FlatLayout, model: nn.Module, layers: Sequence[nn.Module]
) -> list[set[str]]:
    """For each layer, the names (in ``layout``) of the parameters it uses."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    out = []
    for layer in layers:
        names = {name_of[id(p)] for p in layer.parameters() if id(p) in name_of}
        out.append({n for n in names if any(s.name == n for s in layout.slots)})
    return out


def owned_ranges(
    layout: FlatLayout, uses: Sequence[set[str]], layer_names: Sequence[str]
) -> list[tuple[int, int]]:
    """Each layer's owned flat range: the parameters it is the first layer to use.

    Raises ``StageLayoutError`` naming the layer whose parameters are not the
    next contiguous run of the layout (the layers must list the model's
    parameters in the order the model registers them), or a parameter no
    layer uses.
    """
    slot = {s.name: s for s in layout.slots}
    seen: set[str] = set()
    out, pos = [], 0
    for name, used in zip(layer_names, uses, strict=True):
        new = sorted((slot[n] for n in used - seen), key=lambda s: s.offset)
        seen |= used
        lo = pos
        for s in new:
            if s.offset != pos:
                raise StageLayoutError(
                    f"layer {name!r} uses parameter {s.name!r} at flat offset {s.offset}, but the "
                    f"layers so far end at {pos}: pipeline_layers() must list the layers in the "
                    "order the model registers their parameters"
                )
            pos = s.end
        out.append((lo, pos))
    if pos != layout.numel:
        missing = [s.name for s in layout.slots if s.name not in seen]
        raise StageLayoutError(f"parameters used by no layer of pipeline_layers(): {missing}")
    return out


def tied_slots(
    layout: FlatLayout, uses: Sequence[set[str]], layer_bounds: Sequence[tuple[int, int]]
) -> list[ParamSlot]:
    """The slots used by more than one stage (tied weights), given each stage's layers."""
    users: dict[str, set[int]] = {}
    for stage, (lo, hi) in enumerate(layer_bounds):
        for used in uses[lo:hi]:
            for name in used:
                users.setdefault(name, set()).add(stage)
    return [slot for slot in layout.slots if len(users.get(slot.name, ())) > 1]


class StageEngine:
    """The parameters of one stage's layers, their gradients and optimizer state.

    ``slots``: the whole-model slots this stage's layers use (owned and
    borrowed). ``owned``: the stage's own flat range. ``piece``: the part of
    it this rank writes to checkpoints and replicates (the stage's range
    split among its replicas). ``tied``: every slot used by more than one
    stage of the model (the same list on every stage).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[nn.Module],
        layout: FlatLayout,
        owned: tuple[int, int],
        piece: tuple[int, int],
        tied: Sequence[ParamSlot],
        optimizer: OptimizerSpec,
        *,
        grad_clip: float = 0.0,
        dp_group: dist.ProcessGroup | None = None,
        pp_group: dist.ProcessGroup | None = None,
    ):
        self.layout = layout  # the whole model's: what checkpoints and manifests describe
        self.module = nn.Sequential(*layers)
        self.owned, self.piece = owned, piece
        self.grad_clip = grad_clip
        self.dp_group, self.pp_group = dp_group, pp_group
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        by_name = dict(model.named_parameters())
        used = {
            name for name, p in by_name.items() if any(p is q for q in self.module.parameters())
        }
        self.slots = [s for s in layout.slots if s.name in used]
        # Local flat buffer: the used slots back to back, in global order.
        self._local: dict[str, int] = {}
        local_slots, pos = [], 0
        for s in self.slots:
            self._local[s.name] = pos
            local_slots.append(ParamSlot(s.name, s.shape, pos, s.numel))
            pos += s.numel
        self.local_layout = FlatLayout(tuple(local_slots))
        device = next(model.parameters()).device  # a stage may have no parameters of its own
        self.flat_param = torch.empty(pos, dtype=torch.float32, device=device)
        self.flat_grad = torch.zeros_like(self.flat_param)
        for s in self.local_layout.slots:
            p = by_name[s.name]
            view = self.flat_param[s.offset : s.end].view(s.shape)
            view.copy_(p.detach())
            p.data = view
            p.grad = self.flat_grad[s.offset : s.end].view(s.shape)
        self.optimizer = FlatOptimizer(
            optimizer, self.flat_param, self.flat_grad, decayed=decay_ranges(self.local_layout)
        )
        self.tied = list(tied)
        owned_local = [s for s in self.slots if owned[0] <= s.offset < owned[1]]
        self._owned_lo = self._local[owned_local[0].name] if owned_local else 0
        self._owned_hi = self._owned_lo + (owned[1] - owned[0])
        self._flat_storage = self.flat_param.untyped_storage().data_ptr()

    @property
    def model(self) -> nn.Module:
        return self.module

    def is_parameter(self, t: torch.Tensor) -> bool:
        """Whether ``t`` lives in this stage's parameter buffer (not an activation)."""
        return t.untyped_storage().data_ptr() == self._flat_storage

    def zero_grad(self) -> None:
        self.flat_grad.zero_()

    def _local_range(self, lo: int, hi: int) -> tuple[int, int]:
        """Local offsets of the global range ``[lo, hi)`` of the owned range."""
        if not (self.owned[0] <= lo <= hi <= self.owned[1]):
            raise LookupError(f"[{lo}, {hi}) is not inside this stage's range {self.owned}")
        base = self._owned_lo - self.owned[0]
        return lo + base, hi + base

    # -- optimizer --------------------------------------------------------

    def step(self, lr: float) -> StepStats:
        """Reduce tied gradients and replicas' gradients, clip by the global norm, update."""
        if self.tied and self.pp_group is not None and dist.get_world_size(self.pp_group) > 1:
            parts = [
                self.flat_grad[self._local[s.name] : self._local[s.name] + s.numel]
                if s.name in self._local
                else torch.zeros(s.numel, device=self.flat_grad.device)
                for s in self.tied
            ]
            summed = torch.cat(parts)
            dist.all_reduce(summed, group=self.pp_group)
            pos = 0
            for s in self.tied:
                if s.name in self._local:
                    at = self._local[s.name]
                    self.flat_grad[at : at + s.numel].copy_(summed[pos : pos + s.numel])
                pos += s.numel
        if self.dp_group is not None and dist.get_world_size(self.dp_group) > 1:
            dist.all_reduce(self.flat_grad, group=self.dp_group)
        # Each parameter counted once, by the stage that owns it (fp64, as in DDPEngine).
        own = self.flat_grad[self._owned_lo : self._owned_hi]
        sq = torch.linalg.vector_norm(own, 2, dtype=torch.float64).square().reshape(1)
        if self.pp_group is not None and dist.get_world_size(self.pp_group) > 1:
            dist.all_reduce(sq, group=self.pp_group)
        norm = sq.sqrt().float()[0]
        if self.grad_clip > 0:
            coef = torch.clamp(self.grad_clip / (norm + 1e-6), max=1.0)
            self.flat_grad.mul_(coef)
        self.optimizer.step(lr)
        return StepStats(grad_norm=float(norm), comm_wait_s=0.0)

    def abandon_collectives(self) -> None:
        """Nothing is left in flight between calls: reductions here are synchronous."""

    # -- state ------------------------------------------------------------

    def slice(self, lo: int, hi: int) -> dict[str, torch.Tensor]:
        """Views of the global range ``[lo, hi)`` (inside the owned range): param and optimizer."""
        a, b = self._local_range(lo, hi)
        out = {"param": self.flat_param[a:b]}
        for key, t in self.optimizer.state_tensors().items():
            out[key] = t[a:b]
        return out

    def checkpoint_slice(self) -> tuple[int, int, dict[str, torch.Tensor]]:
        """``(lo, hi, tensors)``: this rank's piece of the stage, in global flat offsets."""
        lo, hi = self.piece
        return lo, hi, self.slice(lo, hi)

    def _runs(self) -> list[tuple[int, int, int]]:
        """``(global_lo, global_hi, local_lo)`` for maximal runs of slots contiguous in both."""
        runs: list[tuple[int, int, int]] = []
        for s in self.slots:
            at = self._local[s.name]
            if runs and runs[-1][1] == s.offset and runs[-1][2] + (runs[-1][1] - runs[-1][0]) == at:
                runs[-1] = (runs[-1][0], s.end, runs[-1][2])
            else:
                runs.append((s.offset, s.end, at))
        return runs

    def load_state(self, read: FlatReader, step_count: int) -> None:
        """Restore every used slot (owned and borrowed) from the whole model's flat state."""
        runs = self._runs()
        with torch.no_grad():
            for lo, hi, at in runs:
                self.flat_param[at : at + hi - lo].copy_(read("param", lo, hi))
        state = {}
        for key in self.optimizer.spec.state_keys():
            state[key] = torch.cat([read(key, lo, hi) for lo, hi, _ in runs])
        self.optimizer.load_state(state, step_count)

    def memory_bytes(self) -> dict[str, int]:
        return {
            "params": self.flat_param.numel() * self.flat_param.element_size(),
            "grads": self.flat_grad.numel() * self.flat_grad.element_size(),
            "optimizer": self.optimizer.state_bytes(),
        }
