"""``strategy=pipeline`` on a real local Ray: the same computation as one process, split into
stages; a killed stage survived; checkpoints moving between pipeline and ddp runs.

Tolerance as in tests/test_jobs.py: the pipeline adds gradients in another
order (per micro-batch, per stage, then over replicas) than one process does,
which Adam can amplify slightly.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch

from actors.data import stdlib_text
from actors.datasets import digits
from actors.task import build_model, eval_metrics, make_task
from orchestrator import JobSpec, JobState, submit
from tests.reference import final_params, run_job, train_reference

ATOL = 2e-5
CORPUS_BYTES = 200_000
GPT_JOB = [
    "strategy=pipeline",
    "model.n_layer=2",  # layers: embed, blocks.0, blocks.1, head (tied to embed)
    "model.d_model=32",
    "model.n_head=2",
    "model.seq_len=16",
    f"data.max_bytes={CORPUS_BYTES}",
    "train.global_batch=8",
    "train.warmup_steps=2",
    "train.grad_clip=0.5",
    "train.sample_tokens=0",
    "checkpoint.every=0",  # only the final checkpoint, whose parameters are compared
]


def _spec(tmp_path, name: str, *extra: str) -> JobSpec:
    return JobSpec.from_overrides([*GPT_JOB, f"run_dir={tmp_path / name}", *extra])


def _events(spec: JobSpec) -> list[str]:
    lines = (spec.run_dir / "events.jsonl").read_text().splitlines()
    return [json.loads(line)["event"] for line in lines]


def test_gpipe_on_four_stages_matches_one_process(ray_session, tmp_path):
    # 1F1B on 2 stages is compared below (the killed-stage run, and the first checkpoint run).
    spec = _spec(
        tmp_path,
        "run",
        "strategy.schedule=gpipe",
        "strategy.stages=4",
        "cluster.workers=4",
        "train.steps=4",
        "train.micro_batches=8",
    )
    _, status = run_job(spec)
    stages = spec.strategy.stages
    assert status.program["stages"] == stages
    assert sum(len(names) for names in status.program["partition"]) == 4
    assert 0 <= status.program["bubble"] <= 1
    reference = train_reference(spec, stdlib_text(CORPUS_BYTES), steps=spec.train.steps)
    torch.testing.assert_close(final_params(spec), reference, atol=ATOL, rtol=0)
    rows = status.workers
    assert [r["role"] for r in rows] == ["stage"] * stages
    assert [r["stage"] for r in rows] == list(range(stages))


def test_pipeline_times_data_parallel_on_digits_with_eval(ray_session, tmp_path):
    """2 stages x 2 replicas of an MLP classifier; held-out accuracy as one process computes it."""
    spec = JobSpec.from_overrides(
        [
            "strategy=pipeline",
            "strategy.stages=2",
            "cluster.workers=4",
            "model=mlp",
            "model.hidden=[32,32]",
            "data=digits",
            "train.steps=4",
            "train.global_batch=16",
            "train.micro_batches=4",
            "train.warmup_steps=2",
            "train.eval_every=4",
            "train.sample_tokens=0",
            "checkpoint.every=0",
            f"run_dir={tmp_path / 'digits'}",
        ]
    )
    handle, status = run_job(spec)
    assert status.program["replicas"] == 2
    data = digits()
    reference = train_reference(spec, data, steps=spec.train.steps)
    params = final_params(spec)
    torch.testing.assert_close(params, reference, atol=ATOL, rtol=0)
    # The pipeline's forward-only evaluation against the one-process model's.
    model = build_model(spec.model, data.facts)
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(params[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
    task = make_task(spec.task, data, None)
    t = spec.train
    items = [
        (data.eval_batch(rows, None), True)
        for rows in data.eval_batches(t.global_batch, None, t.eval_batches)
    ]
    model.eval()
    expected = eval_metrics([task.evaluate(model, items)])
    last = handle.metrics()[-1]
    assert last["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-9)
    assert last["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-4)


def test_killed_stage_is_rebuilt_from_its_buddy(ray_session, tmp_path):
    spec = _spec(tmp_path, "kill", "train.steps=12", "train.micro_batches=4", "cluster.workers=2")
    handle = submit(spec)
    deadline = time.time() + 120
    while not handle.metrics() or handle.metrics()[-1]["step"] < 3:
        assert not handle.done(), handle.status().error
        assert time.time() < deadline, "the job did not reach step 3"
        time.sleep(0.05)
    os.kill(handle.worker_pids()[1], signal.SIGKILL)  # the last stage (holds the tied head)
    status = handle.wait(timeout=240)
    assert status.state == JobState.SUCCEEDED, status.error
    assert status.failures_survived == 1
    events = _events(spec)
    assert "restored-from-buddy" in events and "restored-from-checkpoint" not in events
    assert "stuck" not in events  # survivors freed at once (sub-group connections severed)
    reference = train_reference(spec, stdlib_text(CORPUS_BYTES), steps=spec.train.steps)
    torch.testing.assert_close(final_params(spec), reference, atol=ATOL, rtol=0)


def test_checkpoints_move_between_pipeline_and_ddp(ray_session, tmp_path):
    """pipeline (2 stages) -> ddp -> pipeline (4 stages, gpipe): one run of 12 steps."""
    constant = ["train.lr_schedule=constant", "train.warmup_steps=0"]  # lr independent of steps
    first = _spec(tmp_path, "a", *constant, "train.steps=4", "train.micro_batches=2")
    run_job(first)
    second = _spec(
        tmp_path,
        "b",
        *constant,
        "strategy=ddp",
        "train.steps=8",
        f"resume={first.checkpoint.uri}/step-4",
    )
    run_job(second)
    third = _spec(
        tmp_path,
        "c",
        *constant,
        "strategy.stages=4",
        "strategy.schedule=gpipe",
        "cluster.workers=4",
        "train.steps=12",
        "train.micro_batches=2",
        f"resume={second.checkpoint.uri}/step-8",
    )
    run_job(third)
    reference = train_reference(third, stdlib_text(CORPUS_BYTES), steps=12)
    torch.testing.assert_close(final_params(third), reference, atol=ATOL, rtol=0)
