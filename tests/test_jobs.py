"""Jobs on a real local Ray instance: equivalence with one process, resume, failures, cancel."""

from __future__ import annotations

import time

import pytest
import torch

from actors.data import stdlib_text
from orchestrator import JobSpec, JobState, submit
from tests.reference import (
    JobRun,
    final_params,
    run_job,
    run_jobs,
    succeeded,
    train_reference,
)

# Parameters of an N-worker run and of the one-process reference agree within
# ATOL: they differ only in the order in which gradient sums are added
# (all-reduce vs. one big batch), which Adam can amplify slightly.
ATOL = 2e-5
TINY = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.seq_len=16"]
CORPUS_BYTES = 200_000
# run_jobs (tests/reference.py) runs AT_ONCE jobs at a time. Any two jobs of up to 3
# workers fit in the 4 CPUs of tests/conftest.py's Ray instance at HALF_CPU a worker
# (a request to Ray's placement only: each worker still runs torch on one thread).
HALF_CPU = "cluster.cpus_per_worker=0.5"


def _spec(tmp_path, name: str, *extra: str) -> JobSpec:
    return JobSpec.from_overrides(
        [
            *TINY,
            f"data.max_bytes={CORPUS_BYTES}",
            f"run_dir={tmp_path / name}",
            "train.sample_tokens=0",
            "train.warmup_steps=2",
            *extra,
        ]
    )


N_WORKERS = [1, 2, 3]
ZERO_CASES = [
    ("zero1", 2, []),
    ("zero2", 3, ["strategy.shard_weights=[2,1,1]"]),
    ("zero3", 3, ["strategy.shard_weights=[1,3,2]", "train.balance=auto", "train.balance_every=2"]),
    ("zero3", 2, ["strategy.shard_weights=auto", "train.micro_batches=2"]),
]
BF16_CASE = ["strategy=zero2", "train.steps=4", "train.global_batch=7", "train.lr=1e-3"]


@pytest.fixture(scope="module")
def independent_jobs(ray_session, tmp_path_factory) -> dict[str, JobRun]:
    """This module's jobs that need no other job, run once, ``AT_ONCE`` at a time;
    each test below checks its own."""
    tmp_path = tmp_path_factory.mktemp("independent")
    equivalence = ["train.steps=4", "train.global_batch=7", "train.grad_clip=0.5", HALF_CPU]
    specs = {
        # global_batch=7 does not divide by 2 or 3: ranks hold different sample counts;
        # grad_clip=0.5 is small enough to bind: clipping is exercised.
        **{
            f"w{workers}": _spec(
                tmp_path, f"w{workers}", f"cluster.workers={workers}", *equivalence
            )
            for workers in N_WORKERS
        },
        **{
            f"{strategy}-{workers}": _spec(
                tmp_path,
                f"{strategy}-{workers}",
                f"strategy={strategy}",
                f"cluster.workers={workers}",
                *equivalence,
                *extra,
            )
            for strategy, workers, extra in ZERO_CASES
        },
        "fp32": _spec(tmp_path, "fp32", *BF16_CASE),
        "bf16": _spec(tmp_path, "bf16", *BF16_CASE, "train.precision=bf16"),
        # The first runs of the resume tests.
        "full": _spec(tmp_path, "full", "train.steps=6", "checkpoint.every=3", "checkpoint.keep=5"),
        "same": _spec(tmp_path, "same", "train.steps=2", "checkpoint.every=1"),
    }
    return dict(zip(specs, run_jobs(*specs.values(), check=False), strict=True))


@pytest.mark.parametrize("workers", N_WORKERS)
def test_n_workers_match_one_process_reference(independent_jobs, workers):
    spec, status, metrics = succeeded(independent_jobs[f"w{workers}"])
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    assert min(m["grad_norm"] for m in metrics) > 0.5  # clipping was active
    # Start-up phases are reported in the order they happen (Ray was already up).
    phases = ["controller", "workers_placed", "group_formed", "state_ready", "first_step"]
    assert [p for p in status.startup_s if p != "ray"] == phases
    assert [status.startup_s[p] for p in phases] == sorted(status.startup_s[p] for p in phases)
    reference = train_reference(spec, stdlib_text(CORPUS_BYTES), steps=4)
    torch.testing.assert_close(final_params(spec), reference, atol=ATOL, rtol=0)


@pytest.mark.parametrize("strategy, workers, extra", ZERO_CASES)
def test_zero_jobs_match_one_process_reference(independent_jobs, strategy, workers, extra):
    spec, status, metrics = succeeded(independent_jobs[f"{strategy}-{workers}"])
    shard_sizes = [w["shard"][1] - w["shard"][0] for w in status.workers]
    assert sum(shard_sizes) == final_params(spec).numel()
    if strategy == "zero3":
        # The status's shard bytes are what the worker counted in its tensors:
        # its parameter shard and the Adam moments of that shard.
        for w, mem in zip(status.workers, status.memory, strict=True):
            assert w["shard_bytes"] == mem["params"] + mem["optimizer"]
    if "strategy.shard_weights=[2,1,1]" in extra:
        assert abs(shard_sizes[0] / shard_sizes[1] - 2) < 0.01
    if "train.balance=auto" in extra:
        assert sum(metrics[-1]["batch"]) == 7
    reference = train_reference(spec, stdlib_text(CORPUS_BYTES), steps=4)
    torch.testing.assert_close(final_params(spec), reference, atol=ATOL, rtol=0)


def test_resume_equals_uninterrupted(independent_jobs, tmp_path):
    full = succeeded(independent_jobs["full"]).spec  # 6 steps, a checkpoint every 3
    # Resume from step 3 of the uninterrupted run, at the same world size...
    part = _spec(
        tmp_path,
        "resumed",
        HALF_CPU,
        "train.steps=6",
        "checkpoint.every=3",
        f"resume={full.checkpoint.uri}/step-00000003",
    )
    # ...and at another world size, where only the summation order changes.
    three = _spec(
        tmp_path,
        "resumed3",
        HALF_CPU,
        "train.steps=6",
        "cluster.workers=3",
        f"resume={full.checkpoint.uri}/step-00000003",
    )
    (_, status, metrics), _ = run_jobs(part, three)
    assert status.resumed_from.endswith("step-00000003")
    assert [m["step"] for m in metrics] == [3, 4, 5]
    torch.testing.assert_close(final_params(part), final_params(full), atol=0, rtol=0)
    torch.testing.assert_close(final_params(three), final_params(full), atol=ATOL, rtol=0)


def test_resume_latest_in_same_run_folder(independent_jobs):
    first = succeeded(independent_jobs["same"]).spec  # 2 steps, a checkpoint after each
    again = _spec(
        first.run_dir.parent, "same", "train.steps=4", "checkpoint.every=1", "resume=latest"
    )
    handle, status = run_job(again)
    assert status.resumed_from.endswith("step-00000002")
    lines = (again.run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4  # steps 0-1 from the first run, 2-3 from the resumed one


def test_worker_error_surfaces_and_job_does_not_hang(ray_session, tmp_path):
    spec = _spec(
        tmp_path, "faulty", "train.steps=20", "model._target_=tests.faulty_models.RaisingGPT"
    )
    handle = submit(spec)
    status = handle.wait(timeout=120)
    assert status.state == JobState.FAILED
    assert "worker 1" in status.error and "injected fault" in status.error
    assert handle.status().state == JobState.FAILED


def test_cancel_stops_at_a_step_boundary(ray_session, tmp_path):
    spec = _spec(tmp_path, "cancel", "train.steps=100000", "checkpoint.every=0")
    handle = submit(spec)
    deadline = time.time() + 120
    while not handle.metrics() and time.time() < deadline:
        time.sleep(0.2)
    handle.cancel()
    status = handle.wait(timeout=60)
    assert status.state == JobState.CANCELLED
    assert 0 < status.step < 100000


def test_bf16_compute_keeps_fp32_master_weights(independent_jobs):
    """bf16 autocast changes the arithmetic, not the training: every Adam step moves a
    weight by at most about lr, so after 4 steps bf16 and fp32 weights differ by
    less than 4 * lr, and the losses agree to within bf16's resolution."""
    fp32, _, metrics32 = succeeded(independent_jobs["fp32"])
    bf16, _, metrics16 = succeeded(independent_jobs["bf16"])
    loss32 = [m["loss"] for m in metrics32]
    loss16 = [m["loss"] for m in metrics16]
    diff = (final_params(bf16) - final_params(fp32)).abs().max().item()
    assert 0 < diff < 4 * 1e-3
    assert final_params(bf16).dtype == torch.float32
    assert max(abs(a - b) for a, b in zip(loss32, loss16, strict=True)) < 0.05
