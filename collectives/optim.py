"""An optimizer over one flat tensor (the whole model for DDP, a rank's shard for ZeRO).

Running ``torch.optim`` over a single flat parameter gives exactly the
element-wise math of the per-parameter optimizer (AdamW and SGD are
element-wise), so a sharded run can be compared bit-for-bit-ish with a plain
one-process reference, and its state is a handful of flat tensors that a
checkpoint can slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class OptimizerSpec:
    name: str = "adamw"  # adamw | sgd
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    momentum: float = 0.0  # sgd only

    def build(self, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        """The torch optimizer this spec describes (also used by one-process references)."""
        # foreach=False: the single-tensor code path is the one a CPU
        # reference uses by default, so both sides round identically.
        if self.name == "adamw":
            return torch.optim.AdamW(
                params,
                lr=lr,
                betas=(self.beta1, self.beta2),
                eps=self.eps,
                weight_decay=self.weight_decay,
                foreach=False,
            )
        if self.name == "sgd":
            return torch.optim.SGD(
                params, lr=lr, momentum=self.momentum, weight_decay=self.weight_decay, foreach=False
            )
        raise ValueError(f"optimizer name must be 'adamw' or 'sgd', got {self.name!r}")

    def state_keys(self) -> tuple[str, ...]:
        """Names of the per-element state tensors this optimizer keeps."""
        if self.name == "adamw":
            return ("exp_avg", "exp_avg_sq")
        return ("momentum_buffer",) if self.momentum > 0 else ()


class FlatOptimizer:
    """``torch.optim`` over one flat fp32 tensor whose gradient is another flat tensor.

    ``flat_param`` and ``flat_grad`` are updated in place, so views into them
    (model parameters, gradient buckets) see every step.
    """

    def __init__(self, spec: OptimizerSpec, flat_param: torch.Tensor, flat_grad: torch.Tensor):
        self.spec = spec
        self.param = nn.Parameter(flat_param, requires_grad=True)
        # nn.Parameter(t) shares t's storage; keep the original views valid.
        assert self.param.data_ptr() == flat_param.data_ptr()
        self.param.grad = flat_grad
        self._opt = spec.build([self.param], lr=0.0)

    @property
    def step_count(self) -> int:
        state = self._opt.state.get(self.param, {})
        step = state.get("step")
        return int(step) if step is not None else 0

    def step(self, lr: float) -> None:
        for group in self._opt.param_groups:
            group["lr"] = lr
        self._opt.step()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The flat per-element state (e.g. Adam moments), created as zeros if not yet stepped."""
        state = self._opt.state[self.param]
        for key in self.spec.state_keys():
            if key not in state:
                state[key] = torch.zeros_like(self.param, memory_format=torch.preserve_format)
        if self.spec.name == "adamw" and "step" not in state:
            state["step"] = torch.tensor(0.0)
        return {key: state[key] for key in self.spec.state_keys()}

    def load_state(self, tensors: dict[str, torch.Tensor], step_count: int) -> None:
        """Restore per-element state (each the length of this optimizer's flat tensor)."""
        mine = self.state_tensors()
        for key, dst in mine.items():
            if key not in tensors:
                raise KeyError(f"optimizer state {key!r} missing from checkpoint")
            dst.copy_(tensors[key])
        if self.spec.name == "adamw":
            self._opt.state[self.param]["step"] = torch.tensor(float(step_count))

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_tensors().values())
