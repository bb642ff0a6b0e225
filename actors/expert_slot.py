"""One slot's experts: the modules, their flat parameters and gradients, forward and backward.

Host ``slot`` of ``hosts`` holds experts ``a..b-1`` of every MoE layer
(``expert_range``). Their parameters are one flat vector, expert-major in
the order of ``model.expert_slots()``, which is exactly the slot's range
``[lo, hi)`` of the ``experts`` state space (``actors/models/gpt_moe.py``
orders that space so the range is contiguous). Every expert has the same
size, so expert ``i`` of the slot is ``[i * per_expert, (i + 1) * per_expert)``
of the flat vector.

Shared by the trusted expert host (``actors/expert_host.py``: adds the
optimizer, versions, replicas and checkpoints) and a volunteer's replica of
a slot (``actors/volunteer_experts.py``: the same computation on parameters
the gateway sends it), so both compute the same thing the same way — which
is what lets the job spot-check a volunteer against the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from collectives.flat import FlatLayout, attach_grad_views, flatten_into, split_evenly


def expert_range(n_expert: int, hosts: int, slot: int) -> tuple[int, int]:
    """The expert indices ``[a, b)`` that host ``slot`` of ``hosts`` holds, in every layer."""
    return split_evenly(n_expert, hosts)[slot]


@dataclass
class SlotExperts:
    """A slot's experts (see the module docstring); build with ``SlotExperts.of``."""

    experts: dict[tuple[int, int], nn.Module]  # (layer, expert) -> module
    index: dict[tuple[int, int], int]  # (layer, expert) -> its place in the flat vector
    layout: FlatLayout
    flat_param: torch.Tensor
    flat_grad: torch.Tensor
    expert_ids: tuple[int, int]  # [a, b)
    n_layer: int
    per_expert: int  # parameters of one expert
    space_size: int  # the whole experts space: every expert of every layer
    lo: int  # this slot's range of the experts space
    hi: int

    @classmethod
    def of(cls, model: Any, slot: int, hosts: int) -> SlotExperts:
        """Take slot ``slot``'s experts out of ``model`` (built and seeded by the caller)."""
        slots = model.expert_slots()
        a, b = expert_range(model.n_expert, hosts, slot)
        mine = [(layer, e, m) for layer, e, m in slots if a <= e < b]
        holder = nn.ModuleList(m for _, _, m in mine)
        layout = FlatLayout.of(holder)
        flat_param = flatten_into(holder, layout, torch.float32)
        flat_grad = torch.zeros_like(flat_param)
        attach_grad_views(holder, layout, flat_grad)
        per = sum(p.numel() for p in mine[0][2].parameters())
        n_layer = len(model.moe_layers())
        return cls(
            experts={(layer, e): m for layer, e, m in mine},
            index={(layer, e): i for i, (layer, e, _) in enumerate(mine)},
            layout=layout,
            flat_param=flat_param,
            flat_grad=flat_grad,
            expert_ids=(a, b),
            n_layer=n_layer,
            per_expert=per,
            space_size=per * len(slots),
            lo=a * n_layer * per,
            hi=b * n_layer * per,
        )

    def holds(self, layer: int, expert: int) -> bool:
        return (layer, expert) in self.experts

    def grad_of(self, layer: int, expert: int) -> torch.Tensor:
        """Expert ``expert`` of ``layer``'s slice of the flat gradient (a view)."""
        i = self.index[(layer, expert)]
        return self.flat_grad[i * self.per_expert : (i + 1) * self.per_expert]

    @torch.no_grad()
    def forward(self, layer: int, inputs: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """``{expert: x}`` -> ``{expert: y}``, computed in float32, returned in x's dtype."""
        return {e: self.experts[(layer, e)](x.float()).to(x.dtype) for e, x in inputs.items()}

    def gradients(
        self, layer: int, expert: int, x: torch.Tensor, dy: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dL/dx, dL/dθ)`` of one expert for its tokens, recomputing its forward.

        ``dL/dθ`` is flat, in the order of the expert's parameters; nothing is
        accumulated (``accumulate`` does that), so the same call serves a
        spot check.
        """
        module = self.experts[(layer, expert)]
        params = list(module.parameters())
        x = x.detach().float().requires_grad_(True)
        with torch.enable_grad():
            y = module(x)
            grads = torch.autograd.grad(y, [x, *params], dy.float())
        return grads[0].to(dy.dtype), torch.cat([g.reshape(-1) for g in grads[1:]])

    @torch.no_grad()
    def accumulate(self, layer: int, expert: int, grad: torch.Tensor) -> None:
        """Add one expert's flat parameter gradient into the slot's flat gradient."""
        self.grad_of(layer, expert).add_(grad.to(self.flat_grad.dtype))
