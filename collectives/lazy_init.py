"""Materialise a model built on the meta device one ZeRO-3 unit at a time.

With ``offload.params`` a worker must never hold the whole model: that is
the point of moving parameters to host memory or NVMe. So the runtime builds
the model under ``torch.device("meta")`` (shapes only, no memory) and the
ZeRO-3 engine asks :class:`LazyInit` for one unit's parameters at a time,
copies its piece to the tier and frees them before the next unit.

A unit is initialised by its module's own initialisers: ``reset_parameters()``
of every submodule that has one (``nn.Linear``, ``nn.Embedding``,
``nn.LayerNorm``, ...), then the model's ``init_parameters(module)`` if it
defines one (shoal's GPT does: the same rule its constructor applies). Each
unit draws from its own generator state, seeded by ``(seed, unit index)``, so
the weights do not depend on the number of workers, but they are not the
weights an eager build with the same seed gets (that one draws all units from
one stream). A parameter no initialiser wrote is an error naming it, never
left as uninitialised memory.

Tied parameters (GPT's LM head is its token embedding) are one parameter:
it is created once, in the unit that owns it, and every module that refers
to it is pointed at it.
"""

from __future__ import annotations

import torch
from torch import nn


def unit_seed(seed: int, unit: int) -> int:
    """The seed of unit ``unit``'s initialisation (a pure function of the run's seed)."""
    return (seed * 1_000_003 + unit + 1) % (2**63)


class LazyInit:
    """One meta-device model's parameters, made real unit by unit (see the module docstring)."""

    def __init__(self, model: nn.Module, seed: int):
        self.model = model
        self.seed = seed
        meta_buffers = [name for name, b in model.named_buffers() if b.is_meta]
        if meta_buffers:
            raise ValueError(
                f"a model built on the meta device has buffers {meta_buffers[:3]}, which cannot "
                "be initialised one unit at a time; offload.params needs a model without buffers"
            )
        # Where each parameter is referred to: tied ones from several modules.
        self._refs: dict[int, list[tuple[nn.Module, str]]] = {}
        for m in model.modules():
            for name, p in m._parameters.items():
                if p is not None:
                    self._refs.setdefault(id(p), []).append((m, name))
        self._names = {id(p): name for name, p in model.named_parameters()}
        self._real: dict[int, nn.Parameter] = {}  # id of the meta parameter -> its real one

    def current(self, p: nn.Parameter) -> nn.Parameter:
        """The parameter that replaced meta parameter ``p`` (``p`` itself if none did)."""
        return self._real.get(id(p), p)

    @torch.no_grad()
    def materialize(self, module: nn.Module | None, params: list[nn.Parameter], unit: int) -> None:
        """Create ``params`` (unit ``unit``'s, all inside ``module``) and initialise them."""
        if module is None:
            names = [self._names.get(id(p), "?") for p in params]
            raise ValueError(
                f"parameters {names} belong to no submodule of the model, so nothing "
                "initialises them one unit at a time; offload.params needs every parameter "
                "inside a submodule (e.g. an nn.Linear, or a module with reset_parameters())"
            )
        mine = []
        for p in params:
            real = nn.Parameter(
                torch.full(p.shape, float("nan"), dtype=p.dtype), requires_grad=p.requires_grad
            )
            for owner, name in self._refs[id(p)]:
                owner._parameters[name] = real
            self._real[id(p)] = real
            mine.append(real)
        # A tied parameter of another, earlier unit is backed by that unit's freed
        # buffer: the initialisers here get scratch memory for it instead.
        own = {id(p) for p in mine}
        lent = [(q, q.data) for q in module.parameters() if id(q) not in own and not q.is_meta]
        for q, _ in lent:
            q.data = torch.empty(q.shape, dtype=q.dtype)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(unit_seed(self.seed, unit))
                self._initialise(module)
        finally:
            for q, data in lent:
                q.data = data
        for p, real in zip(params, mine, strict=True):
            if torch.isnan(real).any():
                raise ValueError(
                    f"parameter {self._names.get(id(p), '?')!r} was not initialised: a model "
                    "built lazily (offload.params) is initialised by its modules' "
                    "reset_parameters() and the model's init_parameters(module); give its "
                    "module one of them"
                )

    def _initialise(self, module: nn.Module) -> None:
        for sub in module.modules():
            reset = getattr(sub, "reset_parameters", None)
            if callable(reset):
                reset()
        hook = getattr(self.model, "init_parameters", None)
        if callable(hook):
            hook(module)

    def done(self) -> None:
        """Every parameter must be real now."""
        left = [name for name, p in self.model.named_parameters() if p.is_meta]
        if left:
            raise ValueError(f"parameters {left[:3]} are still on the meta device")
