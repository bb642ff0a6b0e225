"""Token streams larger than memory, read with Ray Data: ``data=ray_dataset``.

    shoal run data=ray_dataset data.uri=s3://bucket/corpus/ data.format=parquet data.column=text

A ``StreamDataset`` is a ``kind="tokens"`` dataset (task ``lm``) that never
holds its corpus. Its **sample stream** is fixed: the files in sorted path
order, each file's rows in order, each row's ``column`` text as UTF-8 byte
tokens followed by a separator (``\\n``); sample ``i`` of a pass is tokens
``[i*(T+1), (i+1)*(T+1))`` of that concatenation (``T = model.seq_len``;
windows do not overlap, a last partial window is dropped). The stream
repeats: sample ``g`` of the endless sequence is sample ``g % N`` of a pass,
``N`` being the samples per pass (learned when a worker first reaches the end
of a pass). Step ``s``'s global batch is samples ``[s*B, (s+1)*B)``: a pure
function of the step, as for the in-memory datasets, so a checkpoint's data
position is its step, a recovery redoes exactly the lost steps, a resume at
another world size reads the same samples, and each sample is used once per
epoch. There is no shuffle (``train.seed`` does not change the order):
shuffle the rows when writing the files.

**Where the reading happens.** The driver builds and checks the dataset
before Ray starts (``orchestrator/api.py``), so ``ray_dataset()`` (listing),
``fingerprint()`` and ``check()`` read with pyarrow in-process and never
touch Ray (``ray.data`` would start a local Ray instance implicitly). The
dataset pickles without any reader state; each worker opens its own Ray Data
stream on first use: a ``from_items`` dataset of the file paths whose
``map_batches`` tasks read the files with the same pyarrow readers, in order
(``preserve_order``). The read tasks reserve no CPU (``num_cpus=0``): Ray
Data's own ``read_parquet`` lists files in a task that needs one free CPU,
and hangs when the job's workers hold them all (the default on a small
machine). Without Ray (a unit test, a notebook) the same readers run
in-process.

**Memory.** A worker holds its cursor's buffer: the tokens of one read batch
(``READ_ROWS`` rows) plus less than one window, and the windows of its
current rows; Ray Data adds at most ``READ_TASKS`` read tasks' output blocks
in flight (in the object store). JSON files are read one whole file at a
time, parquet by ``READ_ROWS`` rows, text by 1 MiB.

**Cost.** Sample positions depend on the lengths of all earlier rows, so
every worker reads (and tokenizes) the whole stream and keeps only its own
rows: input I/O is world size times the data. Going back (a recovery, a
resume) reopens the stream at the start of the pass and reads forward again.

**Eval.** The held-out split is other files: ``data.eval_uri`` (same
formats). Its first ``train.eval_batches`` global batches of windows, cut as
the training stream's, are read once per process with pyarrow and kept (a
few hundred KB). Without ``eval_uri`` a stream has no held-out split.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from actors.data import VOCAB_SIZE, decode_bytes, encode_bytes
from actors.datasets import DataError, DataFacts

FORMATS = ("parquet", "json", "text")
TOKENIZERS = ("bytes",)
SEPARATOR = 10  # the byte "\n", appended to every row
READ_ROWS = 4096  # rows per parquet read batch
READ_TASKS = 2  # concurrent Ray Data read tasks per worker
TEXT_CHUNK = 1 << 20  # bytes per text read
EXTENSIONS = {"parquet": (".parquet",), "json": (".json", ".jsonl"), "text": ()}

# A batch of rows: an Arrow string/binary array, or plain Python strings (tests).
Rows = pa.Array | pa.ChunkedArray | Sequence[str]


def binary_rows(rows: Rows, column: str = "text") -> pa.LargeBinaryArray:
    """``rows`` as one Arrow ``large_binary`` array without nulls (the readers' common type)."""
    if isinstance(rows, pa.ChunkedArray):
        rows = rows.combine_chunks()
    elif not isinstance(rows, pa.Array):
        rows = pa.array(rows, pa.large_string())
    t = rows.type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)):
        if not pa.types.is_large_binary(t):
            raise DataError(f"data.column: column {column!r} holds {t}, not text")
    return rows.drop_null().cast(pa.large_binary())


def row_tokens(rows: Rows) -> np.ndarray:
    """Byte tokens of ``rows``, each row followed by ``SEPARATOR`` (vectorized, no Python loop)."""
    arr = binary_rows(rows)
    if len(arr) == 0:
        return np.empty(0, np.uint8)
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, np.int64)[arr.offset : arr.offset + len(arr) + 1]
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.empty(0, np.uint8)
    values = data[offsets[0] : offsets[-1]]
    return np.insert(values, offsets[1:] - offsets[0], SEPARATOR)


class Cursor:
    """One reader's position in the sample stream: a forward iterator and a token buffer.

    ``open_pass`` returns a fresh iterator over a pass's row batches (Ray
    Data's in a worker; any iterable in tests). ``take`` serves any global
    sample indices: forward requests read on, discarding what lies before;
    a request before the buffer's head reopens the pass and skips forward.
    """

    def __init__(self, open_pass: Callable[[], Iterable[Rows]], window: int):
        self._open_pass = open_pass
        self.window = window  # tokens per sample: seq_len + 1
        self.samples_per_pass: int | None = None  # N, known once a pass has been read to its end
        self.passes_opened = 0
        self._rows: Iterator[Rows] | None = None
        self._head = 0  # index within the pass of the sample the buffer starts with
        self._buf = np.empty(0, np.uint8)

    def take(self, first: int, count: int) -> np.ndarray:
        """Samples ``[first, first + count)`` of the endless stream, as ``[count, window]``."""
        parts = [np.empty((0, self.window), np.uint8)]
        g, end = first, first + count
        while g < end:
            n = self.samples_per_pass
            i = g if n is None else g % n
            got = self.read(i, end - g if n is None else min(end - g, n - i))
            if self.samples_per_pass == 0:
                raise DataError("the data holds no complete sample")
            if len(got) == 0 and n is not None:
                raise DataError(f"sample {i} is missing: the data changed after its first pass")
            parts.append(got)
            g += len(got)  # if the pass ended before sample g, N is known now: map g again
        return np.concatenate(parts)

    def read(self, i: int, want: int) -> np.ndarray:
        """Up to ``want`` samples from index ``i`` of a pass (fewer where the pass ends)."""
        if self._rows is None or i < self._head:
            self._reopen()
        w = self.window
        while True:
            drop = min(i - self._head, len(self._buf) // w)  # whole samples before i
            if drop:
                self._buf = self._buf[drop * w :]
                self._head += drop
            ready = len(self._buf) // w if self._head == i else 0
            if ready >= want:
                break
            rows = next(self._rows, None)
            if rows is None:  # the pass ended: it holds every sample before head + ready
                n, before = self._head + len(self._buf) // w, self.samples_per_pass
                if before not in (None, n):
                    raise DataError(f"a pass held {n} samples, an earlier one {before}")
                self.samples_per_pass = n
                break
            self._buf = np.concatenate([self._buf, row_tokens(rows)])
        k = min(want, ready)
        return self._buf[: k * w].reshape(k, w).copy()

    def close(self) -> None:
        """Stop reading (a Ray Data iterator shuts its executor down)."""
        close = getattr(self._rows, "close", None)
        if close is not None:
            close()
        self._rows = None

    def _reopen(self) -> None:
        self.close()
        self._rows = iter(self._open_pass())
        self._head, self._buf = 0, np.empty(0, np.uint8)
        self.passes_opened += 1


# -- reading files (pyarrow only: used in the driver, in Ray Data tasks and in tests) -----------


def filesystem(
    uri: str, endpoint_url: str | None = None, region: str | None = None
) -> tuple[Any, str]:
    """The pyarrow filesystem of ``uri`` and the path within it (``s3://``, ``file://``, a path).

    ``region``: the bucket's S3 region (None: the AWS configuration's, ``AWS_DEFAULT_REGION``).
    """
    from pyarrow import fs

    if uri.startswith("s3://"):
        kwargs: dict[str, Any] = {}
        if endpoint_url:  # e.g. http://127.0.0.1:9000 (MinIO, a test server): path-style
            scheme, sep, host = endpoint_url.partition("://")
            kwargs = {"endpoint_override": host, "scheme": scheme} if sep else {}
            kwargs = kwargs or {"endpoint_override": endpoint_url}
        if region:
            kwargs["region"] = region
        return fs.S3FileSystem(**kwargs), uri.removeprefix("s3://").rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"data.uri: {uri!r}: only s3://, file:// and local paths are supported")
    import os

    path = os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))
    return fs.LocalFileSystem(), path


def list_files(
    uri: str,
    fmt: str,
    endpoint_url: str | None = None,
    region: str | None = None,
    key: str = "data.uri",
) -> list[tuple[str, int]]:
    """``(path, size)`` of the data files under ``uri`` (or ``uri`` itself), in sorted order.

    A directory contributes its files (recursively) with the format's
    extensions, except hidden and ``_``-prefixed ones (``_SUCCESS``).
    ``key``: the config field that gave ``uri``, for the errors.
    """
    from pyarrow import fs

    pfs, path = filesystem(uri, endpoint_url, region)
    try:
        info = pfs.get_file_info(path)
        if info.type == fs.FileType.File:
            return [(info.path, info.size)]
        if info.type != fs.FileType.Directory:
            raise DataError(f"{key}: {uri!r} does not exist")
        found = pfs.get_file_info(fs.FileSelector(path, recursive=True))
    except OSError as e:
        raise DataError(f"{key}: cannot list {uri!r}: {e}") from None
    ext = EXTENSIONS[fmt]
    files = sorted(
        (f.path, f.size)
        for f in found
        if f.type == fs.FileType.File
        and not f.base_name.startswith((".", "_"))
        and (not ext or f.base_name.endswith(ext))
    )
    if not files:
        kinds = f" ({', '.join(ext)})" if ext else ""
        raise DataError(f"{key}: no {fmt} files{kinds} under {uri!r}")
    return files


def read_file(pfs: Any, path: str, fmt: str, column: str) -> Iterator[pa.LargeBinaryArray]:
    """One file's rows, in order, in batches: the ``column`` of parquet/JSON-lines, or lines."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with pfs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            if column not in pf.schema_arrow.names:
                raise DataError(f"data.column: {path} has no column {column!r} ({pf.schema_arrow})")
            for batch in pf.iter_batches(batch_size=READ_ROWS, columns=[column]):
                yield binary_rows(batch.column(0), column)
    elif fmt == "json":
        import pyarrow.json as pj

        with pfs.open_input_stream(path) as f:
            table = pj.read_json(f)  # JSON lines, one whole file
        if column not in table.column_names:
            raise DataError(f"data.column: {path} has no field {column!r} ({table.column_names})")
        yield binary_rows(table.column(column), column)
    else:  # text: a row per line; the separator restores the line breaks
        with pfs.open_input_stream(path) as f:
            rest = b""
            while block := f.read(TEXT_CHUNK):
                lines = (rest + block).split(b"\n")
                rest = lines.pop()
                yield pa.array(lines, pa.large_binary())
        if rest:
            yield pa.array([rest], pa.large_binary())


def _read_files(
    batch: pa.Table,
    fmt: str,
    column: str,
    uri: str,
    endpoint_url: str | None,
    region: str | None = None,
):
    """Ray Data ``map_batches`` function: the rows of the files named in ``batch``."""
    pfs, _ = filesystem(uri, endpoint_url, region)
    for path in batch.column("path").to_pylist():
        for rows in read_file(pfs, path, fmt, column):
            yield pa.table({"rows": rows})


# -- the dataset ----------------------------------------------------------------------------------


@dataclass
class StreamDataset:
    """A token stream read from files with Ray Data (see the module docstring)."""

    uri: str
    format: str
    column: str
    files: tuple[str, ...]  # paths within the filesystem of ``uri``, sorted
    sizes: tuple[int, ...]
    endpoint_url: str | None = None
    tokenizer: str = "bytes"
    region: str | None = None  # S3 only; not in the fingerprint (it does not change the data)
    # The held-out split (data.eval_uri): its URI and files; not in the fingerprint either.
    eval_uri: str | None = None
    eval_files: tuple[str, ...] = ()
    kind = "tokens"
    vocab_size = VOCAB_SIZE
    # A worker's reader: created on first use, never pickled (see __getstate__).
    _cursor: Cursor | None = field(default=None, init=False, repr=False, compare=False)
    _lock: Any = field(default_factory=threading.Lock, init=False, repr=False, compare=False)
    # (batch_size, window, limit) -> the held-out batches, read once per process.
    _held_out: dict[tuple[int, int, int], list[np.ndarray]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    _UNPICKLED = ("_cursor", "_lock", "_held_out")

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in self._UNPICKLED}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _cursor=None, _lock=threading.Lock(), _held_out={})

    @property
    def facts(self) -> DataFacts:
        return DataFacts(vocab_size=self.vocab_size)

    @property
    def source(self) -> str:
        return f"{self.uri} ({len(self.files)} {self.format} files, column {self.column!r})"

    def fingerprint(self) -> str:
        """A hash of the settings and of the files' names and sizes (nothing is read)."""
        h = hashlib.sha256(repr((self.uri, self.format, self.column, self.tokenizer)).encode())
        for path, size in zip(self.files, self.sizes, strict=True):
            h.update(f"{path}\0{size}\n".encode())
        return h.hexdigest()[:16]

    def check(self, global_batch: int, seq_len: int) -> None:
        """Raise ``DataError`` unless a pass holds one global batch: reads only that much,
        in-process with pyarrow (the driver checks before Ray starts)."""
        cursor = Cursor(self._arrow_pass, seq_len + 1)
        n = len(cursor.read(0, global_batch))
        if n < global_batch:
            raise DataError(
                f"data.uri: {self.source} holds {n} samples of model.seq_len + 1 = {seq_len + 1} "
                f"tokens, fewer than one global batch (train.global_batch={global_batch})"
            )

    def batch(
        self, seed: int, step: int, global_batch: int, lo: int, hi: int, seq_len: int
    ) -> dict[str, torch.Tensor]:
        """Rows ``[lo, hi)`` of step ``step``'s global batch (``seed`` is unused: no shuffle)."""
        with self._lock:  # ranks sharing one process (tests) share the cursor
            if self._cursor is None or self._cursor.window != seq_len + 1:
                self._cursor = Cursor(self._open_pass, seq_len + 1)
            samples = self._cursor.take(step * global_batch + lo, hi - lo)
        window = torch.from_numpy(samples.astype(np.int64))
        return {"x": window[:, :-1], "y": window[:, 1:]}

    def close(self) -> None:
        """Stop this process's reader. Call it before ``ray.shutdown()`` where batches were
        read with Ray up (a notebook, a benchmark): a Ray Data iterator left open is shut
        down when it is garbage-collected, and after ``ray.shutdown()`` that restarts Ray
        and can hang. Workers need not: their process ends with Ray."""
        with self._lock:
            if self._cursor is not None:
                self._cursor.close()
                self._cursor = None

    def eval_batches(self, batch_size: int, seq_len: int, limit: int) -> Iterator[np.ndarray]:
        """Up to ``limit`` batches of ``batch_size`` held-out windows (``[n, seq_len + 1]``
        token arrays; the last may be short) from ``data.eval_uri``; none without it."""
        if not self.eval_files:
            return iter(())
        key = (batch_size, seq_len + 1, limit)
        with self._lock:
            if key not in self._held_out:
                paths = pa.table({"path": list(self.eval_files)})
                options = {**self._read_options(), "uri": self.eval_uri}
                cursor = Cursor(
                    lambda: (t.column("rows") for t in _read_files(paths, **options)), key[1]
                )
                windows = cursor.read(0, batch_size * limit)
                cursor.close()
                self._held_out[key] = [
                    windows[i : i + batch_size] for i in range(0, len(windows), batch_size)
                ]
            return iter(list(self._held_out[key]))

    def eval_batch(self, rows: np.ndarray, seq_len: int) -> dict[str, torch.Tensor]:
        window = torch.from_numpy(rows.astype(np.int64))
        return {"x": window[:, :-1], "y": window[:, 1:]}

    def decode(self, ids: list[int]) -> str:
        return decode_bytes(ids)

    def encode(self, text: str) -> list[int]:
        return encode_bytes(text)

    # -- passes ---------------------------------------------------------------------------------

    def _open_pass(self) -> Iterator[Rows]:
        ray = sys.modules.get("ray")  # never import (and so never start) Ray here
        if ray is not None and ray.is_initialized():
            return self._ray_pass()
        return self._arrow_pass()

    def _read_options(self) -> dict[str, Any]:
        """``_read_files``'s settings: the same in this process and in Ray Data's tasks."""
        return {
            "fmt": self.format,
            "column": self.column,
            "uri": self.uri,
            "endpoint_url": self.endpoint_url,
            "region": self.region,
        }

    def _arrow_pass(self) -> Iterator[Rows]:
        """One pass read in this process with pyarrow (the driver's check, tests, no Ray)."""
        paths = pa.table({"path": list(self.files)})
        for table in _read_files(paths, **self._read_options()):
            yield table.column("rows")

    def _ray_pass(self) -> Iterator[Rows]:
        """One pass read by Ray Data tasks, in file order, streamed into this process."""
        import ray.data

        logging.getLogger("ray.data").setLevel(logging.WARNING)  # no lines per pass
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        paths = ray.data.from_items(
            [{"path": p} for p in self.files], override_num_blocks=min(len(self.files), 1024)
        )
        ds = paths.map_batches(
            _read_files,
            batch_size=1,
            batch_format="pyarrow",
            fn_kwargs=self._read_options(),
            num_cpus=0,  # never wait for a CPU the job's workers hold
            compute=ray.data.TaskPoolStrategy(size=READ_TASKS),
        )
        for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            yield table.column("rows")


def ray_dataset(
    uri: str,
    format: str = "parquet",
    column: str = "text",
    endpoint_url: str | None = None,
    tokenizer: str = "bytes",
    region: str | None = None,
    eval_uri: str | None = None,
) -> StreamDataset:
    """``data=ray_dataset``: the files under ``uri`` as a token stream (lists them; reads nothing).

    ``format``: parquet or json (JSON lines), whose ``column`` holds the
    text, or text (a row per line). ``endpoint_url``: an S3-compatible
    server for ``s3://`` URIs (MinIO, a test server); ``region``: the
    bucket's S3 region (``data.region``, by default ``storage.region``; None:
    the AWS configuration's); credentials come from the usual AWS environment.
    ``eval_uri``: held-out files of the same format (the same server and
    credentials), evaluated every ``train.eval_every`` steps.
    """
    if format not in FORMATS:
        raise ValueError(f"data.format must be one of {', '.join(FORMATS)}, not {format!r}")
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"data.tokenizer must be 'bytes' for data=ray_dataset, not {tokenizer!r}")
    listed = list_files(uri, format, endpoint_url, region)
    held_out = []
    if eval_uri:
        held_out = list_files(eval_uri, format, endpoint_url, region, "data.eval_uri")
    return StreamDataset(
        uri=uri,
        format=format,
        column=column,
        files=tuple(p for p, _ in listed),
        sizes=tuple(s for _, s in listed),
        endpoint_url=endpoint_url,
        tokenizer=tokenizer,
        region=region,
        eval_uri=eval_uri,
        eval_files=tuple(p for p, _ in held_out),
    )
