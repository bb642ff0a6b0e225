"""Checkpoint cost, side by side: shoal's async sharded save vs. torch.save + boto3 vs. DCP.

    python bench/checkpoint.py                      # ~300 MB of state on 2 workers
    python bench/checkpoint.py --mb 600 --workers 2 --reps 3

Each worker is a process holding its shard of a model's training state
(parameters + two Adam moments, as flat float32 vectors, which is what a
shoal ZeRO rank checkpoints). All workers save at once, to the same S3
server (moto's server mode in a subprocess on 127.0.0.1, or ``--endpoint``):

* **shoal async**: ``AsyncSaver.save`` (snapshot to host memory, then
  background hash + upload); blocked = until ``save`` returns.
* **sync baseline**: ``torch.save`` to a local file + boto3 ``upload_file``;
  blocked = all of it.
* **DCP async**: ``torch.distributed.checkpoint.async_save`` of the same
  tensors to a local folder (DCP has no S3 writer without extra packages);
  blocked = until ``async_save`` returns.

Also: upload throughput of shoal's background upload vs. raw boto3
``upload_file`` of the same bytes to the same server, and resume time
(every rank reads its ranges back and verifies them) vs. boto3 download +
``torch.load``. Prints a markdown table; timings are medians over
``--reps``. No assertions: numbers go to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MiB = 1024 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    """moto's S3 server in its own process, so it does not share the workers' GIL."""
    port = _free_port()
    proc = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "moto_server"), "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("moto_server did not start")


def _client(endpoint: str):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, max_pool_connections=16),
    )


def _delete_all(client, bucket: str) -> None:
    """Free the server's memory between phases (moto keeps objects in RAM)."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys})


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def worker(
    rank: int,
    world: int,
    numel: int,
    endpoint: str,
    bucket: str,
    reps: int,
    port: int,
    tmp: str,
    out: mp.Queue,
) -> None:
    """One rank: every method saves (and resumes) the same shard, in lockstep with the others."""
    from storage.async_saver import AsyncSaver
    from storage.checkpoint import (
        CheckpointReader,
        Manifest,
        commit,
        read_manifest,
        snapshot_shard,
    )
    from storage.s3_store import S3Store

    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
    )
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    lo, hi = rank * numel // world, (rank + 1) * numel // world
    state = {k: torch.randn(hi - lo) for k in ("param", "exp_avg", "exp_avg_sq")}
    store = S3Store(bucket, "shoal", endpoint_url=endpoint, path_style=True)
    client = _client(endpoint)
    saver = AsyncSaver(store)
    rows: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        rows.setdefault(name, []).append(value)

    nbytes = 0
    for rep in range(reps):
        step = rep + 1
        # -- shoal async: blocked time, then the background upload's duration.
        dist.barrier()
        ticket = saver.save(step, rank, lo, hi, state)
        add("shoal_blocked_s", ticket.blocked_s)
        saver.wait()
        result = saver.result(step)
        assert result.ok, result.error
        nbytes = result.nbytes
        add("shoal_upload_s", result.upload_s)
        records = [None] * world
        dist.all_gather_object(records, result.record)
        if rank == 0:
            commit(
                store, Manifest(step, world, "zero2", numel, [], {"step_count": step}, records), 1
            )
        dist.barrier()
        # -- resume: read this rank's ranges back (verified), as a ZeRO rank would.
        reader = CheckpointReader(store, read_manifest(store, step))
        add("shoal_resume_s", _timed(lambda r=reader: [r.read(k, lo, hi) for k in state]))
        # -- raw boto3 upload_file of the same bytes (file written first, untimed).
        raw = os.path.join(tmp, f"raw-{rank}.bin")
        with open(raw, "wb") as f:
            f.write(snapshot_shard(rank, lo, hi, state).view())
        dist.barrier()
        key = f"raw/{step}/{rank}"
        add("raw_upload_s", _timed(lambda raw=raw, key=key: client.upload_file(raw, bucket, key)))
        os.remove(raw)
        dist.barrier()
        if rank == 0:
            _delete_all(client, bucket)
        dist.barrier()
        # -- synchronous baseline: torch.save + upload_file, all of it blocks.
        path = os.path.join(tmp, f"sync-{rank}.pt")

        def sync_save(path=path, step=step) -> None:
            torch.save(state, path)
            client.upload_file(path, bucket, f"sync/{step}/{rank}.pt")

        add("sync_blocked_s", _timed(sync_save))

        def sync_load(path=path, step=step) -> None:
            client.download_file(bucket, f"sync/{step}/{rank}.pt", path)
            torch.load(path, weights_only=True)

        dist.barrier()
        add("sync_resume_s", _timed(sync_load))
        os.remove(path)
        dist.barrier()
        if rank == 0:
            _delete_all(client, bucket)
        # -- DCP async save of the same tensors (rank-specific keys: they are shards).
        import torch.distributed.checkpoint as dcp

        dcp_dir = os.path.join(tmp, f"dcp-{step}")
        sd = {f"rank{rank}.{k}": v for k, v in state.items()}
        dist.barrier()
        start = time.perf_counter()
        future = dcp.async_save(sd, checkpoint_id=dcp_dir)
        add("dcp_blocked_s", time.perf_counter() - start)
        future.result()
        add("dcp_total_s", time.perf_counter() - start)
        dist.barrier()
        if rank == 0:
            shutil.rmtree(dcp_dir, ignore_errors=True)
    rows["nbytes"] = [float(nbytes)]
    out.put((rank, rows))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=300.0, help="total state size, MiB")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--endpoint", default=None, help="an S3 endpoint (default: start moto)")
    args = ap.parse_args()
    numel = int(args.mb * MiB / 4 / 3)  # float32 param + two Adam moments
    moto = None
    endpoint = args.endpoint
    if endpoint is None:
        moto, endpoint = start_moto()
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
    )
    bucket = f"bench-{os.getpid()}"
    _client(endpoint).create_bucket(Bucket=bucket)
    tmp = tempfile.mkdtemp(prefix="shoal-bench-ckpt-")
    try:
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        port = _free_port()
        procs = [
            ctx.Process(
                target=worker,
                args=(r, args.workers, numel, endpoint, bucket, args.reps, port, tmp, out),
            )
            for r in range(args.workers)
        ]
        for p in procs:
            p.start()
        results = dict(out.get(timeout=1800) for _ in procs)
        for p in procs:
            p.join()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if moto is not None:
            moto.kill()
    report(results, args)


def report(results: dict[int, dict[str, list[float]]], args) -> None:
    """Per metric: the median over reps of the slowest worker (what the job waits for)."""

    def med(name: str) -> float:
        reps = len(results[0][name])
        return statistics.median(max(results[r][name][i] for r in results) for i in range(reps))

    total = sum(results[r]["nbytes"][0] for r in results)
    shoal_tp = total / med("shoal_upload_s") / MiB
    raw_tp = total / med("raw_upload_s") / MiB
    sync = med("sync_blocked_s")
    print(
        f"\n{total / MiB:.0f} MiB of state on {args.workers} workers, median of {args.reps}, "
        f"torch {torch.__version__}, {os.cpu_count()} CPU cores\n"
    )
    print("| | blocked per checkpoint (s) | vs. sync | end to end (s) |")
    print("| --- | ---: | ---: | ---: |")
    print(
        f"| shoal async (S3) | {med('shoal_blocked_s'):.3f} | "
        f"{med('shoal_blocked_s') / sync:.1%} | {med('shoal_upload_s'):.2f} |"
    )
    print(f"| torch.save + boto3 upload_file (S3) | {sync:.3f} | 100% | {sync:.2f} |")
    print(
        f"| DCP async_save (local disk) | {med('dcp_blocked_s'):.3f} | "
        f"{med('dcp_blocked_s') / sync:.1%} | {med('dcp_total_s'):.2f} |"
    )
    print("\n| upload throughput | MiB/s | vs. raw |")
    print("| --- | ---: | ---: |")
    print(f"| shoal background upload (hash + put) | {shoal_tp:.0f} | {shoal_tp / raw_tp:.0%} |")
    print(f"| raw boto3 upload_file, same bytes | {raw_tp:.0f} | 100% |")
    print("\n| resume (every rank reads its shard back) | s |")
    print("| --- | ---: |")
    print(f"| shoal ranged reads + chunk checksums | {med('shoal_resume_s'):.2f} |")
    print(f"| boto3 download_file + torch.load | {med('sync_resume_s'):.2f} |")


if __name__ == "__main__":
    main()
