"""Top-k routing for a mixture of experts: pure tensor math, no Ray, no processes.

A gate scores every token against every expert; each token goes to its
``top_k`` best *live* experts (a dead or banned expert is masked before the
choice, so no token is routed to it). The chosen experts' weights are a
softmax over their scores (Mixtral's convention), so they sum to one per
token. With a capacity factor an expert takes at most
``ceil(capacity_factor * tokens * top_k / live_experts)`` tokens — first
choices before second choices, earlier tokens first — and the rest of its
tokens are dropped (slot ``-1``). After dispatch some chosen experts may not
answer in time: ``renormalise`` spreads the token's weight over those that
did, so a token keeps a unit-weight mixture of whatever answered, and the
ones that did not get no gradient through the gate.

Names carry shape suffixes: ``_TE`` is tokens x experts, ``_TK`` tokens x
chosen slots, ``_TC`` tokens x channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# The expert index of a slot whose token was dropped (over capacity, or no live expert).
DROPPED = -1


@dataclass(frozen=True)
class Routing:
    """Where one batch of tokens goes."""

    experts_TK: torch.Tensor  # long: expert index per chosen slot, DROPPED if none
    weights_TK: torch.Tensor  # float: the gate's weight per slot (0 for a dropped slot)
    probs_TE: torch.Tensor  # float: softmax over the live experts (for the balancing loss)


def route(
    logits_TE: torch.Tensor, top_k: int, live_E: torch.Tensor, capacity_factor: float = 0.0
) -> Routing:
    """Choose ``top_k`` live experts per token; ``capacity_factor`` 0: no token is dropped."""
    n_live = int(live_E.sum())
    T, E = logits_TE.shape
    if n_live == 0:
        dropped = torch.full((T, top_k), DROPPED, dtype=torch.long, device=logits_TE.device)
        zeros = logits_TE.new_zeros((T, top_k))
        return Routing(dropped, zeros, logits_TE.new_zeros((T, E)))
    k = min(top_k, n_live)
    masked_TE = logits_TE.float().masked_fill(~live_E, float("-inf"))
    probs_TE = F.softmax(masked_TE, dim=-1)
    top_logits_TK, experts_TK = masked_TE.topk(k, dim=-1)
    weights_TK = F.softmax(top_logits_TK, dim=-1)
    if capacity_factor > 0:
        capacity = math.ceil(capacity_factor * T * k / n_live)
        experts_TK = _drop_over_capacity(experts_TK, E, capacity)
        weights_TK = weights_TK * (experts_TK != DROPPED)
    if k < top_k:  # fewer live experts than top_k: the missing slots are dropped
        pad = top_k - k
        experts_TK = F.pad(experts_TK, (0, pad), value=DROPPED)
        weights_TK = F.pad(weights_TK, (0, pad), value=0.0)
    return Routing(experts_TK, weights_TK, probs_TE)


def _drop_over_capacity(experts_TK: torch.Tensor, n_expert: int, capacity: int) -> torch.Tensor:
    """Slots past their expert's ``capacity`` set to DROPPED; slot 0 of every token first."""
    T, K = experts_TK.shape
    # Slot-major order: every token's first choice is seated before any second choice.
    order_KT = experts_TK.t()
    one_hot = F.one_hot(order_KT.reshape(-1), n_expert)  # [K*T, E]
    position = (one_hot.cumsum(0) * one_hot).sum(-1) - 1  # place of each slot in its expert's queue
    kept_KT = (position < capacity).view(K, T)
    return experts_TK.masked_fill(~kept_KT.t(), DROPPED)


def renormalise(weights_TK: torch.Tensor, answered_TK: torch.Tensor) -> torch.Tensor:
    """Weights over the slots that answered, summing to one per token (zero if none answered).

    Differentiable in ``weights_TK``; a slot that did not answer gets weight
    0 and so no gradient.
    """
    kept_TK = weights_TK * answered_TK
    total_T1 = kept_TK.sum(-1, keepdim=True)
    return kept_TK / total_T1.clamp_min(torch.finfo(kept_TK.dtype).tiny)


def load_balancing_loss(
    probs_TE: torch.Tensor, experts_TK: torch.Tensor, live_E: torch.Tensor
) -> torch.Tensor:
    """Switch Transformer's auxiliary loss over the live experts: 1.0 when perfectly balanced.

    ``n_live * sum_e f_e * P_e``: ``f_e`` the fraction of routed slots that
    chose expert ``e``, ``P_e`` its mean gate probability. Only ``P``
    carries gradient.
    """
    n_live = int(live_E.sum())
    routed = experts_TK[experts_TK != DROPPED]
    if n_live == 0 or routed.numel() == 0:
        return probs_TE.new_zeros(())
    f_E = torch.bincount(routed, minlength=probs_TE.shape[1]).to(probs_TE.dtype) / routed.numel()
    return n_live * (f_E * probs_TE.mean(0)).sum()


def slots_of(experts_TK: torch.Tensor, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens, slots)``: the (token, slot) pairs routed to ``expert``, in token order."""
    tokens, slots = (experts_TK == expert).nonzero(as_tuple=True)
    return tokens, slots
