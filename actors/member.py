"""``MemberActor``: the one Ray actor class that hosts any role's runtime.

A program names, per role, a runtime class (``"actors.dp_runtime:DataParallelRuntime"``
for a data-parallel worker; later a pipeline stage, an expert host, a
federated client). The actor builds it and runs its methods. Two threads:
training calls (steps, checkpoints, epoch changes) run one at a time, in
order, on the default thread; the runtime's ``CONTROL_METHODS`` — what the
controller asks during a recovery, such as which copies of state a worker
holds — run on the "control" thread, so they are answered even when a step
is stuck in a collective whose peers have gone. Its ``SERVE_METHODS`` run on
a pool of "serve" threads, several at once: calls that mostly wait on
someone else (the volunteer gateway relaying a call to a volunteer), so one
slow answer does not hold up the rest. A runtime with serve methods keeps
its own state thread-safe.

Ray does not restart the actor on failure (``max_restarts=0``): replacing a
lost member is the controller's decision, not Ray's.

``RuntimeHandle`` lets the controller call ``handle.train_step.remote(...)``
as if the runtime were the actor, and routes control methods to their thread.
"""

from __future__ import annotations

import importlib
import time
from typing import Any

import ray

from actors.member_log import member_log, position_of


def load_runtime(path: str) -> type:
    """The class named ``"package.module:Class"`` (a path from a program, never from a user)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


SERVE_THREADS = 16


@ray.remote(
    max_restarts=0,
    max_task_retries=0,
    concurrency_groups={"control": 1, "serve": SERVE_THREADS},
)
class MemberActor:
    """Hosts one runtime; ``call`` and ``control`` run its methods by name."""

    def __init__(self, runtime: str, *args: Any, role: str = "member"):
        self._log = member_log(args, role)
        self.runtime = load_runtime(runtime)(*args)
        self._control = frozenset(getattr(self.runtime, "CONTROL_METHODS", ()))
        self._serve = frozenset(getattr(self.runtime, "SERVE_METHODS", ()))

    def _run(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The runtime's ``method``, logged (``actors/member_log.py``)."""
        start = time.perf_counter()
        try:
            result = getattr(self.runtime, method)(*args, **kwargs)
        except Exception:
            if self._log is not None:
                self._log.failed(method)
            raise
        if self._log is not None:
            if method == "setup":
                self._log.set_position(*position_of(self.runtime, args[0] if args else None))
            self._log.called(method, time.perf_counter() - start)
        return result

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._run(method, args, kwargs)

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
        return self._run(method, args, kwargs)

    @ray.method(concurrency_group="serve")
    def serve(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if method not in self._serve:
            raise ValueError(f"{method!r} is not a serve method of {type(self.runtime)}")
        return self._run(method, args, kwargs)


class _RemoteMethod:
    def __init__(self, actor: Any, name: str, group: str):
        self._actor, self._name, self._group = actor, name, group

    def remote(self, *args: Any, **kwargs: Any) -> ray.ObjectRef:
        return getattr(self._actor, self._group).remote(self._name, *args, **kwargs)


class RuntimeHandle:
    """A member's runtime as the controller sees it: ``handle.method.remote(...)``."""

    def __init__(
        self,
        actor: Any,
        control_methods: frozenset[str],
        serve_methods: frozenset[str] = frozenset(),
    ):
        self.actor = actor
        self._control_methods = control_methods
        self._serve_methods = serve_methods

    def __getattr__(self, name: str) -> _RemoteMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self._control_methods:
            return _RemoteMethod(self.actor, name, "control")
        if name in self._serve_methods:
            return _RemoteMethod(self.actor, name, "serve")
        return _RemoteMethod(self.actor, name, "call")
