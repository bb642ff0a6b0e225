"""``strategy=moe`` on a real local Ray: experts on expert-host actors.

With every host alive and nothing dropped, the job computes what one process
computes (parameters after K steps, trunk and experts), also across a resume
at another number of hosts and workers. Killing hosts (SIGKILL, while steps
run) and slowing one down costs masked tokens, not the job.

Tolerance 2e-5 as in tests/test_jobs.py: expert gradients are summed over
workers and micro-batches on the hosts, in another order than one process
adds them, which Adam can amplify slightly.
"""

from __future__ import annotations

import json
import os
import signal
import time

import ray
import torch

from actors.data import stdlib_text
from actors.dp_runtime import optimizer_spec
from actors.expert_host import EXPERTS_SPACE
from actors.task import build_model, make_task
from orchestrator import JobSpec, JobState, submit
from orchestrator.schedule import lr_at
from storage.checkpoint import CheckpointReader, latest_manifest
from storage.object_store import open_store
from tests.reference import run_job

ATOL = 2e-5
CORPUS_BYTES = 200_000
MOE_JOB = [
    "model=gpt_moe",
    "strategy=moe",
    "model.n_layer=2",
    "model.d_model=32",
    "model.n_head=2",
    "model.seq_len=16",
    "model.n_expert=4",
    "model.top_k=2",
    f"data.max_bytes={CORPUS_BYTES}",
    "train.global_batch=8",
    "train.warmup_steps=2",
    "train.grad_clip=0.5",
    "train.sample_tokens=0",
    "strategy.host_cpus=0.5",
]
# Every expert answers, every answer is awaited, no token is dropped, no
# auxiliary loss (it is a per-worker mean, not additive over workers).
EXACT = [
    "model.capacity_factor=0",
    "model.aux_loss_weight=0",
    "strategy.k_min=2",
    "strategy.grace_s=60",
    "strategy.timeout_s=120",
]


def _spec(tmp_path, name: str, *extra: str) -> JobSpec:
    return JobSpec.from_overrides([*MOE_JOB, f"run_dir={tmp_path / name}", *extra])


def moe_reference(spec: JobSpec, steps: int) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """One process, all experts local: ``(trunk, experts, losses)`` after ``steps`` steps.

    Clipping as shoal's: the trunk by its norm, each expert by its own
    (``actors/expert_host.py``). An expert that no token chose in a step
    still takes its optimizer step (with a zero gradient), as every part of
    shoal's flat state does. ``experts`` is the experts space, expert-major.
    """
    t = spec.train
    data = stdlib_text(CORPUS_BYTES)
    task = make_task(spec.task, data, spec.seq_len)
    torch.manual_seed(t.seed)
    model = build_model(spec.model, data.facts)
    experts = [m for _, _, m in model.expert_slots()]
    in_experts = {id(p) for m in experts for p in m.parameters()}
    trunk = [p for p in model.parameters() if id(p) not in in_experts]
    opt = optimizer_spec(spec).build(list(model.parameters()), lr=t.lr)
    losses = []
    for step in range(steps):
        batch = task.batch(data, t.seed, step, t.global_batch, 0, t.global_batch)
        opt.zero_grad()
        objective, loss, count = task.objective(model, batch)
        (objective / (t.global_batch * task.units_per_sample)).backward()
        losses.append(float(loss.detach()) / count)
        for p in model.parameters():
            if p.grad is None:  # torch's AdamW would skip it; shoal's flat optimizer does not
                p.grad = torch.zeros_like(p)
        torch.nn.utils.clip_grad_norm_(trunk, t.grad_clip)
        for m in experts:
            torch.nn.utils.clip_grad_norm_(m.parameters(), t.grad_clip)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, t)
        opt.step()
    flat = lambda ps: torch.cat([p.detach().reshape(-1) for p in ps])  # noqa: E731
    return flat(trunk), flat(p for m in experts for p in m.parameters()), losses


def _final_state(spec: JobSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The trunk (``dp``) and experts spaces of the job's last checkpoint."""
    store = open_store(spec.checkpoint.uri)
    manifest = latest_manifest(store)
    assert manifest is not None and manifest.step == spec.train.steps
    reader = CheckpointReader(store, manifest)
    experts = reader.read("param", 0, manifest.spaces[EXPERTS_SPACE], space=EXPERTS_SPACE)
    return reader.read("param", 0, manifest.numel), experts


def _hosts(status) -> list[dict]:
    return [w for w in status.workers if w.get("role") == "expert_host"]


def _events(spec: JobSpec) -> list[dict]:
    lines = (spec.run_dir / "events.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_moe_matches_one_process_across_a_resume_and_a_lost_worker(ray_session, tmp_path):
    constant = ["train.lr_schedule=constant", "train.warmup_steps=0"]  # lr independent of steps
    first = _spec(
        tmp_path,
        "a",
        *EXACT,
        *constant,
        "strategy.expert_hosts=2",
        "cluster.workers=1",
        "train.steps=4",
    )
    _, status = run_job(first)
    hosts = _hosts(status)
    assert [h["rank"] for h in hosts] == [0, 1] and all(h["pid"] for h in hosts)
    assert status.program["hosts_live"] == 2 and status.program["slots_masked"] == 0
    trunk, experts, _ = moe_reference(first, 4)
    got_trunk, got_experts = _final_state(first)
    torch.testing.assert_close(got_trunk, trunk, atol=ATOL, rtol=0)
    torch.testing.assert_close(got_experts, experts, atol=ATOL, rtol=0)

    # 3 hosts (experts split 2/1/1) and 2 workers pick up where 2 and 1 left
    # off; a worker killed mid-run costs no step, and the hosts drop the
    # expert gradients of the step it cut short before it is re-run.
    second = _spec(
        tmp_path,
        "b",
        *EXACT,
        *constant,
        "strategy.expert_hosts=3",
        "cluster.workers=2",
        "train.steps=10",
        f"resume={first.checkpoint.uri}/step-4",
    )
    handle = submit(second)
    _wait_for_step(handle, 6, time.time() + 120)
    os.kill(handle.worker_pids()[1], signal.SIGKILL)
    status = handle.wait(timeout=240)
    assert status.state == JobState.SUCCEEDED, status.error
    assert status.failures_survived == 1
    assert [h["experts"] for h in _hosts(status)] == ["0..1", "2", "3"]
    trunk, experts, _ = moe_reference(second, 10)
    got_trunk, got_experts = _final_state(second)
    torch.testing.assert_close(got_trunk, trunk, atol=ATOL, rtol=0)
    torch.testing.assert_close(got_experts, experts, atol=ATOL, rtol=0)


def _wait_for_step(handle, step: int, deadline: float) -> None:
    while not handle.metrics() or handle.metrics()[-1]["step"] < step:
        assert not handle.done(), handle.status().error
        assert time.time() < deadline, f"the job did not reach step {step}"
        time.sleep(0.05)


def _host(handle, slot: int) -> dict:
    return next(h for h in _hosts(handle.status()) if h["rank"] == slot)


def test_killed_and_slow_expert_hosts_cost_tokens_not_the_job(ray_session, tmp_path):
    """5 hosts, one expert each: two SIGKILLs (20% of hosts each time), one host slowed down.

    The slow host also paces the steps (each waits out its grace period)
    while the killed hosts' replacements start, so they rejoin mid-run.
    """
    steps = 24
    spec = _spec(
        tmp_path,
        "chaos",
        "model.n_expert=5",
        "strategy.expert_hosts=5",
        "strategy.host_cpus=0.4",
        "strategy.k_min=1",
        "strategy.grace_s=0.3",
        f"train.steps={steps}",
        "checkpoint.every=3",
    )
    handle = submit(spec)
    deadline = time.time() + 200
    _wait_for_step(handle, 3, deadline)
    slow = _host(handle, 0)
    actor = ray.get_actor(f"shoal-{spec.job_id}-expert_host{slow['worker_id']}")
    ray.get(actor.control.remote("inject_delay", 1.0))  # answers after the grace period
    killed = []
    for at_step, slot in ((4, 1), (6, 3)):
        _wait_for_step(handle, at_step, deadline)
        pid = _host(handle, slot)["pid"]
        os.kill(pid, signal.SIGKILL)  # while the next steps' calls are in flight
        killed.append(pid)
    while {h["rank"] for h in _hosts(handle.status()) if h["pid"] not in killed} != set(range(5)):
        assert not handle.done(), "the job ended before the killed hosts were replaced"
        assert time.time() < deadline, "the killed hosts were not replaced"
        time.sleep(0.1)
    ray.get(actor.control.remote("inject_delay", 0.0))
    status = handle.wait(timeout=240)
    assert status.state == JobState.SUCCEEDED, status.error

    died = [e for e in _events(spec) if e["event"] == "died" and e.get("role") == "expert_host"]
    assert sorted(e["pid"] for e in died) == sorted(killed)
    hosts = _hosts(status)
    # The replacements took their experts from their buddies' in-memory
    # replicas (newer than the checkpoint every 3 steps), sent every step.
    restored = {h["rank"]: h.get("restored_from") for h in hosts if h.get("restored_from")}
    assert set(restored) == {1, 3}
    assert all(how.startswith("replica at step") for how in restored.values()), restored
    assert status.program["hosts"]["0"]["missed"] > 0  # the slow host was given up on
    assert status.program["hosts_live"] == 5

    records = handle.metrics()
    assert [r["step"] for r in records] == list(range(steps))
    assert max(r["expert_slots_masked"] for r in records) > 0
    # Training went on: the loss still fell, and ended near the undisturbed run's.
    _, _, undisturbed = moe_reference(spec, steps)
    tail = sum(r["loss"] for r in records[-3:]) / 3
    assert tail < records[0]["loss"] - 1.0
    assert abs(tail - sum(undisturbed[-3:]) / 3) < 0.25
