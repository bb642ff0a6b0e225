"""The cluster's capacity book (``orchestrator/capacity_book.py``): every live job's
autoscaler request, added up, so that jobs do not overwrite each other's request and a
finished or dead job's request goes away."""

from __future__ import annotations

import time

import ray

from orchestrator.capacity_book import Book, book

CPU = {"CPU": 1.0}
GPU = {"CPU": 1.0, "GPU": 1.0}


def test_jobs_requests_add_up_and_leave_with_their_job():
    asked, alive = [], {"a": True, "b": True}
    b = Book(ask=asked.append, alive=lambda job, namespace: alive[job])
    b.file("a", "ns", [CPU, CPU])
    b.file("b", "ns", [GPU])
    assert asked[-1] == [CPU, CPU, GPU]  # the second job's request did not replace the first's
    b.file("b", "ns", [GPU])
    assert len(asked) == 2  # nothing changed: Ray is not asked again
    b.file("a", "ns", [])  # job a ended: withdrawn
    assert asked[-1] == [GPU]
    alive["b"] = False  # job b's controller died without withdrawing
    assert b.check() == [] and asked[-1] == []


def _wait_gone(name: str, namespace: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=namespace)
        except ValueError:
            return
        time.sleep(0.05)
    raise AssertionError(f"{name} still registered after ray.kill")


@ray.remote(num_cpus=0)
class _Controller:
    def ping(self) -> bool:
        return True


def test_the_book_actor_drops_a_job_whose_controller_is_gone(ray_session):
    namespace = ray.get_runtime_context().namespace
    first = _Controller.options(name="shoal-book-test-a").remote()
    second = _Controller.options(name="shoal-book-test-b").remote()
    ray.get([first.ping.remote(), second.ping.remote()])
    cluster_book = book()
    assert ray.get(cluster_book.file.remote("book-test-a", namespace, [CPU])) == [CPU]
    assert ray.get(cluster_book.file.remote("book-test-b", namespace, [GPU])) == [CPU, GPU]
    ray.kill(first)
    _wait_gone("shoal-book-test-a", namespace)
    assert ray.get(cluster_book.file.remote("book-test-b", namespace, [GPU, GPU])) == [GPU, GPU]
    assert ray.get(cluster_book.file.remote("book-test-b", namespace, [])) == []
    assert book()._actor_id == cluster_book._actor_id  # one book per cluster
    ray.kill(second)
