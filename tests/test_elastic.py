"""Chaos tests: workers killed, added and drained mid-run; the controller killed.

Every job here trains on the same global batches as the one-process
reference, so whatever happens to the membership, the final parameters must
match it. Tolerance ``ATOL`` as in test_jobs: world-size changes only change
the order of fp32 sums.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time

import pytest
import ray
import torch

from actors.data import stdlib_text
from orchestrator import JobSpec, JobState, submit
from storage.checkpoint import CheckpointReader, latest_manifest
from storage.object_store import open_store
from tests.faulty_models import HeldGPT
from tests.job_helpers import wait_for_step
from tests.reference import train_reference

ATOL = 2e-5
CORPUS_BYTES = 200_000
STEPS = 14


def _spec(tmp_path, name: str, *extra: str, steps: int = STEPS) -> JobSpec:
    return JobSpec.from_overrides(
        [
            "model.n_layer=1",
            "model.d_model=32",
            "model.n_head=2",
            "model.seq_len=16",
            f"data.max_bytes={CORPUS_BYTES}",
            f"run_dir={tmp_path / name}",
            "train.sample_tokens=0",
            "train.warmup_steps=2",
            f"train.steps={steps}",
            "train.global_batch=7",
            "checkpoint.every=0",  # only the final one: recovery must come from memory
            *extra,
        ]
    )


def _final_params(spec: JobSpec) -> torch.Tensor:
    store = open_store(spec.checkpoint.uri)
    manifest = latest_manifest(store)
    assert manifest is not None and manifest.step == spec.train.steps
    return CheckpointReader(store, manifest).read("param", 0, manifest.numel)


def _kill_rank(handle, rank: int) -> int:
    pid = handle.worker_pids()[rank]
    os.kill(pid, signal.SIGKILL)
    return pid


def _assert_matches_reference(spec: JobSpec) -> None:
    reference = train_reference(spec, stdlib_text(CORPUS_BYTES), steps=spec.train.steps)
    torch.testing.assert_close(_final_params(spec), reference, atol=ATOL, rtol=0)


def _events(spec: JobSpec) -> list[str]:
    lines = (spec.run_dir / "events.jsonl").read_text().splitlines()
    return [json.loads(line)["event"] for line in lines]


@pytest.mark.parametrize(
    "strategy, replication, spares",
    # zero1 and zero2 shard less than zero3 but keep, copy and restore their
    # shard the same way (one dp range per rank, its buddy's copy): to keep
    # the Ray tier lean it kills ddp, zero3, and zero2 with sync copies (and
    # a spare standing by, which takes the lost worker's place).
    [
        ("ddp", "async", 0),
        ("zero3", "async", 0),
        ("zero2", "sync", 1),
    ],
)
def test_sigkill_a_worker_loses_no_committed_step(
    ray_session, tmp_path, strategy, replication, spares
):
    # A different, reproducible kill for each case.
    rng = random.Random(strategy if replication == "async" else f"{strategy}-{replication}")
    spec = _spec(
        tmp_path,
        f"{strategy}-{replication}",
        f"strategy={strategy}",
        "cluster.workers=3",
        f"elastic.replication={replication}",
        f"elastic.spares={spares}",
    )
    handle = submit(spec)
    wait_for_step(handle, rng.randrange(2, 6))
    # Three workers train; with a spare, a fourth is started with them and stands by.
    prefix = f"shoal-{spec.job_id}-worker"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    assert sum(name.startswith(prefix) for name in names) == 3 + spares
    _kill_rank(handle, rng.randrange(3))
    status = handle.wait(timeout=240)
    assert status.state == JobState.SUCCEEDED, status.error
    # Survivors blocked in a collective with another survivor are freed when
    # that one severs its connections (collectives/gloo_sockets.py): none is
    # left "stuck" and replaced.
    events = _events(spec)
    assert "stuck" not in events
    assert status.failures_survived == 1
    # Synchronous replication, and ddp (every survivor holds the whole state):
    # no step whose result came back is redone. Asynchronous: a kill in the
    # moment after a step, before that step's copy left the worker, redoes
    # that one step (tests/test_replication.py makes that happen on purpose).
    assert status.steps_redone <= (1 if replication == "async" and strategy != "ddp" else 0)
    assert "died" in events and "restored-from-buddy" in events
    assert "restored-from-checkpoint" not in events
    lines = (spec.run_dir / "events.jsonl").read_text().splitlines()
    joined = [json.loads(line)["worker_id"] for line in lines if '"joined"' in line]
    # One replacement joined: a new worker, or the spare (the first three placed train).
    assert sorted(joined) == [0, 1, 2, 3]
    steps = [m["step"] for m in handle.metrics()]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS - 1
    # Replicated (ddp) survivors hold no copy of earlier steps: if they all
    # finished the step during which a peer died, it is kept, not redone, and
    # has no metrics record.
    assert len(steps) >= STEPS - (1 if strategy == "ddp" else 0)
    _assert_matches_reference(spec)


def test_two_workers_killed_in_different_epochs(ray_session, tmp_path):
    spec = _spec(
        tmp_path,
        "two",
        "strategy=zero2",
        "cluster.workers=3",
        "cluster.min_workers=1",
        # Slow steps until the second kill, so that the job cannot finish
        # before the replacement joins, however long its start-up takes.
        "model._target_=tests.faulty_models.HeldGPT",
        # SGD keeps 200 steps of changing world sizes comparable to the
        # reference.
        "train.optimizer=sgd",
        "train.lr=0.05",
        steps=200,
    )
    HeldGPT.HOLD_FILE.touch()
    try:
        handle = submit(spec)
        wait_for_step(handle, 2)
        _kill_rank(handle, 1)
        # The second kill waits until the replacement has joined, so that
        # the killed worker's buddy is alive to hold its shard.
        while handle.status().epoch < 2 or len(handle.status().workers) < 2:
            assert not handle.done(), handle.status().error
            time.sleep(0.05)
        killed_at = handle.metrics()[-1]["step"]
        _kill_rank(handle, 0)
    finally:
        HeldGPT.HOLD_FILE.unlink(missing_ok=True)
    status = handle.wait(timeout=240)
    assert status.state == JobState.SUCCEEDED, status.error
    assert "stuck" not in _events(spec)
    assert status.failures_survived == 2 and status.epoch >= 3
    assert killed_at < spec.train.steps - 1
    _assert_matches_reference(spec)


def test_worker_added_and_drained_mid_run(ray_session, tmp_path):
    spec = _spec(
        tmp_path,
        "scale",
        "strategy=zero3",
        "cluster.workers=2",
        "cluster.min_workers=1",
        "cluster.max_workers=3",
        # SGD with momentum: the optimizer state still moves between workers,
        # but unlike Adam, SGD does not amplify the last-bit differences of
        # changing world sizes over this many steps.
        "train.optimizer=sgd",
        "train.lr=0.05",
        steps=300,  # long enough for a new worker process to start and join
    )
    handle = submit(spec)
    wait_for_step(handle, 2)
    assert handle.scale(3) == 3
    while len(handle.status().workers) < 3:
        assert not handle.done(), handle.status().error
        time.sleep(0.05)
    scaled_up_at = handle.metrics()[-1]["step"]
    wait_for_step(handle, scaled_up_at + 3)
    assert handle.scale(1) == 1
    status = handle.wait(timeout=240)
    assert status.state == JobState.SUCCEEDED, status.error
    assert len(status.workers) == 1 and status.failures_survived == 0
    events = _events(spec)
    assert events.count("joined") == 3 and events.count("drained") == 2
    _assert_matches_reference(spec)


def test_controller_killed_then_resumed(ray_session, tmp_path):
    # Slow steps while the controller is killed, so that the kill lands
    # mid-run however quickly the job got to step 9.
    held = ("cluster.workers=2", "checkpoint.every=4", "model._target_=tests.faulty_models.HeldGPT")
    spec = _spec(tmp_path, "ctl", *held)
    HeldGPT.HOLD_FILE.touch()
    try:
        handle = submit(spec)
        wait_for_step(handle, 9)
        ray.kill(handle._controller, no_restart=True)
        status = handle.wait(timeout=60)
    finally:
        HeldGPT.HOLD_FILE.unlink(missing_ok=True)
    assert status.state == JobState.FAILED and "controller" in status.error
    manifest = latest_manifest(open_store(spec.checkpoint.uri))
    assert manifest is not None and manifest.step in (4, 8, 12)
    again = _spec(tmp_path, "ctl", *held, "resume=latest")
    status = submit(again).wait(timeout=240)
    assert status.state == JobState.SUCCEEDED, status.error
    _assert_matches_reference(again)
