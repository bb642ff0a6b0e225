"""``MemberActor``: the one Ray actor class that hosts any role's runtime.

A program names, per role, a runtime class (``"actors.dp_runtime:DataParallelRuntime"``
for a data-parallel worker; later a pipeline stage, an expert host, a
federated client). The actor builds it and runs its methods. Two threads:
training calls (steps, checkpoints, epoch changes) run one at a time, in
order, on the default thread; the runtime's ``CONTROL_METHODS`` — what the
controller asks during a recovery, such as which copies of state a worker
holds — run on the "control" thread, so they are answered even when a step
is stuck in a collective whose peers have gone.

Ray does not restart the actor on failure (``max_restarts=0``): replacing a
lost member is the controller's decision, not Ray's.

``RuntimeHandle`` lets the controller call ``handle.train_step.remote(...)``
as if the runtime were the actor, and routes control methods to their thread.
"""

from __future__ import annotations

import importlib
from typing import Any

import ray


def load_runtime(path: str) -> type:
    """The class named ``"package.module:Class"`` (a path from a program, never from a user)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@ray.remote(max_restarts=0, max_task_retries=0, concurrency_groups={"control": 1})
class MemberActor:
    """Hosts one runtime; ``call`` and ``control`` run its methods by name."""

    def __init__(self, runtime: str, *args: Any):
        self.runtime = load_runtime(runtime)(*args)
        self._control = frozenset(getattr(self.runtime, "CONTROL_METHODS", ()))

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.runtime, method)(*args, **kwargs)

    @ray.method(concurrency_group="control")
    def alive(self) -> bool:
        """Answers at once, also while a call runs: how the controller sees a member is up."""
        return True

    @ray.method(concurrency_group="control")
    def goodbye(self) -> None:
        """The job is ending: the runtime's ``shutdown()``, if it has one (e.g. a gateway telling
        its volunteers), beside any call still running."""
        shutdown = getattr(self.runtime, "shutdown", None)
        if callable(shutdown):
            shutdown()

    @ray.method(concurrency_group="control")
    def control(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if method not in self._control:
            raise ValueError(f"{method!r} is not a control method of {type(self.runtime)}")
        return getattr(self.runtime, method)(*args, **kwargs)


class _RemoteMethod:
    def __init__(self, actor: Any, name: str, control: bool):
        self._actor, self._name, self._control = actor, name, control

    def remote(self, *args: Any, **kwargs: Any) -> ray.ObjectRef:
        target = self._actor.control if self._control else self._actor.call
        return target.remote(self._name, *args, **kwargs)


class RuntimeHandle:
    """A member's runtime as the controller sees it: ``handle.method.remote(...)``."""

    def __init__(self, actor: Any, control_methods: frozenset[str]):
        self.actor = actor
        self._control_methods = control_methods

    def __getattr__(self, name: str) -> _RemoteMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        return _RemoteMethod(self.actor, name, name in self._control_methods)
