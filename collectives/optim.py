"""An optimizer over one flat tensor (the whole model for DDP, a rank's shard for ZeRO).

AdamW, SGD and Yogi are element-wise, so one update over a flat tensor is exactly
the per-parameter update, and a sharded run can be compared with a plain
one-process ``torch.optim`` reference (``OptimizerSpec.build``). The flat
update is written out here rather than run through ``torch.optim``: the
first ``torch.optim.Optimizer`` built in a process imports ``torch._dynamo``
(1.4 s of a worker's start-up, measured), and the flat state is then plain
tensors a checkpoint can slice. The arithmetic follows torch's single-tensor
code path operation for operation, so both round identically.

Yogi (Zaheer et al. 2018, "Adaptive methods for nonconvex optimization"),
which FedYogi runs on the server (Reddi et al. 2021, "Adaptive federated
optimization"), has no torch optimizer: ``OptimizerSpec.build`` refuses it,
and its flat update is checked against an element-wise reference instead.

Weight decay applies to matrices only (parameters with ``>= 2`` dims:
linear weights and embeddings), never to biases or norm weights, as in
nanoGPT's ``configure_optimizers``. The decayed elements of a flat tensor are
a union of contiguous ranges of the layout (:func:`decay_ranges`); the flat
optimizer keeps views of them, made once, and decays them with one
``torch._foreach_*`` call per step. A mask tensor would cost a byte (bool)
or four (a float factor) per element of persistent memory, next to Adam's
eight, for the same result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from collectives.flat import FlatLayout


def decays(shape: Sequence[int]) -> bool:
    """Whether a parameter of this shape is weight-decayed: matrices and embeddings, not vectors."""
    return len(shape) >= 2


def decay_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """Torch optimizer parameter groups: matrices with ``weight_decay``, the rest without."""
    decayed = [p for p in params if decays(p.shape)]
    kept = [p for p in params if not decays(p.shape)]
    return [
        {"params": ps, "weight_decay": wd}
        for ps, wd in ((decayed, weight_decay), (kept, 0.0))
        if ps
    ]


def decay_ranges(layout: FlatLayout, lo: int = 0, hi: int | None = None) -> list[tuple[int, int]]:
    """The decayed elements of the flat range ``[lo, hi)``, as ranges relative to ``lo``.

    Maximal runs of consecutive decayed slots, clipped to ``[lo, hi)``
    (``hi`` defaults to the layout's end), in increasing order.
    """
    hi = layout.numel if hi is None else hi
    runs: list[tuple[int, int]] = []
    for slot in layout.slots:
        a, b = max(slot.offset, lo), min(slot.end, hi)
        if a >= b or not decays(slot.shape):
            continue
        if runs and runs[-1][1] == a - lo:
            runs[-1] = (runs[-1][0], b - lo)
        else:
            runs.append((a - lo, b - lo))
    return runs


def _split_sizes(ranges: Sequence[tuple[int, int]], n: int) -> list[int]:
    """Sizes that split ``[0, n)`` into alternating kept / decayed pieces, a kept one first.

    Piece ``2k + 1`` is ``ranges[k]``; kept pieces may be empty.
    """
    sizes, pos = [], 0
    for a, b in ranges:
        if not (pos <= a < b <= n):
            raise ValueError(f"decay ranges must be sorted, disjoint and inside [0, {n}): {ranges}")
        sizes += [a - pos, b - a]
        pos = b
    sizes.append(n - pos)
    return sizes


# read(key, lo, hi) -> elements [lo, hi) of the flat tensor ``key`` (a checkpoint, a peer's copy)
FlatRead = Callable[[str, int, int], torch.Tensor]

# The optimizers FlatOptimizer implements.
OPTIMIZER_NAMES = ("adamw", "sgd", "yogi")


def _unknown(name: str) -> ValueError:
    return ValueError(f"optimizer name must be 'adamw', 'sgd' or 'yogi', got {name!r}")


@dataclass(frozen=True)
class OptimizerSpec:
    name: str = "adamw"  # adamw | sgd | yogi
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8  # adamw, yogi (FedYogi's adaptivity tau)
    momentum: float = 0.0  # sgd only

    def build(self, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        """The torch optimizer this spec describes (also used by one-process references).

        Two parameter groups, as nanoGPT's ``configure_optimizers``: matrices
        (``>= 2`` dims) with ``weight_decay``, the rest with none. Yogi raises
        ``ValueError``: torch has no Yogi optimizer.
        """
        if self.name == "yogi":
            raise ValueError(
                "optimizer 'yogi' has no torch.optim equivalent to build; "
                "use FlatOptimizer (collectives/optim.py)"
            )
        groups = decay_groups(params, self.weight_decay)
        # foreach=False: the single-tensor code path is the one a CPU
        # reference uses by default, so both sides round identically.
        if self.name == "adamw":
            return torch.optim.AdamW(
                groups, lr=lr, betas=(self.beta1, self.beta2), eps=self.eps, foreach=False
            )
        if self.name == "sgd":
            return torch.optim.SGD(groups, lr=lr, momentum=self.momentum, foreach=False)
        raise _unknown(self.name)

    def state_keys(self) -> tuple[str, ...]:
        """Names of the per-element state tensors this optimizer keeps."""
        if self.name in ("adamw", "yogi"):
            return ("exp_avg", "exp_avg_sq")
        return ("momentum_buffer",) if self.momentum > 0 else ()


def initial_state(spec: OptimizerSpec) -> dict[str, float]:
    """Each per-element state tensor's starting value (every element the same)."""
    # Zeros: torch's SGD starts its momentum buffer as a copy of the first
    # gradient, which 0 * momentum + grad equals exactly. Yogi: v_{-1} = tau^2,
    # the least FedYogi's Algorithm 2 allows. Zero would be safe too (Yogi keeps
    # v >= 0 from any start); the difference is a denominator near 2 tau instead
    # of tau for coordinates whose updates stay far below tau.
    start = {key: 0.0 for key in spec.state_keys()}
    if spec.name == "yogi":
        start["exp_avg_sq"] = spec.eps**2
    return start


@torch.no_grad()
def flat_update(
    spec: OptimizerSpec,
    step: int,
    lr: float,
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict[str, torch.Tensor],
    decayed_param: list[torch.Tensor],
    split: list[int],
) -> None:
    """One optimizer step (the ``step``-th) over a flat range: the whole tensor, or a chunk.

    Every operation is element-wise, so running this over consecutive chunks of
    a flat tensor gives the same elements as one call over all of it: the
    offloaded optimizer (``collectives/offloaded_optim.py``) streams its state
    through this function chunk by chunk. ``decayed_param`` are the views of
    ``param`` that weight decay applies to, ``split`` the kept / decayed piece
    sizes of ``[0, param.numel())`` (:func:`_split_sizes`).
    """
    if spec.name == "adamw":
        _adamw_update(spec, step, lr, param, grad, state, decayed_param)
    elif spec.name == "yogi":
        _yogi_update(spec, lr, param, grad, state, decayed_param)
    else:
        _sgd_update(spec, lr, param, grad, state, decayed_param, split)


def _adamw_update(
    s: OptimizerSpec,
    step: int,
    lr: float,
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict[str, torch.Tensor],
    decayed_param: list[torch.Tensor],
) -> None:
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    if s.weight_decay != 0 and decayed_param:
        # Decoupled, as AdamW: each decayed piece times the same scalar as torch's.
        torch._foreach_mul_(decayed_param, 1 - lr * s.weight_decay)
    exp_avg.lerp_(grad, 1 - s.beta1)
    exp_avg_sq.mul_(s.beta2).addcmul_(grad, grad, value=1 - s.beta2)
    step_f = float(step)
    step_size = lr / (1 - s.beta1**step_f)
    bias_correction2_sqrt = (1 - s.beta2**step_f) ** 0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(s.eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


def _yogi_update(
    s: OptimizerSpec,
    lr: float,
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict[str, torch.Tensor],
    decayed_param: list[torch.Tensor],
) -> None:
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    if s.weight_decay != 0 and decayed_param:
        torch._foreach_mul_(decayed_param, 1 - lr * s.weight_decay)
    exp_avg.lerp_(grad, 1 - s.beta1)
    # v -= (1 - beta2) * g^2 * sign(v - g^2): Adam's v moves a fraction of
    # the way to g^2; Yogi's moves by a fixed share of g^2 towards it, so a
    # run of small gradients shrinks v slowly instead of geometrically.
    grad_sq = grad.square()
    change = torch.sub(exp_avg_sq, grad_sq).sign_().mul_(grad_sq)
    exp_avg_sq.sub_(change, alpha=1 - s.beta2)
    denom = exp_avg_sq.sqrt().add_(s.eps)
    param.addcdiv_(exp_avg, denom, value=-lr)


def _sgd_update(
    s: OptimizerSpec,
    lr: float,
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict[str, torch.Tensor],
    decayed_param: list[torch.Tensor],
    split: list[int],
) -> None:
    if s.weight_decay != 0 and decayed_param:
        grad = grad.clone()  # grad + weight_decay * param, on the decayed pieces only
        decayed_grad = list(grad.split(split)[1::2])
        torch._foreach_add_(decayed_grad, decayed_param, alpha=s.weight_decay)
    if s.momentum != 0:
        buf = state["momentum_buffer"]
        buf.mul_(s.momentum).add_(grad)
        grad = buf
    param.add_(grad, alpha=-lr)


class FlatOptimizer:
    """AdamW, SGD or Yogi over one flat fp32 tensor whose gradient is another flat tensor.

    ``flat_param`` is updated in place, so views into it (model parameters)
    see every step; ``flat_grad`` is read, never written. ``decayed`` lists
    the ranges of ``flat_param`` (offsets into it) that weight decay applies
    to: ``decay_ranges(layout, lo, hi)`` for the shard ``[lo, hi)`` of a
    layout.

    Yogi is the update as both papers write it (Zaheer et al. 2018 and
    FedYogi in Reddi et al. 2021, Algorithm 2): no bias correction, and the
    second moment starts at ``eps ** 2`` rather than 0 (FedYogi asks for
    ``v_{-1} >= tau ** 2``, ``tau`` being ``eps`` here). Adam's bias
    correction assumes a zero start, so it is left out rather than
    half-applied. TFF's and TF Addons' Yogi differ on both counts (bias
    correction, ``v`` starting at 1e-6): over the first ~``1 / (1 - beta2)``
    steps their step sizes differ from these. As a server optimizer, pass
    the negated average client update as the gradient (the step then moves
    *along* the update). Weight decay is decoupled, as in AdamW.
    """

    def __init__(
        self,
        spec: OptimizerSpec,
        flat_param: torch.Tensor,
        flat_grad: torch.Tensor,
        *,
        decayed: Sequence[tuple[int, int]],
    ):
        if spec.name not in OPTIMIZER_NAMES:
            raise _unknown(spec.name)
        self.spec = spec
        self.param = flat_param
        self.grad = flat_grad
        # Pieces of a flat tensor alternate kept / decayed; the decayed ones of the
        # parameter are views made once (it is updated in place, never replaced).
        self._split = _split_sizes(decayed, flat_param.numel())
        self._decayed_param = list(flat_param.split(self._split)[1::2])
        self._state = {
            key: torch.full_like(flat_param, value) for key, value in initial_state(spec).items()
        }
        self._steps = 0

    @property
    def step_count(self) -> int:
        return self._steps

    @torch.no_grad()
    def step(self, lr: float) -> None:
        self._steps += 1
        flat_update(
            self.spec,
            self._steps,
            lr,
            self.param,
            self.grad,
            self._state,
            self._decayed_param,
            self._split,
        )

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

    def load_from(self, read: FlatRead, offset: int, step_count: int) -> None:
        """Restore state from ``read(key, lo, hi)``, this optimizer's element 0 being ``offset``."""
        n = self.param.numel()
        keys = self.spec.state_keys()
        self.load_state({key: read(key, offset, offset + n) for key in keys}, step_count)

    def set_step_count(self, steps: int) -> None:
        """Count ``steps`` steps taken (Adam's bias correction follows the count)."""
        self._steps = steps

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._state.values())

    def close(self) -> None:
        """Nothing to release: the state is plain tensors (see ``OffloadedOptimizer.close``)."""
