"""Input pipeline throughput: samples/s one worker gets from three kinds of source, same text.

    python bench/input_pipeline.py                  # 64 MiB of text in 8 parquet files
    python bench/input_pipeline.py --mb 256 --seq-len 512 --batch 32 --step-ms 50

* **in-memory**: ``TokenDataset.batch`` (``data=text_file``): random windows
  of a token array the worker holds.
* **Ray Data**: ``StreamDataset.batch`` (``data=ray_dataset``,
  ``actors/stream.py``) over the parquet files, with Ray up: read tasks
  stream the files, the worker tokenizes and cuts windows.
  Also as rank 0 of 4 workers (rows ``[0, B/4)``): it still reads the
  whole stream and discards the other ranks' rows.
* **DataLoader**: a plain ``torch.utils.data.DataLoader`` (one loader
  process) over an ``IterableDataset`` that reads the same files with
  pyarrow and yields the same windows: one at a time (the loader collates
  them) or pre-batched.

Each reads ``--steps`` global batches (rows ``[0, B)``: one worker's view
with world size 1, unless said). samples/s counts the worker's own rows and
leaves out the first batch, whose latency (start-up) is reported apart.
Then each streamed source runs again with ``--step-ms`` of simulated
compute (a sleep) after every batch: the share of the step spent waiting
for data, i.e. what prefetching does not hide. A sleep leaves the CPU to
the readers; a real step competes with them for cores. No assertions: numbers go to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from torch.utils.data import DataLoader, IterableDataset

from actors.data import byte_corpus
from actors.stream import READ_ROWS, ray_dataset, row_tokens


def write_corpus(root: Path, mb: float, files: int) -> list[str]:
    """Lines of this Python's stdlib sources, repeated to ``mb`` MiB, in ``files`` parquet files."""
    lines: list[str] = []
    size = 0
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    while size < mb * 2**20:
        for path in sources:
            for line in path.read_text(errors="replace").splitlines():
                lines.append(line)
                size += len(line) + 1
            if size >= mb * 2**20:
                break
    for k, part in enumerate(np.array_split(np.arange(len(lines)), files)):
        table = pa.table({"text": [lines[i] for i in part]})
        pq.write_table(table, root / f"part-{k:03d}.parquet", row_group_size=READ_ROWS)
    return lines


class ParquetWindows(IterableDataset):
    """The stream's windows read with pyarrow alone: the plain PyTorch way to do the same.

    ``batch=None`` yields single windows (the DataLoader collates them);
    otherwise ``[batch, window]`` arrays (``batch_size=None`` in the loader).
    """

    def __init__(self, files: list[str], window: int, batch: int | None = None):
        self.files, self.window, self.batch = files, window, batch

    def __iter__(self) -> Iterator[np.ndarray]:
        w, buf = self.window * (self.batch or 1), np.empty(0, np.uint8)
        for path in self.files:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=READ_ROWS, columns=["text"]):
                buf = np.concatenate([buf, row_tokens(batch.column(0))])
                n = len(buf) // w
                shape = (n, self.batch, self.window) if self.batch else (n, w)
                yield from buf[: n * w].reshape(shape)
                buf = buf[n * w :]


Source = Callable[[int], object]  # step -> that step's batch


def stream_source(root: Path, batch: int, seq_len: int, world: int, opened: list) -> Source:
    """Rank 0's rows of each step of a job of ``world`` workers (a fresh cursor)."""
    data = ray_dataset(str(root))
    opened.append(data)  # closed before the next measurement and ray.shutdown()
    hi = batch // world
    return lambda step: data.batch(0, step, batch, 0, hi, seq_len)


def loader_source(files: list[str], window: int, batch: int, collate: bool) -> Source:
    dataset = ParquetWindows(files, window, None if collate else batch)
    loader = DataLoader(dataset, batch_size=batch if collate else None, num_workers=1)
    it = iter(loader)
    return lambda step: next(it)


def measure(get: Source, steps: int, samples: int, step_s: float = 0.0) -> dict[str, float]:
    """First-batch latency, samples/s after it, and the share of the time spent in ``get``."""
    t0 = time.perf_counter()
    get(0)
    first = time.perf_counter() - t0
    waited, t1 = 0.0, time.perf_counter()
    for step in range(1, steps):
        t = time.perf_counter()
        get(step)
        waited += time.perf_counter() - t
        if step_s:
            time.sleep(step_s)
    total = time.perf_counter() - t1
    return {"first_s": first, "samples_s": (steps - 1) * samples / total, "wait": waited / total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=64.0, help="text size, MiB")
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32, help="global batch (samples per step)")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--step-ms", type=float, default=20.0, help="simulated compute per step")
    ap.add_argument("--sim-steps", type=int, default=300)
    args = ap.parse_args()
    import ray

    T, B, W = args.seq_len, args.batch, args.seq_len + 1
    root = Path(tempfile.mkdtemp(prefix="shoal-bench-input-"))
    try:
        lines = write_corpus(root, args.mb, args.files)
        memory = byte_corpus("".join(line + "\n" for line in lines).encode(), "bench")
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
        stream = ray_dataset(str(root))
        stream.check(B, T)
        files = list(stream.files)
        t0 = time.perf_counter()
        first = stream.batch(0, 0, B, 0, B, T)["x"]  # Ray Data's first start in this process
        cold = time.perf_counter() - t0
        stream.close()
        # The streamed sources serve the same windows.
        np.testing.assert_array_equal(first, loader_source(files, W, B, False)(0)[:, :-1])

        opened: list = []
        sources: list[tuple[str, int, Callable[[], Source]]] = [
            ("in-memory TokenDataset", B, lambda: lambda s: memory.batch(0, s, B, 0, B, T)),
            ("Ray Data StreamDataset", B, lambda: stream_source(root, B, T, 1, opened)),
            (
                "Ray Data StreamDataset, rank 0 of 4",
                B // 4,
                lambda: stream_source(root, B, T, 4, opened),
            ),
            (
                "DataLoader, per-sample collate",
                B,
                lambda: loader_source(files, W, B, collate=True),
            ),
            ("DataLoader, pre-batched", B, lambda: loader_source(files, W, B, collate=False)),
        ]
        results, sim = {}, {}
        for name, samples, make in sources:
            results[name] = measure(make(), args.steps, samples)
            if name != "in-memory TokenDataset":
                sim[name] = measure(make(), args.sim_steps, samples, args.step_ms / 1000)
            for data in opened:  # no reader left running into the next measurement
                data.close()
        ray.shutdown()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    base = results["in-memory TokenDataset"]["samples_s"]
    print(
        f"{args.mb:g} MiB of text in {args.files} parquet files; seq_len={T}, global batch={B}, "
        f"{args.steps} steps; samples/s of the worker's own rows after the first batch; "
        f"Ray Data's first start in a process: {cold:.2f} s\n"
    )
    print(
        "| source | first batch (s) | samples/s | vs in-memory | waiting in a "
        f"{args.step_ms:g} ms step |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        wait = f"{sim[name]['wait']:.0%}" if name in sim else "-"
        print(
            f"| {name} | {r['first_s']:.2f} | {r['samples_s']:,.0f} | "
            f"{r['samples_s'] / base:.2f}x | {wait} |"
        )


if __name__ == "__main__":
    main()
