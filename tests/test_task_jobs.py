"""A non-GPT task on a real local Ray: an MLP classifying scikit-learn's digits under every
strategy matches one-process training; held-out evaluation and a user's loss in a job."""

from __future__ import annotations

import json
import math
from functools import cache

import pytest
import torch
import torch.nn.functional as F

from actors.datasets import ArrayDataset, digits
from actors.task import build_model, eval_metrics, make_task
from collectives.flat import FlatLayout
from orchestrator import JobSpec
from tests.reference import final_params, train_reference
from tests.test_jobs import JobRun, run_jobs, succeeded

# As in tests/test_jobs.py: N-worker and one-process parameters differ only in the
# order gradient sums are added (all-reduce / reduce-scatter vs. one batch), which
# Adam can amplify slightly.
ATOL = 2e-5
STEPS = 4
MLP_JOB = [
    "model=mlp",
    "model.hidden=[32]",
    "data=digits",
    "cluster.workers=2",
    f"train.steps={STEPS}",
    "train.global_batch=16",
    "train.warmup_steps=2",
    "train.grad_clip=0.5",  # small enough to bind on some steps
    "train.sample_tokens=0",
    "checkpoint.every=0",  # only the final checkpoint, whose parameters are compared
]


def label_smoothed_loss(model, batch):
    """A user's loss (``task.loss``): cross-entropy with label smoothing 0.1, summed."""
    logits = model(batch["x"])
    loss = F.cross_entropy(logits.float(), batch["y"], reduction="sum", label_smoothing=0.1)
    return loss, len(batch["y"])


@cache
def _digits() -> ArrayDataset:
    return digits()


def _spec(tmp_path, name: str, *extra: str) -> JobSpec:
    return JobSpec.from_overrides([*MLP_JOB, f"run_dir={tmp_path / name}", *extra])


def _params_changed(spec: JobSpec, params: torch.Tensor) -> float:
    """How far the final parameters moved from the seeded initial ones."""
    torch.manual_seed(spec.train.seed)
    init = build_model(spec.model, _digits().facts)
    start = torch.cat([p.detach().reshape(-1) for p in init.parameters()])
    return (params - start).abs().max().item()


STRATEGIES = [
    ("ddp", []),
    ("zero1", []),
    ("zero2", ["strategy.shard_weights=[3,1]"]),
    ("zero3", []),
]
EVAL_JOB = [
    "strategy=zero3",
    "train.eval_every=2",
    "train.lr=1e-2",
    "task.loss=tests.test_task_jobs.label_smoothed_loss",
]


@pytest.fixture(scope="module")
def mlp_jobs(ray_session, tmp_path_factory) -> dict[str, JobRun]:
    """Every job of this module, run once, two at a time (``tests.test_jobs.run_jobs``);
    each test checks its own."""
    tmp_path = tmp_path_factory.mktemp("mlp")
    specs = {
        strategy: _spec(tmp_path, strategy, f"strategy={strategy}", *extra)
        for strategy, extra in STRATEGIES
    }
    specs["eval"] = _spec(tmp_path, "eval", *EVAL_JOB)
    return dict(zip(specs, run_jobs(*specs.values(), check=False), strict=True))


@pytest.mark.parametrize("strategy, extra", STRATEGIES)
def test_mlp_on_digits_matches_one_process_reference(mlp_jobs, strategy, extra):
    spec, status, metrics = succeeded(mlp_jobs[strategy])
    assert [m["step"] for m in metrics] == list(range(STEPS))
    assert all(math.isfinite(m["loss"]) for m in metrics)
    assert all(m["batch"] == [8, 8] for m in metrics)
    assert "tokens_per_s" not in metrics[-1]  # rows, not tokens
    assert status.samples_per_s and status.samples_per_s > 0
    final = final_params(spec)
    if strategy != "ddp":
        shard_sizes = [w["shard"][1] - w["shard"][0] for w in status.workers]
        assert sum(shard_sizes) == final.numel() == 64 * 32 + 32 + 32 * 10 + 10
        if extra:  # shard_weights=[3,1]
            assert abs(shard_sizes[0] / shard_sizes[1] - 3) < 0.01
    # Step 0's loss is that of the untrained model on step 0's 16 rows.
    torch.manual_seed(spec.train.seed)
    model = build_model(spec.model, _digits().facts)
    batch = _digits().batch(spec.train.seed, 0, 16, 0, 16)
    with torch.no_grad():
        loss0 = F.cross_entropy(model(batch["x"]), batch["y"]).item()
    assert metrics[0]["loss"] == pytest.approx(loss0, rel=1e-5)
    reference = train_reference(spec, _digits(), steps=STEPS)
    assert _params_changed(spec, reference) > 1e-3  # training moved the weights
    torch.testing.assert_close(final, reference, atol=ATOL, rtol=0)


def test_eval_and_user_loss_job(mlp_jobs, tmp_path):
    """ZeRO-3 (each eval forward gathers parameters, so both ranks run every one) with
    train.eval_every=2 and a user's label-smoothed loss: evaluated after steps 2 and 4,
    trained as the one-process reference with the same loss, its final eval equal to the
    held-out metrics of the reference's parameters."""
    spec, status, _ = succeeded(mlp_jobs["eval"])
    records = [
        json.loads(line) for line in (spec.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records] == list(range(STEPS))
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [1, 3]
    for r in evals:
        assert 0 <= r["accuracy"] <= 1 and math.isfinite(r["eval_loss"])
        assert "perplexity" not in r
    assert status.accuracy == evals[-1]["accuracy"]
    assert status.eval_loss == evals[-1]["eval_loss"]
    # Training on the user's loss: finite, and the held-out loss went down.
    assert all(math.isfinite(r["loss"]) for r in records)
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]

    reference = train_reference(spec, _digits(), steps=STEPS)
    final = final_params(spec)
    torch.testing.assert_close(final, reference, atol=ATOL, rtol=0)
    # The same loss is not the built-in one: the reference with cross-entropy differs.
    plain = train_reference(_spec(tmp_path, "plain", "train.lr=1e-2"), _digits(), steps=STEPS)
    assert (plain - reference).abs().max().item() > 10 * ATOL

    # The final eval is the held-out metric of the reference's parameters, over the
    # same train.eval_batches batches of train.global_batch test rows.
    data = _digits()
    torch.manual_seed(0)
    model = build_model(spec.model, data.facts)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for slot in FlatLayout.of(model).slots:
            params[slot.name].copy_(reference[slot.offset : slot.end].view(slot.shape))
    task = make_task(spec.task, data, None)
    items = [
        (data.eval_batch(rows), True)
        for rows in data.eval_batches(16, None, spec.train.eval_batches)
    ]
    model.eval()
    expected = eval_metrics([task.evaluate(model, items)])
    assert status.eval_loss == pytest.approx(expected["eval_loss"], abs=1e-4)
    assert status.accuracy == pytest.approx(expected["accuracy"], abs=2 / 320)
