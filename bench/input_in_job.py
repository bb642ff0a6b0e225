"""The input pipeline's share of step time inside a training job, stream vs in-memory.

    python bench/input_in_job.py                    # 16 MiB of text, gpt_tiny, 2 workers
    python bench/input_in_job.py --mb 64 --steps 120 --model gpt_small

The same text (this Python's stdlib sources, ``bench/input_pipeline.py``'s
corpus) trains a GPT four ways, one shoal job each on one local Ray
instance: ``data=text_file`` (the bytes in memory, random windows) and
``data=ray_dataset`` (parquet files streamed by Ray Data), each with the
next step's batch read on a background thread (``train.prefetch=true``,
the default) and without. Per job, from its step records after
``--warmup`` steps: the median step time, the share of step time the
most-waiting rank spent waiting for its batch (``data_wait_s``, as the run
summary reports it), and that wait's median per step. The goal of issue 12
is a share under 5%. No assertions: the table goes to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ray  # noqa: E402

from bench.input_pipeline import write_corpus  # noqa: E402
from orchestrator import JobSpec, JobState, submit  # noqa: E402
from orchestrator.api import NAMESPACE  # noqa: E402
from orchestrator.report import data_wait_share  # noqa: E402


def run(args: argparse.Namespace, root: Path, label: str, data: list[str], prefetch: bool) -> dict:
    spec = JobSpec.from_overrides(
        [
            *data,
            f"model={args.model}",
            f"model.seq_len={args.seq_len}",
            f"cluster.workers={args.workers}",
            f"train.global_batch={args.batch}",
            f"train.steps={args.steps}",
            f"train.prefetch={str(prefetch).lower()}",
            "train.sample_tokens=0",
            "checkpoint.every=0",
            f"run_dir={root / label}",
        ]
    )
    handle = submit(spec)
    status = handle.wait(timeout=1800)
    records = handle.metrics()
    handle.close()
    if status.state != JobState.SUCCEEDED:
        raise RuntimeError(f"{label}: {status.state}: {status.error}")
    steady = records[args.warmup :]
    return {
        "label": label,
        "prefetch": prefetch,
        "step_s": statistics.median(r["step_time_s"] for r in steady),
        "share": data_wait_share(records, args.warmup) or 0.0,
        "wait_ms": 1e3 * statistics.median(max(r["data_wait_s"]) for r in steady),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=16.0, help="text size, MiB")
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--model", default="gpt_tiny")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32, help="train.global_batch")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--warmup", type=int, default=5, help="steps left out (start-up)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="shoal-input-in-job-"))
    try:
        corpus = root / "corpus"
        corpus.mkdir()
        lines = write_corpus(corpus, args.mb, args.files)
        text = root / "corpus.txt"
        text.write_text("".join(line + "\n" for line in lines))
        ray.init(
            address="local",
            namespace=NAMESPACE,
            num_cpus=max(os.cpu_count() or 1, args.workers),
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
        sources = {
            "in-memory (`data=text_file`)": ["data=text_file", f"data.path={text}"],
            "Ray Data stream (`data=ray_dataset`)": ["data=ray_dataset", f"data.uri={corpus}"],
        }
        rows = []
        for name, data in sources.items():
            for prefetch in (True, False):
                label = f"{'stream' if 'ray_dataset' in name else 'memory'}-{prefetch}"
                row = run(args, root / "runs", label, data, prefetch)
                row["source"] = name
                print(f"  {label}: {row}", flush=True)
                rows.append(row)
        print(
            f"\n{args.mb:g} MiB of text, {args.model} seq_len {args.seq_len}, "
            f"{args.workers} workers, global batch {args.batch}, {args.steps} steps "
            f"(medians over steps {args.warmup}..{args.steps - 1})\n"
        )
        print("| source | prefetch | step (s) | waiting for data, share of step | wait/step (ms) |")
        print("|---|---|---:|---:|---:|")
        for r in rows:
            print(
                f"| {r['source']} | {'on' if r['prefetch'] else 'off'} | {r['step_s']:.3f} | "
                f"{r['share']:.2%} | {r['wait_ms']:.2f} |"
            )
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
