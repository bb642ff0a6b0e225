"""An optimizer over one flat tensor (the whole model for DDP, a rank's shard for ZeRO).

AdamW and SGD are element-wise, so one update over a flat tensor is exactly
the per-parameter update, and a sharded run can be compared with a plain
one-process ``torch.optim`` reference (``OptimizerSpec.build``). The flat
update is written out here rather than run through ``torch.optim``: the
first ``torch.optim.Optimizer`` built in a process imports ``torch._dynamo``
(1.4 s of a worker's start-up, measured), and the flat state is then plain
tensors a checkpoint can slice. The arithmetic follows torch's single-tensor
code path operation for operation, so both round identically.
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
    """AdamW or SGD over one flat fp32 tensor whose gradient is another flat tensor.

    ``flat_param`` is updated in place, so views into it (model parameters)
    see every step; ``flat_grad`` is read, never written.
    """

    def __init__(self, spec: OptimizerSpec, flat_param: torch.Tensor, flat_grad: torch.Tensor):
        if spec.name not in ("adamw", "sgd"):
            raise ValueError(f"optimizer name must be 'adamw' or 'sgd', got {spec.name!r}")
        self.spec = spec
        self.param = flat_param
        self.grad = flat_grad
        # Zeros from the start: torch's SGD starts its momentum buffer as a
        # copy of the first gradient, which 0 * momentum + grad equals exactly.
        self._state = {key: torch.zeros_like(flat_param) for key in spec.state_keys()}
        self._steps = 0

    @property
    def step_count(self) -> int:
        return self._steps

    @torch.no_grad()
    def step(self, lr: float) -> None:
        self._steps += 1
        if self.spec.name == "adamw":
            self._adamw_step(lr)
        else:
            self._sgd_step(lr)

    def _adamw_step(self, lr: float) -> None:
        s, param, grad = self.spec, self.param, self.grad
        exp_avg, exp_avg_sq = self._state["exp_avg"], self._state["exp_avg_sq"]
        if s.weight_decay != 0:
            param.mul_(1 - lr * s.weight_decay)  # decoupled, as AdamW
        exp_avg.lerp_(grad, 1 - s.beta1)
        exp_avg_sq.mul_(s.beta2).addcmul_(grad, grad, value=1 - s.beta2)
        step = float(self._steps)
        step_size = lr / (1 - s.beta1**step)
        bias_correction2_sqrt = (1 - s.beta2**step) ** 0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(s.eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)

    def _sgd_step(self, lr: float) -> None:
        s, param, grad = self.spec, self.param, self.grad
        if s.weight_decay != 0:
            grad = grad.add(param, alpha=s.weight_decay)
        if s.momentum != 0:
            buf = self._state["momentum_buffer"]
            buf.mul_(s.momentum).add_(grad)
            grad = buf
        param.add_(grad, alpha=-lr)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The flat per-element state (e.g. Adam moments)."""
        return dict(self._state)

    def load_state(self, tensors: dict[str, torch.Tensor], step_count: int) -> None:
        """Restore per-element state (each the length of this optimizer's flat tensor)."""
        for key, dst in self._state.items():
            if key not in tensors:
                raise KeyError(f"optimizer state {key!r} missing from checkpoint")
            dst.copy_(tensors[key])
        self._steps = step_count

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._state.values())
