"""``shoal``: the command line, a thin layer over ``orchestrator.api``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from orchestrator import checkpoints_cli

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_CANCELLED = 0, 1, 2, 130

RUN_EPILOG = """\
overrides are Hydra-style KEY=VALUE pairs; pick a config group with GROUP=OPTION:

  strategy=ddp                 data-parallel strategy (zero1/2/3 come next)
  model=gpt_tiny|gpt_small     model.n_layer, model.n_head, model.d_model, model.seq_len
  data=stdlib_text|text_file   data.path=... for text_file
  cluster.workers=N            cluster.cpus_per_worker, cluster.gpus_per_worker,
                               cluster.address (null: embedded local Ray; else a cluster)
  train.steps, train.global_batch, train.lr, train.seed, train.log_every, ...
  checkpoint.uri (default file://<run_dir>/checkpoints), checkpoint.every, checkpoint.keep
  run_dir (default ./runs/<job-id>), resume=latest|<checkpoint URI>

examples:
  shoal run                                     # gpt_tiny on 2 local workers
  shoal run cluster.workers=3 train.steps=500
  shoal run data=text_file data.path=~/book.txt model=gpt_small
  shoal run run_dir=runs/a resume=latest        # continue runs/a from its last checkpoint
  shoal config train.lr=1e-3                    # print every field, resolved

Outputs go to the run folder: config.yaml, metrics.jsonl, status.json, loss.png,
sample.txt and checkpoints/.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shoal",
        description="shoal: elastic, sharded training of PyTorch models on Ray.",
        epilog="Run `shoal COMMAND --help` for a command's options.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="train a model (streams progress; Ctrl-C cancels cleanly)",
        description="Compose a job from configs/ and the overrides, train it, and report.",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides")
    run.add_argument("--quiet", action="store_true", help="no progress bar; summary only")
    cfg = sub.add_parser(
        "config",
        help="print the resolved configuration (every field, with overrides applied)",
        description="Print the job configuration that `shoal run` would use.",
    )
    cfg.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides")
    st = sub.add_parser(
        "status",
        help="show the state of runs (from their run folders)",
        description="Without arguments, list the runs under ./runs; with a run folder, show it.",
    )
    st.add_argument("run_dir", nargs="?", help="a run folder (default: list ./runs)")
    st.add_argument("--runs", default="runs", help="where to look for runs (default ./runs)")
    sc = sub.add_parser(
        "scale",
        help="change the number of workers of a running job",
        description=(
            "Set a running job's target number of workers, within its cluster.min_workers and "
            "cluster.max_workers. New workers join, or surplus ones are drained (their state "
            "moved off first), at the next step boundary."
        ),
    )
    sc.add_argument("job", help="the job id, or its run folder")
    sc.add_argument("workers", type=int, help="the new number of workers")
    sc.add_argument("--address", default="auto", help="the job's Ray cluster (default: auto)")
    checkpoints_cli.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        return cmd_run(args.overrides, quiet=args.quiet)
    if args.command == "config":
        return cmd_config(args.overrides)
    if args.command == "status":
        return cmd_status(args.run_dir, Path(args.runs))
    if args.command == "checkpoints":
        return checkpoints_cli.run(args)
    if args.command == "scale":
        return cmd_scale(args.job, args.workers, args.address)
    _parser().print_help()
    return EXIT_OK


def _spec_or_exit(overrides: list[str]):
    from orchestrator.spec import ConfigError, JobSpec

    try:
        return JobSpec.from_overrides(overrides)
    except ConfigError as e:
        print(f"shoal: bad configuration: {e}", file=sys.stderr)
        return None


def cmd_config(overrides: list[str]) -> int:
    spec = _spec_or_exit(overrides)
    if spec is None:
        return EXIT_CONFIG
    print(spec.to_yaml(), end="")
    return EXIT_OK


def cmd_run(overrides: list[str], quiet: bool = False) -> int:
    spec = _spec_or_exit(overrides)
    if spec is None:
        return EXIT_CONFIG
    from orchestrator.api import submit
    from orchestrator.report import summary
    from orchestrator.spec import ConfigError
    from orchestrator.status import JobState

    t0 = time.time()
    print(f"shoal: job {spec.job_id} -> {spec.run_dir}", file=sys.stderr)
    try:
        handle = submit(spec)
    except ConfigError as e:
        print(f"shoal: bad configuration: {e}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        _stream_progress(handle, quiet, t0)
        final = handle.wait()
    except KeyboardInterrupt:
        print("\nshoal: cancelling (finishing the current step)...", file=sys.stderr)
        handle.cancel()
        final = handle.wait(timeout=120)
    print(summary(final, handle.metrics()))
    if final.state == JobState.SUCCEEDED:
        return EXIT_OK
    return EXIT_CANCELLED if final.state == JobState.CANCELLED else EXIT_FAILED


def _stream_progress(handle, quiet: bool, t0: float) -> None:
    """A progress bar with step, loss, tokens/s and ETA until the job ends."""
    from tqdm import tqdm

    from orchestrator.status import JobState

    total = handle.spec.train.steps
    bar = None
    seen = 0
    shown_start = False
    while not handle.done():
        time.sleep(0.5)
        if bar is None:
            status = handle.status()
            if status.state == JobState.STARTING and not shown_start and not quiet:
                print("shoal: starting workers...", file=sys.stderr)
                shown_start = True
            if status.state != JobState.RUNNING:
                continue
            if not quiet:
                # Created when training starts, so the rate and ETA exclude start-up.
                bar = tqdm(
                    total=total,
                    initial=status.step,
                    unit="step",
                    dynamic_ncols=True,
                    file=sys.stderr,
                )
        new = handle.metrics(since=seen)
        if not new:
            continue
        if seen == 0 and not quiet:
            print(f"shoal: first step after {time.time() - t0:.1f}s", file=sys.stderr)
        seen += len(new)
        if bar is not None:
            _show(bar, new[-1])
    if bar is not None:
        rest = handle.metrics(since=seen)
        if rest:
            _show(bar, rest[-1])
        bar.close()


def _show(bar, record: dict) -> None:
    bar.update(record["step"] + 1 - bar.n)
    bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")


def cmd_scale(job: str, workers: int, address: str) -> int:
    from orchestrator.api import scale_job
    from orchestrator.status import read_status

    status = read_status(Path(job))
    job_id = status.job_id if status is not None else job
    try:
        target = scale_job(job_id, workers, address)
    except Exception as e:  # noqa: BLE001 - Ray's errors here are many; the message is what counts
        print(
            f"shoal: cannot reach job {job_id} through Ray at {address!r}: {e}\n"
            "(`shoal scale` works while the job runs; for a job started by `shoal run` on this "
            "machine the default --address auto finds it)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    print(f"job {job_id}: target {target} workers (applied at the next step boundary)")
    return EXIT_OK


def cmd_status(run_dir: str | None, runs_root: Path) -> int:
    from orchestrator.report import summary
    from orchestrator.status import JobState, read_status

    if run_dir:
        status = read_status(Path(run_dir))
        if status is None:
            print(f"shoal: no status.json in {run_dir}", file=sys.stderr)
            return EXIT_FAILED
        print(summary(_mark_interrupted(status, JobState), []))
        return EXIT_OK
    rows = []
    for d in sorted(runs_root.glob("*/"), key=lambda p: p.stat().st_mtime, reverse=True)[:30]:
        status = read_status(d)
        if status is not None:
            rows.append(_mark_interrupted(status, JobState))
    if not rows:
        print(f"no runs under {runs_root}/ (start one with `shoal run`)")
        return EXIT_OK
    header = f"{'job':24} {'state':20} {'step':>11} {'loss':>7} {'wrk':>3} {'ep':>3} {'lost':>4}"
    print(header + "  folder")
    for s in rows:
        loss = f"{s.loss:.3f}" if s.loss is not None else "-"
        step = f"{s.step}/{s.total_steps}"
        print(
            f"{s.job_id:24} {s.state.value:20} {step:>11} {loss:>7} {len(s.workers):>3} "
            f"{s.epoch:>3} {s.failures_survived:>4}  {s.run_dir}"
        )
    return EXIT_OK


def _mark_interrupted(status, JobState):
    """A run whose status says running but whose driver process is gone was interrupted."""
    if not status.state.finished and status.driver_pid and not _alive(status.driver_pid):
        status.state = JobState.FAILED
        status.error = "interrupted: the process that ran it exited (resume with resume=latest)"
    return status


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


if __name__ == "__main__":
    sys.exit(main())
