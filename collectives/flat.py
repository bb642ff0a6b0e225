"""One flat, contiguous buffer for all of a model's parameters (and one for their gradients).

Every data-parallel strategy in shoal works on this flat view: all-reduce and
reduce-scatter move contiguous slices instead of looping over parameters, the
optimizer runs over one tensor, and a checkpoint shard is simply a ``[lo, hi)``
range of the flat vector, which is what lets a checkpoint saved at one world
size or ZeRO stage be resumed at another.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ParamSlot:
    """Where one parameter lives in the flat vector."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int

    @property
    def end(self) -> int:
        return self.offset + self.numel


@dataclass(frozen=True)
class FlatLayout:
    """The order, shapes and offsets of a model's trainable parameters.

    The layout is a pure function of the model's architecture, so every rank,
    and every later resume, computes the same one.
    """

    slots: tuple[ParamSlot, ...]

    @property
    def numel(self) -> int:
        return self.slots[-1].end if self.slots else 0

    @classmethod
    def of(cls, model: nn.Module, exclude: frozenset[int] = frozenset()) -> FlatLayout:
        """``model``'s trainable parameters but those whose ``id`` is in ``exclude``."""
        slots = []
        offset = 0
        # named_parameters() de-duplicates tied weights (e.g. embedding and lm head).
        for name, p in model.named_parameters():
            if not p.requires_grad or id(p) in exclude:
                continue
            slots.append(ParamSlot(name, tuple(p.shape), offset, p.numel()))
            offset += p.numel()
        return cls(tuple(slots))

    def to_json(self) -> list[dict]:
        return [{"name": s.name, "shape": list(s.shape), "offset": s.offset} for s in self.slots]


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """State-dict names that alias a parameter of the layout (tied weights): alias -> owner.

    ``named_parameters`` (the layout) lists a tied parameter once; a model's
    ``state_dict`` has it under every name. Recorded in checkpoint manifests
    so that an export can restore every name without building the model.
    """
    owner = {id(p): name for name, p in model.named_parameters()}
    return {
        name: owner[id(t)]
        for name, t in model.state_dict(keep_vars=True).items()
        if id(t) in owner and owner[id(t)] != name
    }


def flatten_into(model: nn.Module, layout: FlatLayout, dtype: torch.dtype) -> torch.Tensor:
    """Move the model's parameters into one flat buffer; the parameters become views of it.

    Returns the buffer. Writing into it (an optimizer step, a checkpoint load)
    changes the model's parameters in place, with no copies.
    """
    params = dict(model.named_parameters())
    device = next(iter(params.values())).device if params else torch.device("cpu")
    flat = torch.empty(layout.numel, dtype=dtype, device=device)
    for slot in layout.slots:
        p = params[slot.name]
        view = flat[slot.offset : slot.end].view(slot.shape)
        view.copy_(p.detach())
        p.data = view
    return flat


def attach_grad_views(model: nn.Module, layout: FlatLayout, flat_grad: torch.Tensor) -> None:
    """Make every parameter's ``.grad`` a view into ``flat_grad``.

    Autograd then accumulates gradients straight into the flat buffer, so the
    buffer can be all-reduced or reduce-scattered without a gather copy (what
    DDP calls ``gradient_as_bucket_view``). The views stay valid only as long as
    nobody sets ``.grad = None``: zero the flat buffer instead.
    """
    params = dict(model.named_parameters())
    for slot in layout.slots:
        params[slot.name].grad = flat_grad[slot.offset : slot.end].view(slot.shape)


def split_evenly(total: int, parts: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` ranges that cover ``range(total)`` in ``parts`` near-equal pieces."""
    base, extra = divmod(total, parts)
    ranges = []
    lo = 0
    for i in range(parts):
        hi = lo + base + (1 if i < extra else 0)
        ranges.append((lo, hi))
        lo = hi
    return ranges
