"""``strategy=federated`` on a real local Ray: a server and client actors.

FedAvg with every client, one full-batch local step and the server at
``server_lr=1`` is gradient descent on the union of the clients' rows: the
job must compute what one process computes (parameters after K rounds,
tolerance 1e-5: the weighted average sums the clients' updates in another
order than one backward over the union), also across a resume with another
number of client actors. A client actor SIGKILLed mid-run is a dropout; a
client whose code raises fails the job, naming it; NaN updates are
rejected; a round that keeps missing its deadline fails the job, loudly.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from actors.datasets import digits
from actors.task import build_model, make_task
from orchestrator import JobSpec, JobState, submit
from tests.reference import JobRun, final_params, flat_params, run_job, run_jobs, succeeded

ATOL = 1e-5
FED_JOB = [
    "strategy=federated",
    "model=mlp",
    "model.hidden=[16]",
    "data=digits",
    "train.sample_tokens=0",
    "cluster.cpus_per_worker=0.5",
    "strategy.server_cpus=0.5",
]
# Every client, every result awaited, one full-batch SGD step per client.
EXACT = [
    "strategy.clients=6",
    "strategy.per_round=6",
    "strategy.min_results=6",
    "strategy.batch_size=100000",
    "strategy.local_epochs=1",
    "strategy.client_lr=0.5",
    "strategy.server_lr=1.0",
]


def _spec(tmp_path, name: str, *extra: str) -> JobSpec:
    return JobSpec.from_overrides([*FED_JOB, f"run_dir={tmp_path / name}", *extra])


def gradient_descent_reference(spec: JobSpec, rounds: int) -> torch.Tensor:
    """Full-batch gradient descent on all training rows at ``client_lr``, in one process."""
    data = digits()
    task = make_task(spec.task, data, None)
    torch.manual_seed(spec.train.seed)
    model = build_model(spec.model, data.facts)
    batch = data.eval_batch(data.train_rows)
    for _ in range(rounds):
        model.zero_grad()
        loss, count = task.loss(model, batch)
        (loss / count).backward()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(p.grad, alpha=-spec.strategy.client_lr)
    return flat_params(model)


FAULTY = [
    "data._target_=tests.fed_faults.digits_with_faulty_clients",
    "+data.clients=6",
    "+data.nan_client=1",
    "+data.raising_client=4",
    "strategy.clients=6",
    "strategy.per_round=6",
    "strategy.min_results=3",
    "train.steps=2",
    "cluster.workers=2",
]


@pytest.fixture(scope="module")
def independent_jobs(ray_session, tmp_path_factory) -> dict[str, JobRun]:
    """This module's jobs that need no other job, run ``AT_ONCE`` at a time; each test below
    checks its own."""
    tmp_path = tmp_path_factory.mktemp("federated")
    specs = {
        "first": _spec(tmp_path, "a", *EXACT, "train.steps=2", "cluster.workers=2"),
        "secure": _spec(
            tmp_path, "secure", *EXACT, "train.steps=3", "strategy.secure_aggregation=true"
        ),
        # Client 4 raises: by default the job fails, and says which client and why.
        "raise": _spec(tmp_path, "raise", *FAULTY),
        # Tolerated: the raising client is dropped, the NaN client's update rejected.
        "tolerate": _spec(tmp_path, "tolerate", *FAULTY, "strategy.max_client_errors=10"),
        "deadline": _spec(
            tmp_path,
            "deadline",
            "strategy.clients=4",
            "strategy.per_round=4",
            "strategy.round_deadline_s=0.001",
            "strategy.round_retries=1",
            "strategy.local_epochs=20",
            "train.steps=3",
        ),
    }
    return dict(zip(specs, run_jobs(*specs.values(), check=False), strict=True))


def test_fedavg_is_gradient_descent_on_the_union_across_a_resume(independent_jobs):
    first = succeeded(independent_jobs["first"]).spec
    resumed = _spec(
        first.run_dir.parent,
        "a",
        *EXACT,
        "train.steps=5",
        "cluster.workers=3",  # the clients move to other actors
        "resume=latest",
        f"checkpoint.uri={first.checkpoint.uri}",
    )
    _, status = run_job(resumed)
    expected = gradient_descent_reference(resumed, 5)
    torch.testing.assert_close(final_params(resumed), expected, atol=ATOL, rtol=0)
    assert status.accuracy is not None and 0 <= status.accuracy <= 1
    records = [r for r in _metrics(resumed) if r["step"] >= 2]
    assert [r["clients_finished"] for r in records] == [6, 6, 6]
    assert all("accuracy" in r for r in records)


def test_secure_aggregation_sums_what_plain_averaging_sums(independent_jobs):
    """The same rounds through pairwise masks: the server only ever unmasks the sum, which
    decodes to the plain weighted sum up to the fixed-point step (2^-24 per summand)."""
    spec = succeeded(independent_jobs["secure"]).spec
    expected = gradient_descent_reference(spec, 3)
    torch.testing.assert_close(final_params(spec), expected, atol=1e-4, rtol=0)


def _metrics(spec: JobSpec) -> list[dict]:
    import json

    lines = (spec.run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _client_rows(status) -> list[dict]:
    return [w for w in status.workers if w.get("role") == "client"]


def test_a_killed_client_actor_is_a_dropout(ray_session, tmp_path):
    """SIGKILL one of three client actors while rounds run: its clients drop out of the
    rounds in flight, a replacement takes its slot, the job finishes."""
    spec = _spec(
        tmp_path,
        "kill",
        "cluster.workers=3",
        "strategy.clients=12",
        "strategy.per_round=9",
        "strategy.min_results=3",
        "strategy.local_epochs=10",  # rounds long enough to be killed in
        "train.steps=80",
        "train.eval_every=20",
    )
    handle = submit(spec)
    deadline = time.time() + 200
    while not handle.metrics() or handle.metrics()[-1]["step"] < 3:
        assert not handle.done(), handle.status().error
        assert time.time() < deadline
        time.sleep(0.05)
    victim = next(w for w in _client_rows(handle.status()) if w["rank"] == 1)
    os.kill(victim["pid"], signal.SIGKILL)
    while not any(
        w["rank"] == 1 and w["pid"] != victim["pid"] for w in _client_rows(handle.status())
    ):
        assert not handle.done(), "the job ended before the killed actor was replaced"
        assert time.time() < deadline, "the killed actor was not replaced"
        time.sleep(0.1)
    status = handle.wait(timeout=200)
    assert status.state == JobState.SUCCEEDED, status.error
    records = _metrics(spec)
    assert sum(r["clients_dropped"] for r in records) > 0
    slots = {w["rank"]: w["pid"] for w in _client_rows(status)}
    assert set(slots) == {0, 1, 2} and slots[1] != victim["pid"]  # replaced in its slot
    assert records[-1]["clients_finished"] == 9  # the replacement serves its clients again


def test_faulty_clients_are_rejected_or_fail_the_job(independent_jobs):
    status = independent_jobs["raise"].status
    assert status.state == JobState.FAILED
    assert "client 4 raised" in status.error and "out of bounds" in status.error, status.error
    spec = succeeded(independent_jobs["tolerate"]).spec
    records = _metrics(spec)
    assert all(r["clients_rejected"] == 1 and r["client_errors"] == 1 for r in records)
    assert all(r["clients_finished"] == 4 for r in records)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert torch.isfinite(final_params(spec)).all()


def test_a_round_that_keeps_missing_its_deadline_fails_the_job(independent_jobs):
    status = independent_jobs["deadline"].status
    assert status.state == JobState.FAILED
    assert "round 0: too few results after 2 attempts" in status.error, status.error
    assert "late" in status.error
