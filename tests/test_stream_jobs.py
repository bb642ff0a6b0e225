"""``data=ray_dataset`` jobs: S3 parquet streamed with Ray Data, across a kill -9 and a resume.

Every job reads the same small corpus (three parquet files on the test S3
server, ``tests/s3_server.py``) with the README's command,
``data=ray_dataset data.uri=s3://.../corpus/ data.format=parquet
data.column=text``, the endpoint coming from ``storage.endpoint_url``. A run
is ~2.5 passes over the corpus, and a pass does not end on a step boundary,
so steps straddle the wrap-around. Rows are distinct random text: a sample
repeated or skipped anywhere changes the final parameters far beyond the
tolerances below (``test_reference_run_reads_each_sample_once_per_pass``
measures by how much).

The uninterrupted 2-worker run is shared (module fixture). Against it:

* a 2-worker run whose rank 0 is SIGKILLed after the first wrap-around (its
  replacement starts its stream mid-pass-1, so it reads pass 0 to learn the
  pass length, then reopens) must end with **bitwise** the same parameters:
  the world size is 2 again after recovery, and a sum of two fp32 values is
  the same in either order, so nothing but the samples can differ;
* 3 workers resuming from its step-``RESUME_AT`` checkpoint must end within
  ``ATOL`` of it: a third rank changes only the order of fp32 sums.

The uninterrupted run also evaluates on held-out files (``data.eval_uri``).
"""

from __future__ import annotations

import math
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from actors.datasets import DataFacts
from actors.task import build_model, eval_metrics, make_task
from collectives.flat import FlatLayout
from orchestrator import JobSpec, JobState, submit
from orchestrator.status import JobStatus
from storage.checkpoint import CheckpointReader, committed_steps, read_manifest
from storage.object_store import open_store
from tests.faulty_models import HeldGPT
from tests.job_helpers import wait_for_step
from tests.reference import final_params, train_reference

pytest_plugins = ["tests.s3_server"]
# The module's jobs run in the first test's set-up: ~70 s on an idle 2-core machine, and
# up to ~3 minutes when other work loads it (their start-up is process spawns and imports).
pytestmark = pytest.mark.timeout(600)

SEQ_LEN = 16
W = SEQ_LEN + 1  # tokens per sample
B = 7  # global batch: divides by neither 2 nor 3 workers, nor the pass length
STEPS = 16  # 112 samples: ~2.5 passes of the corpus below
RESUME_AT = 7  # the checkpoint the 3-worker run resumes from: its next step straddles passes
KILL_AFTER = 8  # the kill lands once step 8 (in pass 1) is committed
ATOL = 2e-5  # as tests/test_jobs.py: another world size only reorders fp32 sums
EVAL_EVERY, EVAL_BATCHES = 8, 2  # the reference run's held-out evaluations


class HeldStreamGPT(HeldGPT):
    """GPT (same init, same math) that trains slowly while this module's hold file exists,
    so the kill lands mid-run; its own file, so that tests/test_elastic.py running at the
    same time neither slows nor releases it."""

    HOLD_FILE = Path(tempfile.gettempdir()) / f"shoal-test-stream-hold-{os.getuid()}"
    DELAY_S = 0.2


def make_rows(n: int = 60, seed: int = 7) -> list[str]:
    """Distinct rows of random letters (some empty, some multi-byte)."""
    rng = np.random.default_rng(seed)
    letters = list("abcdefghijklmnopqrstuvwxyz é€")
    return ["".join(rng.choice(letters, int(rng.integers(0, 25)))) for _ in range(n)]


def windows(rows: list[str]) -> np.ndarray:
    """The pure sample order of actors/stream.py, in memory: [N, W] byte windows."""
    tokens = np.frombuffer("".join(r + "\n" for r in rows).encode(), np.uint8)
    n = len(tokens) // W
    return tokens[: n * W].reshape(n, W)


class Oracle:
    """An in-memory dataset serving ``order(step * B + j)`` for the reference training."""

    kind = "tokens"
    facts = DataFacts(vocab_size=256)

    def __init__(self, samples: np.ndarray, order=None):
        self.samples = samples
        self.order = order or (lambda g: g % len(samples))

    def batch(self, seed, step, global_batch, lo, hi, seq_len):
        idx = [self.order(step * global_batch + j) for j in range(lo, hi)]
        window = torch.from_numpy(self.samples[idx].astype(np.int64))
        return {"x": window[:, :-1], "y": window[:, 1:]}


def _spec(tmp_path: Path, name: str, corpus: str, endpoint: str, *extra: str) -> JobSpec:
    return JobSpec.from_overrides(
        [
            "data=ray_dataset",
            f"data.uri={corpus}",
            "data.format=parquet",
            "data.column=text",
            f"storage.endpoint_url={endpoint}",  # the stream's endpoint (data.endpoint_url)
            "storage.path_style=true",
            "storage.region=us-east-1",  # reaches the Ray Data read tasks (data.region)
            f"model._target_={HeldStreamGPT.__module__}.{HeldStreamGPT.__qualname__}",
            "model.n_layer=1",
            "model.d_model=32",
            "model.n_head=2",
            f"model.seq_len={SEQ_LEN}",
            "strategy=zero2",
            "cluster.cpus_per_worker=0.5",
            "train.sample_tokens=0",
            "train.warmup_steps=2",
            f"train.steps={STEPS}",
            f"train.global_batch={B}",
            f"checkpoint.every={RESUME_AT}",
            "checkpoint.keep=5",
            f"run_dir={tmp_path / name}",
            *extra,
        ]
    )


def _params_at(spec: JobSpec, step: int) -> torch.Tensor:
    store = open_store(spec.checkpoint.uri)
    manifest = read_manifest(store, step)
    return CheckpointReader(store, manifest).read("param", 0, manifest.numel)


@pytest.fixture(scope="module")
def corpus(s3_server) -> tuple[str, np.ndarray]:
    """``s3://bucket/corpus/`` (three parquet files) and its samples in stream order."""
    import pyarrow.fs as pafs

    rows = make_rows()
    bucket = s3_server.make_bucket()
    s3 = pafs.S3FileSystem(
        endpoint_override=s3_server.endpoint.removeprefix("http://"), scheme="http"
    )
    for k, part in enumerate(np.array_split(np.arange(len(rows)), 3)):
        table = pa.table({"id": part, "text": [rows[i] for i in part]})
        pq.write_table(table, f"{bucket}/corpus/part-{k}.parquet", filesystem=s3)
    samples = windows(rows)
    n = len(samples)
    assert len({s.tobytes() for s in samples}) == n  # content identifies a sample
    assert n % B and 2 * n < STEPS * B < 3 * n  # passes end inside steps; >2 passes
    assert RESUME_AT * B < n < (RESUME_AT + 1) * B  # the first resumed step wraps
    assert n < KILL_AFTER * B  # the kill lands in pass 1
    return f"s3://{bucket}/corpus/", samples


@pytest.fixture(scope="module")
def held_out(s3_server, corpus) -> tuple[str, np.ndarray]:
    """``s3://bucket/heldout/`` (one parquet file of other rows) and its windows."""
    import pyarrow.fs as pafs

    uri, _ = corpus
    bucket = uri.removeprefix("s3://").split("/")[0]
    rows = make_rows(40, seed=8)
    s3 = pafs.S3FileSystem(
        endpoint_override=s3_server.endpoint.removeprefix("http://"), scheme="http"
    )
    pq.write_table(pa.table({"text": rows}), f"{bucket}/heldout/part-0.parquet", filesystem=s3)
    samples = windows(rows)
    assert len(samples) > EVAL_BATCHES * B  # the evaluation reads only the first batches
    return f"s3://{bucket}/heldout/", samples


class Run(NamedTuple):
    spec: JobSpec
    status: JobStatus
    metrics: list[dict]


def _finish(handle, spec: JobSpec) -> Run:
    status = handle.wait(timeout=240)
    assert status.state == JobState.SUCCEEDED, status.error
    return Run(spec, status, handle.metrics())


@pytest.fixture(scope="module")
def runs(ray_session, s3_server, corpus, held_out, tmp_path_factory) -> dict[str, Run]:
    """This module's three jobs, run once; each test below checks its own.

    All three run side by side (a job's start-up is mostly waiting for processes):
    ``reference`` (uninterrupted) and ``killed`` from the start, ``resumed`` once the
    reference's step-``RESUME_AT`` checkpoint is committed.
    """
    uri, _ = corpus
    tmp = tmp_path_factory.mktemp("stream")
    reference = _spec(
        tmp,
        "reference",
        uri,
        s3_server.endpoint,
        f"data.eval_uri={held_out[0]}",
        f"train.eval_every={EVAL_EVERY}",
        f"train.eval_batches={EVAL_BATCHES}",
    )
    killed = _spec(tmp, "killed", uri, s3_server.endpoint)
    resumed = _spec(
        tmp,
        "resumed",
        uri,
        s3_server.endpoint,
        "cluster.workers=3",
        f"resume={reference.checkpoint.uri}/step-{RESUME_AT:08d}",
    )
    handles = {}
    try:
        HeldStreamGPT.HOLD_FILE.touch()  # both jobs train slowly until the kill
        try:
            handles["reference"], handles["killed"] = submit(reference), submit(killed)
            wait_for_step(handles["killed"], KILL_AFTER, timeout=300)
            os.kill(handles["killed"].worker_pids()[0], signal.SIGKILL)
        finally:
            HeldStreamGPT.HOLD_FILE.unlink(missing_ok=True)
        store, deadline = open_store(reference.checkpoint.uri), time.time() + 300
        while RESUME_AT not in committed_steps(store):
            assert time.time() < deadline and not handles["reference"].done()
            time.sleep(0.1)
        handles["resumed"] = submit(resumed)
        specs = {"reference": reference, "killed": killed, "resumed": resumed}
        return {name: _finish(handle, specs[name]) for name, handle in handles.items()}
    finally:  # after a failure: leave nothing running
        for handle in handles.values():
            if not handle.done():
                handle.cancel()


def test_reference_run_reads_each_sample_once_per_pass(runs, corpus):
    """The job's samples are the pure order's: one process trained on windows cut in
    memory (no stream code) ends where the 2-worker job did; one repeated sample is
    visible by far more than the tolerances of this module."""
    _, samples = corpus
    n = len(samples)
    spec = runs["reference"].spec
    got = final_params(spec)
    want = train_reference(spec, Oracle(samples), STEPS)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # Sample 1 of pass 1 replaced by sample 0 (a repeat) at global position n + 1.
    repeated = train_reference(spec, Oracle(samples, lambda g: 0 if g == n + 1 else g % n), STEPS)
    assert (repeated - got).abs().max() > 20 * ATOL  # measured: 1.6e-3, 80 x ATOL


def test_sigkill_a_worker_mid_stream_ends_bitwise_equal(runs):
    """Rank 0 killed after step KILL_AFTER (pass 1): its replacement's stream starts mid-pass
    with the pass length unknown; the run ends bitwise where the uninterrupted one did."""
    spec, status, metrics = runs["killed"]
    assert status.failures_survived == 1
    steps = [m["step"] for m in metrics]
    assert steps == list(range(STEPS))  # a redone step keeps one record
    got, want = final_params(spec), final_params(runs["reference"].spec)
    assert torch.equal(got, want), f"max |diff| {(got - want).abs().max().item():.3g}"


def test_resume_at_another_world_size_matches(runs):
    """2 workers to step RESUME_AT, 3 from there: fresh streams whose first step wraps."""
    spec, status, metrics = runs["resumed"]
    assert status.resumed_from.endswith(f"step-{RESUME_AT:08d}")
    assert len(status.workers) == 3
    assert [m["step"] for m in metrics] == list(range(RESUME_AT, STEPS))
    torch.testing.assert_close(
        _params_at(spec, STEPS), _params_at(runs["reference"].spec, STEPS), atol=ATOL, rtol=0
    )


def test_held_out_files_are_evaluated_as_one_process_would(runs, held_out):
    """``data.eval_uri``: every EVAL_EVERY steps and at the end, the held-out loss of the
    job's parameters over the first EVAL_BATCHES global batches of the held-out windows."""
    spec, status, metrics = runs["reference"]
    evals = [m for m in metrics if "eval_loss" in m]
    assert len(evals) == STEPS // EVAL_EVERY
    assert all(math.isfinite(m["perplexity"]) for m in evals)
    # The job's input waits are recorded per rank and step.
    assert all(len(m["data_wait_s"]) == 2 for m in metrics)
    _, samples = held_out
    data = Oracle(samples)
    torch.manual_seed(0)
    model = build_model(spec.model, data.facts)
    params, flat = dict(model.named_parameters()), final_params(spec)
    with torch.no_grad():
        for slot in FlatLayout.of(model).slots:
            params[slot.name].copy_(flat[slot.offset : slot.end].view(slot.shape))
    task = make_task(spec.task, data, SEQ_LEN)
    items = [(data.batch(0, k, B, 0, B, SEQ_LEN), True) for k in range(EVAL_BATCHES)]
    model.eval()
    expected = eval_metrics([task.evaluate(model, items)])
    assert status.eval_loss == pytest.approx(expected["eval_loss"], abs=1e-5)
