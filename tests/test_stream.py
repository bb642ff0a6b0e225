"""``data=ray_dataset`` (actors/stream.py): the sample order, the cursor, the readers, Ray Data.

Most tests run without Ray: the cursor iterates plain Python rows, and the
file readers run in-process. One test runs Ray Data for real, in a Ray task,
over local and S3 (moto) parquet files.
"""

from __future__ import annotations

import json
import pickle
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors.datasets import DataError
from actors.stream import Cursor, StreamDataset, ray_dataset, row_tokens
from orchestrator.shard_plan import shard_bounds

pytest_plugins = ["tests.s3_server"]

SEQ_LEN = 8
W = SEQ_LEN + 1  # tokens per sample


def make_rows(n: int = 60, seed: int = 0) -> list[str]:
    """Rows of varied lengths (some empty, some multi-byte) of random letters."""
    rng = np.random.default_rng(seed)
    letters = list("abcdefghijklmnopqrstuvwxyzé€")
    return ["".join(rng.choice(letters, int(rng.integers(0, 14)))) for _ in range(n)]


def reference(rows: list[str], window: int = W) -> np.ndarray:
    """The pure in-memory sample order: non-overlapping windows of rows + "\\n", in order."""
    tokens = np.frombuffer("".join(r + "\n" for r in rows).encode(), np.uint8)
    n = len(tokens) // window
    return tokens[: n * window].reshape(n, window)


def batches_of(rows: list[str], size: int):
    """``open_pass`` for plain Python rows: a fresh iterator over batches of ``size`` rows."""
    return lambda: (rows[i : i + size] for i in range(0, len(rows), size))


def test_row_tokens_matches_python_bytes():
    rows = ["", "abc", "é€", "", "z" * 40]
    expected = np.frombuffer("".join(r + "\n" for r in rows).encode(), np.uint8)
    for form in (
        rows,
        pa.array(rows),
        pa.array(rows, pa.large_string()),
        pa.chunked_array([rows[:2], rows[2:]]),
        pa.array(["skip"] + rows)[1:],  # a slice: offsets do not start at 0
    ):
        np.testing.assert_array_equal(row_tokens(form), expected)
    np.testing.assert_array_equal(row_tokens(pa.array(["a", None, "b"])), [97, 10, 98, 10])
    with pytest.raises(DataError, match="data.column"):
        row_tokens(pa.array([1, 2]))


def test_each_sample_once_per_epoch_through_recovery_and_resume():
    """World size 3, a recovery that redoes 2 steps, a resume at world size 2: every epoch's
    samples (the last run of each step counting) are all samples exactly once."""
    rows = make_rows()
    ref = reference(rows)
    n = len(ref)
    ids = {r.tobytes(): i for i, r in enumerate(ref)}
    assert len(ids) == n  # windows are unique: content identifies a sample
    B = 7
    assert n % B  # epochs end inside a step
    taken: dict[int, list[int]] = {}  # step -> sample ids, the last run's

    def run(cursors: list[Cursor], steps: range) -> None:
        bounds = shard_bounds(B, [1.0] * len(cursors))
        for step in steps:
            out = []
            for cursor, (lo, hi) in zip(cursors, bounds, strict=True):
                got = cursor.take(step * B + lo, hi - lo)
                np.testing.assert_array_equal(got, ref[[(step * B + j) % n for j in range(lo, hi)]])
                out += [ids[w.tobytes()] for w in got]
            taken[step] = out

    workers = [Cursor(batches_of(rows, 5), W) for _ in range(3)]
    run(workers, range(0, 12))
    run(workers, range(10, 16))  # a recovery: back 2 steps, the same workers
    resumed = [Cursor(batches_of(rows, 3), W) for _ in range(2)]
    run(resumed, range(13, 3 * n // B + 2))  # a resume from the checkpoint at step 13

    positions = [step * B + j for step in sorted(taken) for j in range(B)]
    samples = [s for step in sorted(taken) for s in taken[step]]
    per_epoch: dict[int, Counter] = {}
    for pos, sample in zip(positions, samples, strict=True):
        per_epoch.setdefault(pos // n, Counter())[sample] += 1
    complete = [e for e in per_epoch if (e + 1) * n <= len(positions)]
    assert len(complete) >= 3
    for e in complete:
        assert per_epoch[e] == Counter(range(n)), f"epoch {e}"
    # Only going back reopens a pass: the first pass, its wrap into pass 1, the recovery.
    assert n == 59 and [c.passes_opened for c in workers] == [3, 3, 3]
    # The resume starts in pass 1 with N unknown: pass 0 is read to learn N, then pass 1
    # is opened, and the wraps into passes 2 and 3.
    assert [c.passes_opened for c in resumed] == [4, 4]


def test_batch_across_the_pass_boundary_and_far_ahead():
    rows = make_rows(30)
    ref = reference(rows)
    n = len(ref)
    cursor = Cursor(batches_of(rows, 4), W)
    # Spans the end of pass 0 and the start of pass 1 before N is known.
    np.testing.assert_array_equal(cursor.take(n - 3, 6), ref[[n - 3, n - 2, n - 1, 0, 1, 2]])
    assert cursor.samples_per_pass == n
    # A fresh worker resuming far ahead: reads one pass to learn N, then reopens.
    fresh = Cursor(batches_of(rows, 4), W)
    first = 1000 * n + 5
    np.testing.assert_array_equal(fresh.take(first, 3), ref[5:8])
    assert fresh.passes_opened == 2
    # A batch larger than a pass wraps (check() refuses such jobs; the cursor still serves).
    np.testing.assert_array_equal(fresh.take(0, n + 2), ref[list(range(n)) + [0, 1]])


def test_no_complete_sample_is_an_error():
    with pytest.raises(DataError, match="no complete sample"):
        Cursor(batches_of(["ab", "c"], 1), W).take(0, 1)


def write_formats(rows: list[str], root) -> dict[str, str]:
    """The rows as parquet (3 files, small row groups), JSON lines (2 files) and text (2 files)."""
    uris = {}
    for fmt in ("parquet", "json", "text"):
        (root / fmt).mkdir()
        uris[fmt] = str(root / fmt)
    thirds = np.array_split(np.arange(len(rows)), 3)
    for k, part in enumerate(thirds):
        table = pa.table({"id": part, "text": [rows[i] for i in part]})
        pq.write_table(table, root / "parquet" / f"part-{k}.parquet", row_group_size=7)
    (root / "parquet" / "_SUCCESS").write_text("")
    half = len(rows) // 2
    for k, part in enumerate((rows[:half], rows[half:])):
        lines = "".join(json.dumps({"text": r, "n": len(r)}) + "\n" for r in part)
        (root / "json" / f"shard-{k}.jsonl").write_text(lines)
        (root / "text" / f"shard-{k}.txt").write_text("".join(r + "\n" for r in part))
    return uris


@pytest.mark.parametrize("fmt", ["parquet", "json", "text"])
def test_files_read_in_process_give_the_in_memory_order(tmp_path, fmt, monkeypatch):
    rows = make_rows(80)
    ref = reference(rows)
    data = ray_dataset(write_formats(rows, tmp_path)[fmt], format=fmt)
    assert len(data.files) == (3 if fmt == "parquet" else 2)  # _SUCCESS is not data
    data.check(global_batch=len(ref), seq_len=SEQ_LEN)
    with pytest.raises(DataError, match="data.uri"):
        data.check(global_batch=len(ref) + 1, seq_len=SEQ_LEN)
    # Read in this process even if another test started Ray here.
    monkeypatch.setattr(data, "_open_pass", data._arrow_pass)
    batch = data.batch(0, 3, 5, 1, 4, SEQ_LEN)
    np.testing.assert_array_equal(batch["x"].numpy(), ref[16:19, :-1])
    np.testing.assert_array_equal(batch["y"].numpy(), ref[16:19, 1:])
    assert data.decode(data.encode("déf")) == "déf"
    assert list(data.eval_batches(4, SEQ_LEN, 10)) == []


def test_settings_and_pickling(tmp_path):
    rows = make_rows(20)
    uri = write_formats(rows, tmp_path)["parquet"]
    with pytest.raises(ValueError, match="data.format must be one of parquet, json, text"):
        ray_dataset(uri, format="csv")
    with pytest.raises(DataError, match="data.uri"):
        ray_dataset(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="data.column"):
        ray_dataset(uri, column="id").check(2, SEQ_LEN)
    data = ray_dataset(uri)
    assert data.kind == "tokens" and data.facts.vocab_size == 256
    same = ray_dataset(uri)
    assert data.fingerprint() == same.fingerprint() != ray_dataset(uri, column="x").fingerprint()
    data._cursor = Cursor(data._arrow_pass, W)  # as after a worker's first batch
    copy = pickle.loads(pickle.dumps(data))
    assert copy._cursor is None and copy == data and copy.fingerprint() == data.fingerprint()


@pytest.mark.timeout(120)
def test_ray_data_stream_in_a_worker_matches_the_in_memory_order(ray_session, s3_server, tmp_path):
    """Local and S3 parquet read by Ray Data inside a Ray task: the same batches, forward,
    back (a recovery) and across the pass boundary, as the in-memory order."""
    import pyarrow.fs as pafs

    ray = ray_session
    rows = make_rows(90, seed=1)
    ref = reference(rows)
    n = len(ref)
    uri = write_formats(rows, tmp_path)["parquet"]
    bucket = s3_server.make_bucket()
    s3 = pafs.S3FileSystem(
        endpoint_override=s3_server.endpoint.removeprefix("http://"), scheme="http"
    )
    for name in ("part-0.parquet", "part-1.parquet", "part-2.parquet"):
        pafs.copy_files(f"{uri}/{name}", f"{bucket}/corpus/{name}", destination_filesystem=s3)
    local = ray_dataset(uri)
    remote = ray_dataset(f"s3://{bucket}/corpus/", endpoint_url=s3_server.endpoint)
    assert remote.sizes == local.sizes
    B = 6
    for data in (local, remote):
        data.check(B, SEQ_LEN)  # in this process, with pyarrow
    steps = [0, 1, 2, 1, n // B, n // B + 1]  # forward, back one step, over the pass's end

    shares = [(local, 0, 4), (remote, 4, 6)]  # two workers' shares of each step

    @ray.remote(num_cpus=1)
    def worker(shares: list[tuple[StreamDataset, int, int]]) -> list[tuple[list, bool, int]]:
        import ray as ray_in_worker

        out = []
        for data, lo, hi in shares:
            xs = [data.batch(0, s, B, lo, hi, SEQ_LEN)["x"].numpy() for s in steps]
            out.append((xs, ray_in_worker.is_initialized(), data._cursor.passes_opened))
        return out

    results = ray.get(worker.remote(shares), timeout=100)  # one process: Ray Data starts once
    for (_, lo, hi), (got, ray_up, opened) in zip(shares, results, strict=True):
        assert ray_up and opened == 3  # Ray Data ran; reopened for the step back and the wrap
        for step, x in zip(steps, got, strict=True):
            want = ref[[(step * B + j) % n for j in range(lo, hi)], :-1]
            np.testing.assert_array_equal(x, want, err_msg=f"rows {lo}:{hi} of step {step}")


@pytest.mark.parametrize("fmt", ["parquet", "json", "text"])
def test_held_out_files_give_the_first_windows_of_their_own_stream(tmp_path, fmt):
    """data.eval_uri: batches of windows cut from the held-out files as training cuts its own,
    at most ``limit`` of them, read once per process (and not pickled)."""
    rows, held = make_rows(40), make_rows(50, seed=9)
    (tmp_path / "train").mkdir()
    (tmp_path / "held").mkdir()
    ref = reference(held)
    data = ray_dataset(
        write_formats(rows, tmp_path / "train")[fmt],
        format=fmt,
        eval_uri=write_formats(held, tmp_path / "held")[fmt],
    )
    got = list(data.eval_batches(4, SEQ_LEN, 3))
    assert [len(b) for b in got] == [4, 4, 4]
    np.testing.assert_array_equal(np.concatenate(got), ref[:12])
    batch = data.eval_batch(got[1], SEQ_LEN)
    np.testing.assert_array_equal(batch["x"].numpy(), ref[4:8, :-1])
    np.testing.assert_array_equal(batch["y"].numpy(), ref[4:8, 1:])
    whole = list(data.eval_batches(16, SEQ_LEN, 100))  # all of it; the last batch is short
    assert [len(b) for b in whole] == [16] * (len(ref) // 16) + [len(ref) % 16]
    copy = pickle.loads(pickle.dumps(data))
    assert copy._held_out == {} and copy.eval_files == data.eval_files
    assert copy.fingerprint() == ray_dataset(data.uri, format=fmt).fingerprint()
    with pytest.raises(DataError, match="data.eval_uri: .* does not exist"):
        ray_dataset(data.uri, format=fmt, eval_uri=str(tmp_path / "nowhere"))


def test_eval_every_on_a_stream_needs_held_out_files(tmp_path):
    """Without data.eval_uri a stream has no held-out split: asking to evaluate on it is an
    error naming the field, not a no-op; with it the job is accepted."""
    import pyarrow.parquet as pq

    from orchestrator.api import load_data
    from orchestrator.spec import ConfigError, JobSpec

    (tmp_path / "train").mkdir()
    text = pa.table({"text": ["some text to read " * 40] * 50})
    pq.write_table(text, tmp_path / "train" / "a.parquet")
    overrides = [
        "data=ray_dataset",
        f"data.uri={tmp_path / 'train'}",
        "model.seq_len=16",
        "train.global_batch=4",
        "train.eval_every=5",
        f"run_dir={tmp_path / 'run'}",
    ]
    with pytest.raises(ConfigError, match="train.eval_every: the dataset .* data.eval_uri"):
        load_data(JobSpec.from_overrides(overrides))
    pq.write_table(pa.table({"text": ["other text " * 30] * 20}), tmp_path / "held.parquet")
    spec = JobSpec.from_overrides([*overrides, f"data.eval_uri={tmp_path / 'held.parquet'}"])
    assert len(next(load_data(spec).eval_batches(4, 16, 1))) == 4


def test_region_reaches_every_s3_filesystem_the_stream_opens(s3_server, tmp_path, monkeypatch):
    """data.region (by default storage.region) is given to pyarrow's S3 filesystem when listing,
    checking and reading (in-process here; Ray Data's tasks get the same ``_read_options``)."""
    import pyarrow.fs as pafs

    from orchestrator.api import load_data
    from orchestrator.spec import JobSpec

    rows = make_rows(40, seed=3)
    bucket = s3_server.make_bucket()
    s3 = pafs.S3FileSystem(
        endpoint_override=s3_server.endpoint.removeprefix("http://"), scheme="http"
    )
    pq.write_table(pa.table({"text": rows}), f"{bucket}/corpus/part-0.parquet", filesystem=s3)
    uri = f"s3://{bucket}/corpus/"

    def spec(*extra: str) -> JobSpec:
        common = [
            "data=ray_dataset",
            f"data.uri={uri}",
            f"storage.endpoint_url={s3_server.endpoint}",
            "model.seq_len=16",
            "train.global_batch=4",
        ]
        return JobSpec.from_overrides([*common, f"run_dir={tmp_path / 'run'}", *extra])

    assert spec().data.region is None
    assert spec("storage.region=eu-west-3").data.region == "eu-west-3"
    assert spec("storage.region=eu-west-3", "data.region=us-west-2").data.region == "us-west-2"
    assert load_data(spec("storage.region=eu-west-3")).region == "eu-west-3"  # as a job builds it

    regions = []
    real = pafs.S3FileSystem

    def recording(**kwargs):
        regions.append(kwargs.get("region"))
        return real(**kwargs)

    monkeypatch.setattr(pafs, "S3FileSystem", recording)
    data = ray_dataset(uri, endpoint_url=s3_server.endpoint, region="eu-west-3")  # lists
    assert data.region == "eu-west-3" and data._read_options()["region"] == "eu-west-3"
    data.check(2, SEQ_LEN)
    monkeypatch.setattr(data, "_open_pass", data._arrow_pass)  # in-process even if Ray is up
    np.testing.assert_array_equal(
        data.batch(0, 1, 3, 0, 3, SEQ_LEN)["x"], reference(rows)[3:6, :-1]
    )
    assert regions == ["eu-west-3"] * 3
    plain = ray_dataset(uri, endpoint_url=s3_server.endpoint)
    assert plain.fingerprint() == data.fingerprint()  # the region does not change the data
    assert regions[-1] is None  # no region given: pyarrow's default (the AWS configuration's)
