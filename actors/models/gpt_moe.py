"""A GPT whose feed-forward layers are mixtures of experts (``model=gpt_moe``).

Each block's MLP becomes a ``MoEFeedForward``: a gate (``collectives/moe_routing.py``)
sends every token to its ``top_k`` experts, each a small MLP, and mixes
their outputs by the gate's weights. The experts sit behind one interface,
``experts(x_TC, experts_TK) -> (out_TKC, answered_TK)``: in one process
(``LocalExperts``) every expert answers; under ``strategy=moe`` the trunk
workers swap in remote experts (``actors/expert_client.py``) that live on
expert-host actors and may fail to answer, and the layer mixes whatever
answered. Everything else is ``actors/models/gpt.py``'s GPT.

The expert state space: all experts' parameters, flat, expert-major (expert
0 of every layer, then expert 1 of every layer, ...), so "experts ``a..b``
of every layer" — what one expert host holds — is one contiguous range.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from actors.models.gpt import GPT, CausalSelfAttention
from collectives.moe_routing import load_balancing_loss, renormalise, route, slots_of


class Expert(nn.Module):
    """One expert: the transformer MLP (``d_model -> d_hidden -> d_model``)."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.fc = nn.Linear(d_model, d_hidden)
        self.proj = nn.Linear(d_hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class LocalExperts(nn.ModuleList):
    """All of a layer's experts in this process: every routed slot is answered."""

    def live(self) -> torch.Tensor:
        return torch.ones(len(self), dtype=torch.bool)

    def forward(
        self, x_TC: torch.Tensor, experts_TK: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        T, K = experts_TK.shape
        rows, outs = [], []
        for e, expert in enumerate(self):
            tokens, slots = slots_of(experts_TK, e)
            if tokens.numel():
                rows.append(tokens * K + slots)
                outs.append(expert(x_TC[tokens]))
        return scatter_slots(x_TC, T, K, rows, outs), experts_TK >= 0


def scatter_slots(
    x_TC: torch.Tensor, T: int, K: int, rows: list[torch.Tensor], outs: list[torch.Tensor]
) -> torch.Tensor:
    """``[T, K, C]``: ``outs[i]`` at flat slot rows ``rows[i]`` (``token * K + slot``), else 0."""
    out = x_TC.new_zeros((T * K, x_TC.shape[1]))
    if rows:
        out = out.index_copy(0, torch.cat(rows), torch.cat(outs).to(out.dtype))
    return out.view(T, K, -1)


class MoEFeedForward(nn.Module):
    """Gate, experts, and the weighted mix of the experts that answered."""

    def __init__(
        self,
        d_model: int,
        n_expert: int,
        top_k: int,
        d_hidden: int,
        capacity_factor: float,
        dropout: float,
    ):
        super().__init__()
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.gate = nn.Linear(d_model, n_expert, bias=False)
        self.experts: nn.Module = LocalExperts(Expert(d_model, d_hidden) for _ in range(n_expert))
        self.drop = nn.Dropout(dropout)
        self.balance_loss: torch.Tensor | None = None  # of the last forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        x_TC = x.reshape(B * T, C)
        live_E = self.experts.live().to(x.device)
        routing = route(self.gate(x_TC), self.top_k, live_E, self.capacity_factor)
        out_TKC, answered_TK = self.experts(x_TC, routing.experts_TK)
        weights_TK = renormalise(routing.weights_TK, answered_TK)
        y_TC = (weights_TK.unsqueeze(-1).to(out_TKC.dtype) * out_TKC).sum(1)
        self.balance_loss = load_balancing_loss(routing.probs_TE, routing.experts_TK, live_E)
        return self.drop(y_TC.view(B, T, C))


class MoEBlock(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float, moe: MoEFeedForward):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.moe(self.ln2(x))


class GPTMoE(GPT):
    """GPT with a mixture of ``n_expert`` experts (``top_k`` per token) in every block."""

    def __init__(
        self,
        vocab_size: int,
        n_layer: int = 4,
        n_head: int = 4,
        d_model: int = 128,
        seq_len: int = 128,
        dropout: float = 0.0,
        n_expert: int = 4,
        top_k: int = 2,
        d_expert: int = 0,
        capacity_factor: float = 2.0,
        aux_loss_weight: float = 0.01,
    ):
        if not 1 <= top_k <= n_expert:
            raise ValueError(
                f"model.top_k ({top_k}) must be between 1 and model.n_expert ({n_expert})"
            )
        # Read by _block while GPT's constructor builds the blocks.
        self.n_expert, self.top_k, self.aux_loss_weight = n_expert, top_k, aux_loss_weight
        self._d_hidden, self._capacity_factor = d_expert or 4 * d_model, capacity_factor
        super().__init__(vocab_size, n_layer, n_head, d_model, seq_len, dropout)

    def _block(self, d_model: int, n_head: int, dropout: float) -> nn.Module:
        moe = MoEFeedForward(
            d_model, self.n_expert, self.top_k, self._d_hidden, self._capacity_factor, dropout
        )
        return MoEBlock(d_model, n_head, dropout, moe)

    def moe_layers(self) -> list[MoEFeedForward]:
        return [block.moe for block in self.blocks]

    def expert_slots(self) -> list[tuple[int, int, nn.Module]]:
        """``(layer, expert, module)`` in the expert space's order: expert-major."""
        layers = self.moe_layers()
        return [
            (layer, e, layers[layer].experts[e])
            for e in range(self.n_expert)
            for layer in range(len(layers))
        ]

    def auxiliary_loss(self) -> torch.Tensor | None:
        """The weighted load-balancing loss of the last forward (a mean over its tokens)."""
        losses = [m.balance_loss for m in self.moe_layers() if m.balance_loss is not None]
        if not losses or self.aux_loss_weight == 0:
            return None
        return self.aux_loss_weight * torch.stack(losses).sum()

    def pipeline_layers(self):  # GPT's split does not apply: the blocks hold remote experts
        raise NotImplementedError("model=gpt_moe runs with strategy=moe or a data-parallel one")

    def flops_per_token(self) -> int:
        """Training FLOPs per token of the *active* parameters (trunk + top_k experts per layer)."""
        expert_params = sum(p.numel() for _, _, m in self.expert_slots() for p in m.parameters())
        trunk = sum(p.numel() for p in self.parameters()) - expert_params
        active = trunk + expert_params * self.top_k // self.n_expert
        L, d, T = len(self.blocks), self.wte.embedding_dim, self.seq_len
        return 6 * active + 12 * L * d * T
