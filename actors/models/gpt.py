"""A small decoder-only transformer (GPT), in the spirit of nanoGPT.

The model contract shoal relies on, which a user's own ``nn.Module`` must
follow too: the constructor accepts ``vocab_size`` (given by the dataset) and
``seq_len``; ``forward(idx)`` takes a ``LongTensor[B, T]`` with ``T <= seq_len``
and returns logits ``[B, T, vocab_size]``. Loss and its scaling are the
trainer's job, so that data parallelism can normalise by the global batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # [B, T, C] -> [B, n_head, T, head_dim]
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, d_model: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.proj = nn.Linear(4 * d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class _Embed(nn.Module):
    """Token plus position embeddings: the first of ``GPT.pipeline_layers``."""

    def __init__(self, wte: nn.Embedding, wpe: nn.Embedding, drop: nn.Dropout, seq_len: int):
        super().__init__()
        self.wte, self.wpe, self.drop, self.seq_len = wte, wpe, drop, seq_len

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return _embed(self.wte, self.wpe, self.drop, self.seq_len, idx)


def _embed(
    wte: nn.Embedding, wpe: nn.Embedding, drop: nn.Dropout, seq_len: int, idx: torch.Tensor
) -> torch.Tensor:
    T = idx.shape[1]
    if T > seq_len:
        raise ValueError(f"sequence of length {T} is longer than model.seq_len={seq_len}")
    return drop(wte(idx) + wpe(torch.arange(T, device=idx.device)))


class GPT(nn.Module):
    """Token + position embeddings, ``n_layer`` pre-norm blocks, a tied LM head."""

    def __init__(
        self,
        vocab_size: int,
        n_layer: int = 4,
        n_head: int = 4,
        d_model: int = 128,
        seq_len: int = 128,
        dropout: float = 0.0,
    ):
        super().__init__()
        if d_model % n_head != 0:
            raise ValueError(
                f"model.d_model ({d_model}) must be divisible by model.n_head ({n_head})"
            )
        self.seq_len = seq_len
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(seq_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(self._block(d_model, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        # Weight tying: fewer parameters and better small-model perplexity.
        self.lm_head.weight = self.wte.weight
        self.init_parameters(self)

    def init_parameters(self, module: nn.Module) -> None:
        """Initialise ``module`` (this model or a part of it) by GPT-2's rules.

        The constructor applies it to the whole model; a lazy build
        (``collectives/lazy_init.py``, ``offload.params``) to one block at a time.
        """
        module.apply(self._init_weights)
        # GPT-2's scaled init of residual projections keeps the residual stream's
        # variance from growing with depth.
        for name, p in module.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * len(self.blocks)))

    def _block(self, d_model: int, n_head: int, dropout: float) -> nn.Module:
        """One transformer block (a subclass may put something else in the MLP's place)."""
        return Block(d_model, n_head, dropout)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = _embed(self.wte, self.wpe, self.drop, self.seq_len, idx)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def pipeline_layers(self) -> list[tuple[str, nn.Module]]:
        """The model as a sequence of single-tensor layers, for ``strategy=pipeline``.

        Composed in order they compute ``forward``. The head uses the tied
        embedding matrix, which the pipeline keeps equal on both stages.
        """
        return [
            ("embed", _Embed(self.wte, self.wpe, self.drop, self.seq_len)),
            *((f"blocks.{i}", block) for i, block in enumerate(self.blocks)),
            ("head", nn.Sequential(self.ln_f, self.lm_head)),
        ]

    def flops_per_token(self) -> int:
        """Approximate training FLOPs per token (6N + attention), for MFU and ETA estimates."""
        n_params = sum(p.numel() for p in self.parameters())
        L, d, T = len(self.blocks), self.wte.embedding_dim, self.seq_len
        return 6 * n_params + 12 * L * d * T
