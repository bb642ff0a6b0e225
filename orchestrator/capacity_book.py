"""One autoscaler request for every shoal job on a cluster.

Ray's ``request_resources`` *replaces* the cluster's previous request. Two
jobs that each asked for their own bundles would overwrite each other (the
second job's request hides the first's, and the autoscaler may take the
first job's nodes away), and a finished job's request would keep nodes up.
So each job's controller files its bundles with the cluster's
``CapacityBook`` — one detached actor (``shoal-capacity`` in namespace
``shoal``, created by the first job that needs it, taking no CPU) — which
asks Ray for the union of every live job's bundles. A job withdraws its
request when it ends; a job whose controller is gone without withdrawing
(its process or node died) is dropped at the next filing or within
``CHECK_S``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ray

BOOK_NAME = "shoal-capacity"
NAMESPACE = "shoal"
CHECK_S = 30.0

Bundle = dict[str, float]


def union(requests: Mapping[str, Sequence[Bundle]]) -> list[Bundle]:
    """Every job's bundles together (bundles add up: each is one member's resources)."""
    return [dict(b) for job in sorted(requests) for b in requests[job]]


def _controller_alive(job_id: str, namespace: str) -> bool:
    try:
        # orchestrator.api.controller_name, without importing the API into this actor
        ray.get_actor(f"shoal-{job_id}", namespace=namespace)
    except ValueError:
        return False
    return True


def _ask_ray(bundles: list[Bundle]) -> None:
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
    except Exception:  # noqa: BLE001 - no autoscaler (a local instance): nothing to ask
        pass


class Book:
    """The requests and what to do with them; the actor below is this plus a thread."""

    def __init__(
        self,
        ask: Callable[[list[Bundle]], None] = _ask_ray,
        alive: Callable[[str, str], bool] = _controller_alive,
    ):
        self.requests: dict[str, list[Bundle]] = {}
        self._namespaces: dict[str, str] = {}  # job -> its controller's namespace
        self._ask, self._alive = ask, alive
        self._asked: list[Bundle] | None = None
        self._lock = threading.Lock()

    def file(self, job_id: str, namespace: str, bundles: Sequence[Bundle]) -> list[Bundle]:
        """Job ``job_id`` (its controller in ``namespace``) wants ``bundles`` now (none: it
        withdraws); returns what Ray is asked for."""
        with self._lock:
            if bundles:
                self.requests[job_id] = [dict(b) for b in bundles]
                self._namespaces[job_id] = namespace
            else:
                self.requests.pop(job_id, None)
            return self._update()

    def check(self) -> list[Bundle]:
        """Drop the requests of jobs whose controller is gone; ask Ray again if that changed."""
        with self._lock:
            return self._update()

    def _update(self) -> list[Bundle]:
        for job in [j for j in self.requests if not self._alive(j, self._namespaces[j])]:
            del self.requests[job]
        wanted = union(self.requests)
        if wanted != self._asked:
            self._ask(wanted)
            self._asked = wanted
        return wanted


@ray.remote(num_cpus=0)
class CapacityBook:
    """The cluster's book (see the module docstring)."""

    def __init__(self) -> None:
        self.book = Book()
        threading.Thread(target=self._check_loop, daemon=True, name="shoal-capacity").start()

    def _check_loop(self) -> None:
        stop = threading.Event()
        while not stop.wait(CHECK_S):
            self.book.check()

    def file(self, job_id: str, namespace: str, bundles: list[Bundle]) -> list[Bundle]:
        return self.book.file(job_id, namespace, bundles)

    def requests(self) -> dict[str, list[Bundle]]:
        return dict(self.book.requests)


def book() -> Any:
    """The cluster's ``CapacityBook``, created if no job has made it yet."""
    return CapacityBook.options(
        name=BOOK_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote()


def file_request(job_id: str, bundles: list[Bundle]) -> None:
    """File (or, with no bundles, withdraw) the calling controller's job's request; not
    waited for."""
    if not ray.is_initialized():  # an in-process test of the controller: no cluster to ask
        return
    try:
        book().file.remote(job_id, ray.get_runtime_context().namespace, bundles)
    except Exception:  # noqa: BLE001 - the request is advice to the autoscaler, never fatal
        pass
