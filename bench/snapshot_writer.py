"""The blocking half of a checkpoint: shoal's safetensors writer vs. the ``safetensors`` library.

    python bench/snapshot_writer.py                    # 8, 64, 256 MiB shards, 3 repeats
    python bench/snapshot_writer.py --mib 64 256 --reps 5 --device cuda
    python bench/snapshot_writer.py --clock cpu        # CPU time: for a busy, shared machine

What training waits for when it saves a shard is the copy of the shard into
host memory, laid out as a safetensors object (hashing and the upload run in
the background on that buffer). Two ways to get those bytes:

* **shoal**: ``storage.checkpoint.snapshot_shard``: the header is computed
  first, then each tensor is copied straight into its place in one host
  buffer (one copy; pinned, with a non-blocking device-to-host copy, when the
  state is on a GPU). ``AsyncSaver`` reuses the previous snapshot's buffer;
  both that ("reused buffer") and a fresh allocation are timed.
* **safetensors**: ``safetensors.torch.save(tensors, metadata)``, which
  returns ``bytes``: each tensor is moved to the host (``.cpu()`` on a GPU),
  turned into bytes, and serialized into one new object.

The shard is a ZeRO rank's: ``param``, ``exp_avg`` and ``exp_avg_sq`` as
float32 slices of equal size (plus the RNG state), totalling ``--mib``.
Both outputs are checked to hold the same tensors, loadable by
``safetensors.torch.load``. The three ways take turns, ``--reps`` rounds
after one warm-up; the table shows the median and, in brackets, the
minimum (the better estimate on a shared, noisy machine). No assertions on timing: numbers go to
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from storage.checkpoint import RNG_KEY, snapshot_shard  # noqa: E402

MiB = 1024 * 1024


def _shard(mib: int, device: str) -> dict[str, torch.Tensor]:
    n = mib * MiB // 4 // 3
    # Slices of bigger flat vectors, as ``checkpoint_slice`` hands them over.
    return {
        name: torch.randn(2 * n, device=device)[n:] for name in ("param", "exp_avg", "exp_avg_sq")
    }


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time_all(fns: dict, reps: int, device: str, clock=time.perf_counter) -> dict[str, list[float]]:
    """Seconds per call of each function; the functions take turns, so noise hits all alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            _sync(device)
            start = clock()
            fn()
            _sync(device)
            times[name].append(clock() - start)
    return times


def measure(mib: int, reps: int, device: str, clock=time.perf_counter) -> dict[str, list[float]]:
    tensors = _shard(mib, device)
    rng = torch.get_rng_state()
    n = next(iter(tensors.values())).numel()
    lo, hi = 10 * n, 11 * n
    metadata = {"lo": str(lo), "hi": str(hi), "rank": "1"}
    buffer = snapshot_shard(1, lo, hi, tensors, rng).buffer

    def shoal_reused() -> None:
        snapshot_shard(1, lo, hi, tensors, rng, out=buffer)

    def shoal_fresh() -> None:
        snapshot_shard(1, lo, hi, tensors, rng)

    def library() -> None:
        st_save({**tensors, RNG_KEY: rng}, metadata)

    ours = st_load(bytes(snapshot_shard(1, lo, hi, tensors, rng).view()))
    theirs = st_load(st_save({**tensors, RNG_KEY: rng}, metadata))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    return _time_all(
        {"shoal_reused": shoal_reused, "shoal_fresh": shoal_fresh, "library": library},
        reps,
        device,
        clock,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, nargs="+", default=[8, 64, 256], help="shard sizes")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="where the training state lives")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall time, or this process's CPU time (user + system, all threads): on a "
        "machine shared with other work, CPU time is what the writer itself costs",
    )
    args = ap.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"snapshot of one shard, state on {args.device}, {args.clock} time, median (min) of "
        f"{args.reps} "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads)\n"
    )
    print(
        "| shard (MiB) | shoal, reused buffer (ms) | shoal, fresh buffer (ms) "
        "| safetensors.torch.save (ms) | library / shoal reused | library / shoal fresh |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for mib in args.mib:
        r = measure(mib, args.reps, args.device, clock)
        med = {k: statistics.median(v) for k, v in r.items()}
        best = {k: min(v) for k, v in r.items()}
        cells = " | ".join(
            f"{med[k] * 1e3:.1f} ({best[k] * 1e3:.1f})"
            for k in ("shoal_reused", "shoal_fresh", "library")
        )
        ratios = " | ".join(
            f"{med['library'] / med[k]:.2f}x ({best['library'] / best[k]:.2f}x)"
            for k in ("shoal_reused", "shoal_fresh")
        )
        print(f"| {mib} | {cells} | {ratios} |", flush=True)


if __name__ == "__main__":
    main()
