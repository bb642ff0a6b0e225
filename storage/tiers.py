"""Offload tiers: where flat fp32 state lives when it is not in the training device's memory.

A tier holds named flat tensors (an optimizer's ``exp_avg``, ``exp_avg_sq``,
...) cut into fixed-size **chunks** (:class:`ChunkGrid`), and moves one chunk
at a time: ``read(key, i)`` returns a future of a host buffer holding chunk
``i``, ``write(key, i, buf)`` stores the buffer back (and takes it over). A
consumer walks the chunks with reads issued ahead of use, so the I/O of the
next chunks overlaps the work on this one (``collectives/offloaded_optim.py``).

* :class:`HostTier` keeps each tensor whole in host memory (pinned when CUDA
  is present, so copies to the device can be asynchronous). A read is a view,
  a write of that view is nothing: host memory *is* the storage.
* :class:`NvmeTier` keeps one file per (tensor, chunk) under
  ``<nvme_path>/<job_id>/rank<r>.pid<pid>.<n>/``, each a whole number of pages.
  Reads and writes run on a thread pool with a bound on the bytes in flight,
  through page-aligned host buffers, with ``O_DIRECT`` (no page-cache copy,
  no cache pollution) where the filesystem accepts it, else buffered. Nothing
  is fsynced: the files are scratch, worthless after the process that wrote
  them is gone, and a crash is handled by removing them, not by reading them.

Budgets (``offload.host_bytes``, ``offload.nvme_bytes``; 0: what the machine
has) are enforced when a tensor is allocated: a tier refuses to hold more,
naming the field and the numbers. An I/O error names the path (a full disk:
``offload.nvme_path /x is full: ...``); the tier is then unusable, and the
error reaches the training step, which fails the job with the last
checkpoint as it was (tiers never touch checkpoints).

Files are removed by ``close()`` (also at interpreter exit); a run that
crashed (SIGKILL skips ``atexit``) leaves its directory behind, with an
``OWNER`` file naming host, pid and the pid's start time. Opening an
:class:`NvmeTier` removes every such directory under ``nvme_path`` whose owner
ran on this host and is no longer alive.
"""

from __future__ import annotations

import atexit
import bisect
import errno
import itertools
import json
import os
import shutil
import socket
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

PAGE = 4096
OWNER_FILE = "OWNER"
_instances = itertools.count()


class OffloadError(RuntimeError):
    """An offload tier cannot do what it was asked; the message names the setting or path."""


class OffloadBudgetError(OffloadError):
    """Holding a tensor would exceed a tier's byte budget."""


@dataclass(frozen=True)
class ChunkGrid:
    """``numel`` elements cut into chunks of at most ``chunk_numel``.

    Without ``cuts`` every chunk but the last has ``chunk_numel`` elements.
    ``cuts`` are offsets where a chunk must end as well (ZeRO-3's units: a
    unit's piece of parameters is then read, and its gradient written, as
    whole chunks that hold nothing of another unit).
    """

    numel: int
    chunk_numel: int
    cuts: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.chunk_numel < 1:
            raise ValueError(f"chunk_numel must be >= 1, got {self.chunk_numel}")
        starts: list[int] = []
        ends = sorted({c for c in self.cuts if 0 < c < self.numel} | {self.numel})
        lo = 0
        for end in ends:
            starts.extend(range(lo, end, self.chunk_numel))
            lo = end
        object.__setattr__(self, "_starts", starts)

    @property
    def n_chunks(self) -> int:
        return len(self._starts)

    def bounds(self, i: int) -> tuple[int, int]:
        starts = self._starts
        return starts[i], starts[i + 1] if i + 1 < len(starts) else self.numel

    def chunks_of(self, lo: int, hi: int) -> range:
        """The chunks that overlap ``[lo, hi)``."""
        if hi <= lo:
            return range(0)
        first = bisect.bisect_right(self._starts, lo) - 1
        return range(first, bisect.bisect_left(self._starts, hi))


def chunk_numel_for(chunk_mb: float, element_size: int = 4) -> int:
    """Elements per chunk for ``offload.chunk_mb``: whole pages, so files and buffers align."""
    per_page = PAGE // element_size
    pages = max(1, int(chunk_mb * 2**20) // PAGE)
    return pages * per_page


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class Tier:
    """Named flat fp32 tensors in chunks; see the module docstring. Not thread-safe per key."""

    kind = "tier"
    budget_field = ""

    def __init__(self, chunk_numel: int, budget_bytes: int = 0):
        self.chunk_numel = chunk_numel
        self.budget_bytes = budget_bytes  # 0: no budget of its own
        self.grids: dict[str, ChunkGrid] = {}
        self.held_bytes = 0

    def _reserve(self, key: str, nbytes: int) -> None:
        if self.budget_bytes and self.held_bytes + nbytes > self.budget_bytes:
            raise OffloadBudgetError(
                f"{self.budget_field}={self.budget_bytes} ({human(self.budget_bytes)}) cannot "
                f"hold {key!r}: it needs {nbytes} bytes ({human(nbytes)}) on top of the "
                f"{self.held_bytes} ({human(self.held_bytes)}) this tier already holds; raise "
                f"{self.budget_field} (0: no limit of its own)"
            )
        self.held_bytes += nbytes

    def allocate(
        self, key: str, numel: int, fill: float | None, cuts: tuple[int, ...] = ()
    ) -> None:
        """Hold ``key``: ``numel`` elements in a :class:`ChunkGrid` with ``cuts``.

        ``fill``: the value every element starts at; None: nothing is written
        (each chunk is written before it is first read).
        """
        raise NotImplementedError

    def read(self, key: str, i: int) -> Future[torch.Tensor]:
        """A future of a host buffer holding chunk ``i`` of ``key`` (its first elements)."""
        raise NotImplementedError

    def write(self, key: str, i: int, buf: torch.Tensor) -> Future[None]:
        """Store ``buf`` (from ``read(key, i)``) back as chunk ``i``; the tier takes it over."""
        raise NotImplementedError

    def discard(self, buf: torch.Tensor) -> None:
        """Give back a buffer from ``read`` that is not written back."""

    def put(self, key: str, i: int, data: torch.Tensor) -> Future[None]:
        """Store ``data`` (any tensor, any device, the chunk's length) as chunk ``i`` of ``key``."""
        buf = self.buffer()
        buf[: data.numel()].copy_(data.reshape(-1))
        return self.write(key, i, buf)

    def buffer(self) -> torch.Tensor:
        """A host buffer of one chunk that ``write`` takes over."""
        return torch.empty(self.chunk_numel, dtype=torch.float32)

    def flat(self, key: str) -> torch.Tensor | TierFlat:
        """All of ``key``: a tensor where it is resident, else a handle read chunk by chunk."""
        return TierFlat(self, key, 0, self.grids[key].numel)

    def close(self) -> None:
        """Release what the tier holds (files, memory); it cannot be used afterwards."""


class HostTier(Tier):
    """Tensors whole in host memory, pinned when CUDA is present."""

    kind = "host"
    budget_field = "offload.host_bytes"

    def __init__(self, chunk_numel: int, budget_bytes: int = 0, pin: bool | None = None):
        super().__init__(chunk_numel, budget_bytes)
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.tensors: dict[str, torch.Tensor] = {}

    def allocate(
        self, key: str, numel: int, fill: float | None, cuts: tuple[int, ...] = ()
    ) -> None:
        self._reserve(key, numel * 4)
        t = torch.empty(numel, dtype=torch.float32, pin_memory=self.pin)
        self.tensors[key] = t if fill is None else t.fill_(fill)
        self.grids[key] = ChunkGrid(numel, self.chunk_numel, cuts)

    def read(self, key: str, i: int) -> Future[torch.Tensor]:
        lo, hi = self.grids[key].bounds(i)
        done: Future[torch.Tensor] = Future()
        done.set_result(self.tensors[key][lo:hi])
        return done

    def write(self, key: str, i: int, buf: torch.Tensor) -> Future[None]:
        lo, hi = self.grids[key].bounds(i)
        dst = self.tensors[key][lo:hi]
        if buf.data_ptr() != dst.data_ptr():
            dst.copy_(buf[: hi - lo])
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def put(self, key: str, i: int, data: torch.Tensor) -> Future[None]:
        lo, hi = self.grids[key].bounds(i)
        self.tensors[key][lo:hi].copy_(data.reshape(-1))
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def flat(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def close(self) -> None:
        self.tensors.clear()
        self.held_bytes = 0


class _InFlight:
    """A bound on bytes in flight; one request larger than the bound still goes, alone."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._cond = threading.Condition()

    def acquire(self, n: int) -> None:
        with self._cond:
            while self.used and self.used + n > self.limit:
                self._cond.wait()
            self.used += n

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot), which tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 counts from 1 and includes pid, comm


def _owner_alive(owner: dict) -> bool:
    pid = int(owner.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    started = owner.get("start")
    return started is None or _start_time(pid) in (None, started)


def remove_stale(nvme_path: Path) -> list[Path]:
    """Remove offload directories under ``nvme_path`` left by dead processes of this host.

    Only directories with an ``OWNER`` file (written by :class:`NvmeTier`) are
    considered, so nothing else under the path is ever touched. Returns them.
    """
    removed = []
    host = socket.gethostname()
    for owner_file in nvme_path.glob(f"*/*/{OWNER_FILE}"):
        try:
            owner = json.loads(owner_file.read_text())
        except (OSError, ValueError):
            continue  # being written, or not ours
        if owner.get("host") != host or _owner_alive(owner):
            continue
        shutil.rmtree(owner_file.parent, ignore_errors=True)
        removed.append(owner_file.parent)
        try:
            owner_file.parent.parent.rmdir()  # the job's directory, once empty
        except OSError:
            pass
    return removed


def remove_job_files(nvme_path: str | os.PathLike, job_id: str, wait_s: float = 5.0) -> bool:
    """After a job's workers were killed: remove their offload directories on this host.

    Killed processes run no ``atexit``; they may take a moment to die, so this
    waits up to ``wait_s`` for their owners to be gone. Returns whether the
    job's directory is gone (other hosts' files go at their next start).
    """
    import time

    job_dir = Path(nvme_path) / job_id
    deadline = time.monotonic() + wait_s
    while True:
        remove_stale(Path(nvme_path))
        if not job_dir.exists() or time.monotonic() > deadline:
            return not job_dir.exists()
        time.sleep(0.1)


def _aligned_empty(nbytes: int) -> torch.Tensor:
    """A uint8 host tensor of ``nbytes`` starting on a page boundary (as O_DIRECT needs)."""
    raw = torch.empty(nbytes + PAGE, dtype=torch.uint8)
    skip = -raw.data_ptr() % PAGE
    return raw[skip : skip + nbytes]


class NvmeTier(Tier):
    """One file per (tensor, chunk) on a local disk; see the module docstring.

    ``inflight_bytes`` bounds the bytes of reads and writes submitted and not
    finished; ``threads`` run them. ``_pread``/``_pwrite`` are the only calls
    that touch the disk's data (tests inject failures there).
    """

    kind = "nvme"
    budget_field = "offload.nvme_bytes"

    def __init__(
        self,
        nvme_path: str | os.PathLike,
        job_id: str,
        rank: int,
        chunk_numel: int,
        budget_bytes: int = 0,
        *,
        inflight_bytes: int = 256 << 20,
        threads: int = 4,
        direct: bool | None = None,
    ):
        super().__init__(chunk_numel, budget_bytes)
        self.nvme_path = Path(nvme_path)
        self.chunk_bytes = chunk_numel * 4
        if self.chunk_bytes % PAGE:
            raise ValueError(f"chunk_numel * 4 must be a multiple of {PAGE}, got {chunk_numel}")
        try:
            self.nvme_path.mkdir(parents=True, exist_ok=True)
            self.removed_stale = remove_stale(self.nvme_path)
            self.root = self.nvme_path / job_id / f"rank{rank}.pid{os.getpid()}.{next(_instances)}"
            self.root.mkdir(parents=True)
            owner = {"host": socket.gethostname(), "pid": os.getpid()}
            owner["start"] = _start_time(os.getpid())
            (self.root / OWNER_FILE).write_text(json.dumps(owner))
        except OSError as e:
            raise self._io_error("creating offload files in", self.nvme_path, e) from None
        self.direct = self._probe_direct() if direct is None else direct
        self._inflight = _InFlight(max(inflight_bytes, self.chunk_bytes))
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="shoal-nvme")
        self._buffers: list[torch.Tensor] = []  # free page-aligned chunk buffers
        self._lock = threading.Lock()
        self._failed: OffloadError | None = None
        self._closed = False
        # close() at exit; a weak reference, so the tier itself can still be collected.
        ref = weakref.ref(self)
        self._atexit: Callable[[], None] = lambda: (t := ref()) is not None and t.close()
        atexit.register(self._atexit)

    # -- files ----------------------------------------------------------------

    def path(self, key: str, i: int) -> Path:
        return self.root / f"{key}.{i:06d}.bin"

    def _flags(self) -> int:
        return os.O_DIRECT if self.direct else 0

    def _probe_direct(self) -> bool:
        """Whether this filesystem takes O_DIRECT (tmpfs refuses the open, some the write)."""
        if not hasattr(os, "O_DIRECT"):
            return False
        probe = self.root / "probe"
        buf = _aligned_empty(PAGE).zero_()
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
            try:
                os.pwrite(fd, buf.numpy(), 0)
            finally:
                os.close(fd)
            return True
        except OSError:
            return False
        finally:
            probe.unlink(missing_ok=True)

    def _pwrite(self, fd: int, data: memoryview, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def _pread(self, fd: int, data: memoryview, offset: int) -> int:
        return os.preadv(fd, [data], offset)

    def _io_error(self, doing: str, path: Path, e: OSError) -> OffloadError:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return OffloadError(
                f"offload.nvme_path {self.nvme_path} is full: {doing} {path} failed ({e}); "
                "free space there, point offload.nvme_path at a larger disk, or use "
                "offload.optimizer=host"
            )
        return OffloadError(f"offload.nvme_path {self.nvme_path}: I/O error {doing} {path}: {e}")

    def _file_bytes(self, key: str, i: int) -> int:
        lo, hi = self.grids[key].bounds(i)
        return -(-(hi - lo) * 4 // PAGE) * PAGE

    # -- buffers --------------------------------------------------------------

    def buffer(self) -> torch.Tensor:
        return self._take_buffer()

    def _take_buffer(self) -> torch.Tensor:
        with self._lock:
            if self._buffers:
                return self._buffers.pop()
        return _aligned_empty(self.chunk_bytes).view(torch.float32)

    def discard(self, buf: torch.Tensor) -> None:
        if buf.numel() == self.chunk_numel:  # one of ours (a read's, never a resized view)
            with self._lock:
                # Keep no more free buffers than can be in flight at once: more would
                # only hold memory that the next step does not need.
                if len(self._buffers) < self._inflight.limit // self.chunk_bytes + 1:
                    self._buffers.append(buf)

    # -- the tier -------------------------------------------------------------

    def allocate(
        self, key: str, numel: int, fill: float | None, cuts: tuple[int, ...] = ()
    ) -> None:
        grid = ChunkGrid(numel, self.chunk_numel, cuts)
        nbytes = sum(
            -(-(hi - lo) * 4 // PAGE) * PAGE for lo, hi in map(grid.bounds, range(grid.n_chunks))
        )
        free = shutil.disk_usage(self.root).free
        if nbytes > free:
            raise OffloadError(
                f"offload.nvme_path {self.nvme_path} is full: {key!r} needs {nbytes} bytes "
                f"({human(nbytes)}) and {free} ({human(free)}) are free"
            )
        self._reserve(key, nbytes)
        self.grids[key] = grid
        if fill is None:
            return
        buf = _aligned_empty(self.chunk_bytes).view(torch.float32).fill_(fill)
        for i in range(grid.n_chunks):
            self._check()
            self._inflight.acquire(self.chunk_bytes)
            self._pool.submit(self._write_file, key, i, buf, None).add_done_callback(
                self._failure_of
            )
        self.drain()

    def _failure_of(self, fut: Future) -> None:
        e = fut.exception()
        if isinstance(e, OffloadError) and self._failed is None:
            self._failed = e

    def _check(self) -> None:
        if self._closed:
            raise OffloadError(f"offload tier {self.root} is closed")
        if self._failed is not None:
            raise self._failed

    def read(self, key: str, i: int) -> Future[torch.Tensor]:
        self._check()
        buf = self._take_buffer()
        self._inflight.acquire(self.chunk_bytes)
        return self._pool.submit(self._read_file, key, i, buf)

    def write(self, key: str, i: int, buf: torch.Tensor) -> Future[None]:
        self._check()
        self._inflight.acquire(self.chunk_bytes)
        fut = self._pool.submit(self._write_file, key, i, buf, buf)
        fut.add_done_callback(self._failure_of)
        return fut

    def drain(self) -> None:
        """Wait until no read or write is in flight; raise the first I/O error, if any."""
        self._inflight.acquire(self._inflight.limit)  # all of it: nothing else in flight
        self._inflight.release(self._inflight.limit)
        self._check()

    def _read_file(self, key: str, i: int, buf: torch.Tensor) -> torch.Tensor:
        path = self.path(key, i)
        n = self._file_bytes(key, i)
        try:
            view = memoryview(buf.view(torch.uint8).numpy())[:n]
            fd = os.open(path, os.O_RDONLY | self._flags())
            try:
                got = self._pread(fd, view, 0)
            finally:
                os.close(fd)
            if got != n:
                raise OSError(errno.EIO, f"short read: {got} of {n} bytes")
            return buf
        except OSError as e:
            self.discard(buf)
            raise self._io_error("reading", path, e) from None
        finally:
            self._inflight.release(self.chunk_bytes)

    def _write_file(
        self, key: str, i: int, buf: torch.Tensor, give_back: torch.Tensor | None
    ) -> None:
        path = self.path(key, i)
        n = self._file_bytes(key, i)
        try:
            view = memoryview(buf.view(torch.uint8).numpy())[:n]
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | self._flags(), 0o600)
            try:
                done = self._pwrite(fd, view, 0)
            finally:
                os.close(fd)
            if done != n:
                raise OSError(errno.EIO, f"short write: {done} of {n} bytes")
        except OSError as e:
            raise self._io_error("writing", path, e) from None
        finally:
            if give_back is not None:
                self.discard(give_back)
            self._inflight.release(self.chunk_bytes)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        shutil.rmtree(self.root, ignore_errors=True)
        try:
            self.root.parent.rmdir()  # the job's directory, once no rank uses it
        except OSError:
            pass
        self._buffers.clear()
        atexit.unregister(self._atexit)


class TierFlat:
    """Elements ``[lo, hi)`` of a tensor held in a tier, read chunk by chunk on demand.

    Enough of a tensor's interface for checkpoints and replication to size it
    (``numel``, ``dtype``, ``shape``, ``element_size``) and copy it
    (:func:`copy_flat`) without loading the whole of it into memory at once;
    ``clone()`` does load it, for a caller that needs a real tensor.
    """

    dtype = torch.float32
    device = torch.device("cpu")
    is_cuda = False

    def __init__(self, tier: Tier, key: str, lo: int, hi: int):
        self.tier, self.key, self.lo, self.hi = tier, key, lo, hi

    @property
    def shape(self) -> torch.Size:
        return torch.Size([self.hi - self.lo])

    def numel(self) -> int:
        return self.hi - self.lo

    def element_size(self) -> int:
        return 4

    def detach(self) -> TierFlat:
        return self

    def __getitem__(self, s: slice) -> TierFlat:
        lo, hi, step = s.indices(self.hi - self.lo)
        if step != 1:
            raise ValueError("a TierFlat slices with step 1 only")
        return TierFlat(self.tier, self.key, self.lo + lo, self.lo + max(lo, hi))

    def copy_to(self, dst: torch.Tensor) -> torch.Tensor:
        """Copy into ``dst`` (``numel()`` elements, any device), reading one chunk ahead."""
        if dst.numel() != self.numel():
            raise ValueError(f"copy of {self.numel()} elements into {dst.numel()}")
        grid = self.tier.grids[self.key]
        chunks = list(grid.chunks_of(self.lo, self.hi))
        ahead = {c: self.tier.read(self.key, c) for c in chunks[:1]}
        for n, c in enumerate(chunks):
            if n + 1 < len(chunks):
                ahead[chunks[n + 1]] = self.tier.read(self.key, chunks[n + 1])
            buf = ahead.pop(c).result()
            c_lo, c_hi = grid.bounds(c)
            a, b = max(c_lo, self.lo), min(c_hi, self.hi)
            dst[a - self.lo : b - self.lo].copy_(buf[a - c_lo : b - c_lo])
            self.tier.discard(buf)
        return dst

    def clone(self) -> torch.Tensor:
        return self.copy_to(torch.empty(self.numel(), dtype=self.dtype))


def copy_flat(dst: torch.Tensor, src: torch.Tensor | TierFlat, non_blocking: bool = False) -> None:
    """``dst.copy_(src)`` for a tensor or a :class:`TierFlat` (read chunk by chunk)."""
    if isinstance(src, TierFlat):
        src.copy_to(dst)
    else:
        dst.copy_(src, non_blocking=non_blocking)
