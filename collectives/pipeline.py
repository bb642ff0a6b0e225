"""Running one stage's schedule: forwards and backwards, activations sent point-to-point.

Stage ``s`` receives micro-batch ``i``'s input activation from stage
``s - 1`` and sends its output to ``s + 1``; in the backward the gradient
of that output comes back from ``s + 1`` and the gradient of the input goes
to ``s - 1``. Sends are asynchronous and waited for only at the end of the
step (as in ``torch.distributed.pipelining``), receives block: a stage waits
only for what it needs next, which is what makes any consistent pair of
schedules (``collectives/pipeline_schedule.py``) deadlock-free.

Every activation is preceded by a small header (its dtype and shape), so
micro-batches of different sizes and bf16 activations need no set-up
handshake. The executor measures what the pipeline's efficiency depends on:
the stage's *busy* time (its own forwards and backwards), the time it waited
for its neighbours, and the peak bytes of activations it held for backward.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from collectives.pipeline_schedule import Action

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_MAX_DIMS = 8
_HEADER = 2 + _MAX_DIMS  # dtype code, number of dims, the dims


@dataclass(frozen=True)
class ScheduleStats:
    busy_s: float  # this stage's own forward and backward compute
    wait_s: float  # blocked receiving from a neighbour
    span_s: float  # the whole schedule, first action to last send completed
    peak_activation_bytes: int  # most bytes saved for backward at once


def _header(t: torch.Tensor) -> torch.Tensor:
    if t.dim() > _MAX_DIMS or t.dtype not in _DTYPES:
        raise TypeError(
            f"a stage's output must be a float tensor of at most {_MAX_DIMS} dims, got "
            f"{t.dtype} of shape {tuple(t.shape)}"
        )
    h = torch.zeros(_HEADER, dtype=torch.int64)
    h[0], h[1] = _DTYPES.index(t.dtype), t.dim()
    h[2 : 2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    return h


class StageExecutor:
    """Runs a stage's actions; ``prev``/``next`` are neighbours' global ranks (None at the ends).

    ``loss_fn(output, i)`` (last stage only) returns the micro-batch's loss,
    already scaled for the backward. ``inputs[i]`` (first stage only) is
    micro-batch ``i``'s model input.
    """

    def __init__(
        self,
        module: nn.Module,
        prev: int | None,
        next: int | None,
        device: torch.device,
        is_parameter: Callable[[torch.Tensor], bool],
        autocast_dtype: torch.dtype | None = None,
    ):
        self.module, self.prev, self.next, self.device = module, prev, next, device
        self._is_parameter = is_parameter
        self._autocast = autocast_dtype

    # -- point-to-point ------------------------------------------------------

    def _send(self, t: torch.Tensor, dst: int, tag: int, works: list) -> None:
        t = t.detach().contiguous()
        works.append(dist.isend(_header(t).to(t.device), dst, tag=tag))
        works.append(dist.isend(t, dst, tag=tag))

    def _recv(self, src: int, tag: int) -> torch.Tensor:
        h = torch.zeros(_HEADER, dtype=torch.int64, device=self.device)
        dist.recv(h, src, tag=tag)
        h = h.cpu()
        shape = [int(d) for d in h[2 : 2 + int(h[1])]]
        t = torch.empty(shape, dtype=_DTYPES[int(h[0])], device=self.device)
        dist.recv(t, src, tag=tag)
        return t

    # -- the schedule --------------------------------------------------------

    def run(
        self,
        actions: list[Action],
        inputs: list[torch.Tensor] | None,
        loss_fn: Callable[[torch.Tensor, int], torch.Tensor] | None,
        *,
        train: bool = True,
        on_output: Callable[[torch.Tensor, int], None] | None = None,
    ) -> ScheduleStats:
        """Run ``actions``; ``train=False``: forwards only, no grad (``on_output`` per output)."""
        start = time.perf_counter()
        busy = wait = 0.0
        works: list = []
        saved: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}
        sizes: dict[int, int] = {}
        live = peak = 0

        for kind, i in actions:
            if kind == "F":
                if self.prev is None:
                    x = inputs[i].to(self.device)
                else:
                    t0 = time.perf_counter()
                    x = self._recv(self.prev, 2 * i)
                    wait += time.perf_counter() - t0
                    if train:
                        x.requires_grad_(True)
                t0 = time.perf_counter()
                out, nbytes = self._forward(x, train)
                if self.next is None:
                    if train:
                        out = loss_fn(out, i)
                    elif on_output is not None:
                        on_output(out, i)
                busy += time.perf_counter() - t0
                if self.next is not None:
                    self._send(out, self.next, 2 * i, works)
                if train:
                    saved[i] = (x if self.prev is not None else None, out)
                    sizes[i] = nbytes
                    live += nbytes
                    peak = max(peak, live)
            else:
                x, out = saved.pop(i)
                grad = None
                if self.next is not None:
                    t0 = time.perf_counter()
                    grad = self._recv(self.next, 2 * i + 1)
                    wait += time.perf_counter() - t0
                t0 = time.perf_counter()
                torch.autograd.backward(out, grad_tensors=grad)
                busy += time.perf_counter() - t0
                live -= sizes.pop(i)
                if x is not None:
                    self._send(x.grad, self.prev, 2 * i + 1, works)
        t0 = time.perf_counter()
        for w in works:
            w.wait()
        wait += time.perf_counter() - t0
        return ScheduleStats(busy, wait, time.perf_counter() - start, peak)

    def _forward(self, x: torch.Tensor, train: bool) -> tuple[torch.Tensor, int]:
        """The stage's forward; returns the output and the bytes it saved for backward."""
        nbytes = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal nbytes
            if not self._is_parameter(t):
                nbytes += t.numel() * t.element_size()
            return t

        enabled = self._autocast is not None
        dtype = self._autocast or torch.bfloat16
        with (
            torch.set_grad_enabled(train),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            torch.autocast(self.device.type, dtype, enabled=enabled),
        ):
            out = self.module(x)
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"a pipeline stage must return one tensor, got {type(out).__name__}: "
                "each layer of pipeline_layers() takes and returns a single tensor"
            )
        return out, nbytes
