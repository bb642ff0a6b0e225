"""Failures classified by what raised them, not by their message.

A rank whose collective fails because a peer went away is a survivor, and
the job recovers; a rank whose own code fails (the user's model, bad data)
has a bug, and retrying would fail again. Gloo reports a lost peer as a
plain ``RuntimeError`` ("Connection closed by peer"), so the type alone
cannot tell; where it was raised can: inside ``torch.distributed`` or
shoal's ``collectives`` (a collective, a rendezvous, a replica exchange),
or anywhere else. ``PeerLostError`` carries that verdict to the controller.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

F = TypeVar("F", bound=Callable[..., Any])
_COLLECTIVE_MODULES = ("collectives.", "torch.distributed")


class PeerLostError(RuntimeError):
    """A collective of this rank failed because a peer is gone (or its group was torn down)."""


def raised_by_a_collective(error: BaseException) -> bool:
    """Whether ``error`` comes from a collective: its type says so, or where it was raised."""
    if isinstance(error, PeerLostError | dist.DistError):
        return True
    tb = error.__traceback__
    module = ""
    while tb is not None:  # the innermost Python frame is where it was raised
        module = tb.tb_frame.f_globals.get("__name__", "")
        tb = tb.tb_next
    return module.startswith(_COLLECTIVE_MODULES) and module != __name__


def classify_peer_loss(on_loss: Callable[[Any], None] | None = None) -> Callable[[F], F]:
    """Decorate a runtime method: a collective's failure is re-raised as ``PeerLostError``.

    ``on_loss(self)`` runs first (e.g. leave the broken group, so peers
    blocked on this rank fail at once). Any other error passes unchanged.
    """

    def decorate(method: F) -> F:
        @functools.wraps(method)
        def wrapper(self, *args: Any, **kwargs: Any) -> Any:
            try:
                return method(self, *args, **kwargs)
            except PeerLostError:
                if on_loss is not None:
                    on_loss(self)
                raise
            except Exception as e:
                if not raised_by_a_collective(e):
                    raise
                if on_loss is not None:
                    on_loss(self)
                raise PeerLostError(f"{type(e).__name__}: {e}") from e

        return wrapper  # type: ignore[return-value]

    return decorate
